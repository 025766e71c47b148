"""Size of the packed quantized SAM against its FP32 checkpoint, on the trained testbed and on SAM-B-shaped
random weights, measured side by side in one run.

    python tools/bench_pack.py --q_config exp/minmax/w4a4.yaml

Each model is packed twice: with its weights as trained, and with ``float16_weights`` (the float layers
rounded to float16 values before quantizing, which the packed format then stores in two bytes).
Each model is quantized with the recipe (encoder and decoder), calibrated on one random image with two
boxes (the weights' codes depend on the weights and the recipe only; activation grids do not change the
size), packed with ``ahcq.deploy.pack_model`` and compared with ``torch.save`` of its float state dict.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from ahcq.deploy import pack_model, read_packed
from ahcq.models import build_sam, quantize_sam
from ahcq.models.half_weights import prepare_weights
from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.quantization import api
from ahcq.quantization.config import QConfig, load_qconfig
from ahcq.solver.calibration import switch_to_evaluation


def calibrate_random(sam: torch.nn.Module) -> None:
    """Calibrate every quantizer of ``sam`` on one seeded random image with two boxes; then evaluation."""
    g = torch.Generator().manual_seed(0)
    size = sam.image_encoder.img_size
    box = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.3, 0.2, 0.9, 0.8]]) * size
    inputs = [{"image": torch.rand(3, size, size, generator=g) * 255, "original_size": (size, size),
               "boxes": box}]
    with torch.no_grad(), api.calibrating(sam):
        sam(inputs, multimask_output=False)
    switch_to_evaluation(sam)


def measure(name: str, sam: torch.nn.Module, qconfig: QConfig, tmp: Path) -> dict[str, float]:
    """Bytes of the FP32 checkpoint and of the packed file, and how the packed file splits."""
    fp32 = tmp / f"{name}.pth"
    torch.save(sam.state_dict(), fp32)
    prepare_weights(sam, qconfig)
    quantize_sam(sam, qconfig, quant_encoder=True)
    calibrate_random(sam)
    packed = tmp / f"{name}.npz"
    pack_model(sam, qconfig, True, packed)
    _, blobs = read_packed(packed)
    codes = blobs["blob_uint8"].nbytes
    return {"fp32": fp32.stat().st_size, "packed": packed.stat().st_size, "codes": codes,
            "rest": sum(b.nbytes for b in blobs.values()) - codes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--q_config", type=Path, default=Path("exp/minmax/w4a4.yaml"), help="quantization YAML")
    p.add_argument("--checkpoint", type=Path, default=Path("ckpt/tiny_sam.pth"), help="the testbed weights")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    models = {"testbed (tiny SAM)": lambda: build_tiny_sam(checkpoint=args.checkpoint),
              "SAM-B shape, random": lambda: build_sam("vit_b")}
    qconfig = load_qconfig(args.q_config)
    print(f"recipe {args.q_config}\n")
    print("| model | float weights | FP32 checkpoint | packed | FP32 / packed | codes | other arrays "
          "(uncompressed) |")
    print("| :-- | :-- | --: | --: | --: | --: | --: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in models.items():
            for half in (False, True):
                config = dataclasses.replace(qconfig, float16_weights=half)
                m = measure(name.split()[0], build(), config, Path(tmp))
                mb = {k: f"{v / 2**20:.2f} MiB" for k, v in m.items()}
                print(f"| {name} | {'float16_weights' if half else 'as trained'} | {mb['fp32']} | "
                      f"{mb['packed']} | {m['fp32'] / m['packed']:.2f} | {mb['codes']} | {mb['rest']} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
