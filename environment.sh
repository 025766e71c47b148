#!/usr/bin/env bash
# One-command, idempotent setup of everything ahcq needs on Debian / Python 3.11 (CPU).
#   bash environment.sh
# Re-running it installs and rebuilds nothing that is already in place.
set -Eeuo pipefail
trap 'echo "environment.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=1.7.2
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
CACHE_ROOT="${AHCQ_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ahcq}"
PYTAG="$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
MMCV_WHEEL_DIR="$CACHE_ROOT/wheels/mmcv-full-${MMCV_VERSION}_torch-${TORCH_VERSION}_${PYTAG}"
APT_PACKAGES=(iverilog yosys make g++ perl libgl1 labelme-examples slurmctld slurmd slurm-client munge)
STAMP="$VENV/.ahcq-env-stamp"

say() { printf '\n==> %s\n' "$*"; }

say "Debian packages: ${APT_PACKAGES[*]}"
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
else
  echo "all present"
fi

say "Virtual environment $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

want_stamp="$(cat requirements.txt setup.py environment.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] && [ -f "$MMCV_WHEEL_DIR/.complete" ]; then
  say "Python packages already installed for this requirements.txt / setup.py (stamp matches)"
else
  rm -f "$STAMP"
  say "torch ${TORCH_VERSION} and torchvision ${TORCHVISION_VERSION}"
  pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

  if [ ! -f "$MMCV_WHEEL_DIR/.complete" ]; then
    say "Building mmcv-full ${MMCV_VERSION} with CPU ops into $MMCV_WHEEL_DIR (once; about 15-20 min on 2 cores)"
    # mmcv-full's setup.py imports pkg_resources: build with an old setuptools, restored below.
    pip install "setuptools<70" wheel ninja
    work="$(mktemp -d)"
    pip download --no-deps --no-build-isolation --no-binary :all: "mmcv-full==${MMCV_VERSION}" -d "$work"
    tar -xzf "$work"/mmcv-full-"${MMCV_VERSION}".tar.gz -C "$work"
    src="$work/mmcv-full-${MMCV_VERSION}"
    grep -q -- "-std=c++17" "$src/setup.py" || { echo "mmcv setup.py no longer passes -std=c++17; patch needs review" >&2; exit 1; }
    sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
    mkdir -p "$MMCV_WHEEL_DIR"
    (cd "$src" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="$(nproc)" \
       pip wheel --no-build-isolation --no-deps -w "$MMCV_WHEEL_DIR" .)
    ls "$MMCV_WHEEL_DIR"/mmcv_full-*.whl >/dev/null
    touch "$MMCV_WHEEL_DIR/.complete"
    rm -rf "$work"
  else
    say "mmcv-full wheel found in cache: $MMCV_WHEEL_DIR"
  fi
  pip install --no-deps "$MMCV_WHEEL_DIR"/mmcv_full-*.whl

  say "Pinned requirements (sam2 without its CUDA extension)"
  SAM2_BUILD_CUDA=0 pip install --no-build-isolation -r requirements.txt
  say "ahcq (editable)"
  pip install --no-build-isolation --no-deps -e .
  echo "$want_stamp" > "$STAMP"
fi

say "Import check"
python - <<'PY'
import importlib
import mmcv
from mmcv.ops import nms, RoIAlign  # noqa: F401  compiled CPU ops must be present
for name in ["torch", "torchvision", "mmcv", "mmdet", "segment_anything", "sam2", "cocotb", "pycocotools", "ahcq", "projects"]:
    mod = importlib.import_module(name)
    print(f"{name:18s} {getattr(mod, '__version__', 'ok')}")
print(f"{'mmcv.ops':18s} compiled ops load")
PY
say "Environment ready: source .venv/bin/activate"
