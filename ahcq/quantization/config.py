"""Quantization YAML -> validated, frozen dataclasses.

The reference repositories' keys (``a_qconfig``, ``w_qconfig``, ``recon``, ``ptq4sam``, ``ahcptq``, SAQ-SAM's
split encoder/decoder configs) load unchanged, their class names mapped to our canonical quantizer and
observer names; our own sections (``acnr``, ``lnq``, ``agq``, ``pcc``, ``par``, ``hluq``, ``cag``,
``overrides``) extend them. Every unknown key or bad value raises :class:`ConfigError` naming the file, the
dotted key path and what is allowed, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ahcq.yaml_schema import SchemaError, bad_value, check_keys, read_yaml, require_mapping

from .dialects import ConfigWarning, apply_dialect
from .mixed import Allocation, Budget, allocate, read_sensitivity
from .quantizers.cag import GroupRange
from .quantizers.lnq import DEFAULT_ALPHAS as LNQ_ALPHAS
from .transforms.acnr import SpectrumTarget

__all__ = [
    "ACNRConfig",
    "ACNRError",
    "BigTest",
    "CacheDtype",
    "LossAxis",
    "ReconUnits",
    "AGQConfig",
    "AHCPTQConfig",
    "AttentionConfig",
    "CAGConfig",
    "ConfigError",
    "ConfigWarning",
    "EarlyStopConfig",
    "HLUQConfig",
    "LNQConfig",
    "METHOD_PRESETS",
    "OBSERVERS",
    "OverrideConfig",
    "PARConfig",
    "PCCConfig",
    "PTQ4SAMConfig",
    "QConfig",
    "QSpecConfig",
    "QUANTIZERS",
    "ReconConfig",
    "load_qconfig",
    "parse_qconfig",
    "schema_keys",
]

QUANTIZERS = ("lsq", "fixed", "adaround", "hluq", "lnq", "agq", "cag")
OBSERVERS = ("minmax", "avg_minmax", "mse", "avg_mse", "percentile")

# Class names used by the reference repositories -> canonical names.
QUANTIZER_ALIASES = {
    "LSQFakeQuantize": "lsq",
    "LSQSignFakeQuantize": "lsq",
    "FixedFakeQuantize": "fixed",
    "AdaRoundFakeQuantize": "adaround",
    "HybridQuantize": "hluq",
    "LogTransformQuantize": "lnq",
    "AdaptiveGranularityQuantize": "agq",
    "GroupLSQFakeQuantize": "cag",
}
OBSERVER_ALIASES = {
    "MinMaxObserver": "minmax",
    "AvgMinMaxObserver": "avg_minmax",
    "AvgMinMaxGroupObserver": "avg_minmax",
    "MSEObserver": "mse",
    "AvgMSEObserver": "avg_mse",
    "MSEFastObserver": "mse",
    "AvgMSEFastObserver": "avg_mse",
    "SignAvgMSEFastObserver": "avg_mse",
    "PCTObserver": "percentile",
}

METHOD_PRESETS = {
    "minmax": "per-tensor min-max ranges, no reconstruction",
    "brecq": "block reconstruction with AdaRound, no dropping (drop_prob 1.0)",
    "qdrop": "block reconstruction with QDrop (drop_prob 0.5)",
    "ptq4sam": "QDrop + bimodal integration (BIG) + adaptive-granularity softmax (AGQ)",
    "ahcptq": "PTQ4SAM + hybrid log-uniform (HLUQ) + channel-aware grouping (CAG)",
    "saqsam": "PTQ4SAM + perceptual-consistency clipping (PCC) + prompt-aware reconstruction (PAR)",
    "ahcqsam": "AHCPTQ + condition-number reduction (ACNR) + log-nonlinear softmax (LNQ)",
}

# SAQ-SAM's clipping candidates (its PCC search list, 29 values)
DEFAULT_PCC_PERCENTILES = (
    0.85, 0.87, 0.88, 0.89, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.965, 0.97, 0.975, 0.98, 0.983,
    0.985, 0.987, 0.989, 0.99, 0.993, 0.995, 0.997, 0.999, 0.9993, 0.9995, 0.9997, 0.9999, 0.99999,
)
_INCLUDE_KEYS = ("base", "root")


class ConfigError(SchemaError):
    """A quantization config is malformed or holds an unknown key or a bad value."""


class ReconUnits(str, enum.Enum):
    """Reconstruction granularity (``recon.units``)."""

    BLOCKS = "blocks"  # attention / MLP sub-blocks: BRECQ, QDrop, PTQ4SAM, AHCPTQ
    LAYERS = "layers"  # whole ViT blocks and whole two-way layers: AHCQ-SAM
    STAGES = "stages"  # encoder stages closed by a global block, whole two-way layers: SAQ-SAM


class CacheDtype(str, enum.Enum):
    """Storage type of the reconstruction cache (``recon.cache_dtype``)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @property
    def torch(self) -> Any:
        import torch

        return getattr(torch, self.value)


class LossAxis(str, enum.Enum):
    """The axis the reconstruction loss sums over (``recon.loss_axis``)."""

    CHANNELS = "channels"  # each unit's declared channel axis (ours)
    AXIS1 = "axis1"  # dim 1 whatever it holds (PTQ4SAM, AHCPTQ, AHCQ-SAM)
    LAST = "last"  # the last dim (SAQ-SAM)


class ACNRError(str, enum.Enum):
    """What ACNR conditions a layer against (``acnr.error``)."""

    ACCUMULATED = "accumulated"  # original float input minus the quantized chain's input (AHCQ-SAM code)
    LOCAL = "local"  # the layer's own input quantization error on the float model


class BigTest(str, enum.Enum):
    """Which key activations BIG's density test sees (``ptq4sam.big_test``)."""

    POOLED = "pooled"  # the first calibration images, all boxes
    FIRST_BOX = "first_box"  # the first box of the first image (PTQ4SAM code)


class _Bad(Exception):
    """Raised by a value check; carries the 'expected ...' phrase for the message."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


# ----------------------------------------------------------------------------------------------- checks
Check = Callable[[Any], Any]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("true or false")
    return v


def _integer(lo: int, hi: int | None = None) -> Check:
    phrase = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"

    def check(v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
            raise _Bad(phrase)
        return v

    return check


def _to_float(v: Any) -> float | None:
    """YAML 1.1 reads '4e-5' as a string; accept it as the number it plainly is."""
    if _is_number(v):
        return float(v)
    if isinstance(v, str):
        try:
            out = float(v)
        except ValueError:
            return None
        return out if out == out and abs(out) != float("inf") else None
    return None


def _real(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> Check:
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    if hi is not None:
        phrase = f"a number in {left}{lo}, {hi}{right}"
    else:
        phrase = f"a number {'>' if lo_open else '>='} {lo}"

    def check(v: Any) -> float:
        x = _to_float(v)
        if x is None or x < lo or (lo_open and x == lo):
            raise _Bad(phrase)
        if hi is not None and (x > hi or (hi_open and x == hi)):
            raise _Bad(phrase)
        return x

    return check


def _enum(cls: type[enum.Enum]) -> Check:
    """A string spelling one of ``cls``'s values, read as that member."""
    phrase = "one of " + ", ".join(m.value for m in cls)

    def check(v: Any) -> enum.Enum:
        try:
            return cls(v)
        except ValueError:
            raise _Bad(phrase) from None

    return check


def _choice(allowed: Sequence[str], aliases: dict[str, str] | None = None) -> Check:
    aliases = aliases or {}
    names = list(allowed) + sorted(aliases)
    phrase = "one of " + ", ".join(names)

    def check(v: Any) -> str:
        if isinstance(v, str) and v in allowed:
            return v
        if isinstance(v, str) and v in aliases:
            return aliases[v]
        raise _Bad(phrase)

    return check


def _optional(inner: Check) -> Check:
    def check(v: Any) -> Any:
        if v is None:
            return None
        try:
            return inner(v)
        except _Bad as bad:
            raise _Bad(f"null or {bad.expected}") from None

    return check


def _seq(inner: Check, what: str, min_len: int = 1, increasing: bool = False) -> Check:
    phrase = f"a list of {what}" + (" in strictly increasing order" if increasing else "")
    phrase += f" with at least {min_len} entries" if min_len > 1 else ""

    def check(v: Any) -> tuple:
        if not isinstance(v, (list, tuple)) or len(v) < min_len:
            raise _Bad(phrase)
        try:
            out = tuple(inner(x) for x in v)
        except _Bad:
            raise _Bad(phrase) from None
        if increasing and any(b <= a for a, b in zip(out, out[1:])):
            raise _Bad(phrase)
        return out

    return check


def _calibrate(v: Any) -> int | tuple[int, int]:
    """An image count, or AHCQ-SAM's SAM2 ``{sample: videos, frame: frames per video}``."""
    if isinstance(v, dict):
        count = _integer(1)
        if set(v) != {"sample", "frame"}:
            raise _Bad("an integer >= 1, or {sample: videos >= 1, frame: frames per video >= 1}")
        try:
            return count(v["sample"]), count(v["frame"])
        except _Bad:
            raise _Bad("an integer >= 1, or {sample: videos >= 1, frame: frames per video >= 1}") from None
    try:
        return _integer(1)(v)
    except _Bad:
        raise _Bad("an integer >= 1, or {sample: videos >= 1, frame: frames per video >= 1}") from None


def _name(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", v):
        raise _Bad("a name made of letters, digits, '_', '-' or '.'")
    return v


def _pattern(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise _Bad("a non-empty module-name pattern string")
    return v


def _opt(default: Any, check: Check, key: str | None = None) -> Any:
    """A dataclass field whose YAML value is validated by ``check``; ``key`` is its YAML spelling."""
    return field(default=default, metadata={"check": check, "key": key})


def _section(cls: type) -> Any:
    """A nested-mapping field parsed into ``cls``."""
    return field(default_factory=cls, metadata={"section": cls})


# --------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class QSpecConfig:
    """One quantizer recipe (reference keys ``quantizer, observer, bit, symmetric, ch_axis``).

    ``ch_axis`` -1 means per-tensor; ``groups`` (ours) fixes a channel-group count for grouped quantizers.
    """

    bit: int = _opt(None, _integer(2, 8))
    quantizer: str = _opt("lsq", _choice(QUANTIZERS, QUANTIZER_ALIASES))
    observer: str = _opt("avg_minmax", _choice(OBSERVERS, OBSERVER_ALIASES))
    symmetric: bool = _opt(False, _boolean)
    ch_axis: int = _opt(-1, _integer(-1))
    groups: int | None = _opt(None, _optional(_integer(1)))


_FRACTIONS = _seq(_real(0.0, 1.0, lo_open=True, hi_open=True), "numbers in (0, 1)", increasing=True)
_WEIGHT_DEFAULTS = {"quantizer": "adaround", "observer": "mse", "ch_axis": 0}


@dataclass(frozen=True)
class EarlyStopConfig:
    """End a reconstruction unit's warm-up when its smoothed loss has not improved by the fraction
    ``min_delta`` of its best value for ``patience`` steps (losses of units differ by orders of magnitude)."""

    patience: int = _opt(500, _integer(1))
    min_delta: float = _opt(0.0, _real(0.0, 1.0, hi_open=True))


@dataclass(frozen=True)
class ReconConfig:
    """Block reconstruction: reference ``recon.*`` plus ``enabled``, ``units``, ``early_stop``, ``qdrop``,
    ``cache_dtype``, ``act_quant``, ``loss_axis``.

    ``drop_prob`` is the probability that an element stays *quantized* (1.0 = BRECQ, no dropping); QDrop
    dropping happens only when ``qdrop`` is true and ``drop_prob < 1``. ``cache_dtype``: float16/bfloat16
    halves the cached unit inputs and outputs (memory and spill to disk) at that type's precision.
    ``units``: ``blocks`` (attention / MLP sub-blocks: BRECQ, QDrop, PTQ4SAM, AHCPTQ), ``layers`` (whole ViT
    blocks and whole two-way layers: AHCQ-SAM), ``stages`` (SAQ-SAM). ``act_quant: false`` reconstructs
    with the activations in float, only the weights quantized (the references' ``--brecq``).
    ``loss_axis``: the axis the squared error is summed over, ``channels`` (each unit's channel axis; ours)
    or the references' fixed ``axis1`` (PTQ4SAM, AHCPTQ, AHCQ-SAM) or ``last`` (SAQ-SAM).
    The references' ``keep_gpu`` is accepted with a warning (``dialects``): the cache lives in host memory.
    """

    enabled: bool = _opt(True, _boolean)
    batch_size: int = _opt(1, _integer(1))
    scale_lr: float = _opt(4e-5, _real(0.0, lo_open=True))
    weight_lr: float = _opt(1e-3, _real(0.0, lo_open=True))
    warm_up: float = _opt(0.2, _real(0.0, 1.0))
    weight: float = _opt(0.01, _real(0.0))
    iters: int = _opt(20000, _integer(0))
    iters_cams: int = _opt(2000, _integer(0), key="iters_CAMS")
    b_range: tuple[float, float] = _opt((20.0, 2.0), _seq(_real(0.0, lo_open=True), "2 positive numbers", 2))
    round_mode: str = _opt("learned_hard_sigmoid", _choice(("learned_hard_sigmoid",)))
    drop_prob: float = _opt(0.5, _real(0.0, 1.0))
    units: ReconUnits = _opt(ReconUnits.BLOCKS, _enum(ReconUnits))
    early_stop: EarlyStopConfig | None = field(default=None, metadata={"section": EarlyStopConfig})
    qdrop: bool = _opt(True, _boolean)
    cache_dtype: CacheDtype = _opt(CacheDtype.FLOAT32, _enum(CacheDtype))
    act_quant: bool = _opt(True, _boolean)
    loss_axis: LossAxis = _opt(LossAxis.CHANNELS, _enum(LossAxis))

    @property
    def dropping(self) -> bool:
        """Whether QDrop mixes float and quantized values during reconstruction."""
        return self.enabled and self.qdrop and self.drop_prob < 1.0


@dataclass(frozen=True)
class PTQ4SAMConfig:
    """PTQ4SAM switches: bimodal integration (BIG) and adaptive-granularity softmax (AGQ).

    ``big_test`` (ours): the density test runs on the key activations ``pooled`` over the first calibration
    images, or on the ``first_box`` of the first image as the reference does.
    """

    big: bool = _opt(False, _boolean, key="BIG")
    agq: bool = _opt(False, _boolean, key="AGQ")
    global_num: int = _opt(128, _integer(8))
    peak_distance: int = _opt(32, _integer(1))
    peak_height: float = _opt(0.01, _real(0.0, 1.0))
    threshold: float = _opt(0.5, _real(0.0, 1.0, lo_open=True, hi_open=True))
    big_test: BigTest = _opt(BigTest.POOLED, _enum(BigTest))


@dataclass(frozen=True)
class AHCPTQConfig:
    """AHCPTQ switches: channel-aware grouping (CAG, ``group`` final groups) and hybrid log-uniform (HLUQ)."""

    cag: bool = _opt(False, _boolean)
    group: int = _opt(4, _integer(1))
    hluq: bool = _opt(False, _boolean)


@dataclass(frozen=True)
class ACNRConfig:
    """Activation-aware condition-number reduction of Linear weights (AHCQ-SAM).

    ``error``: ``accumulated`` (the AHCQ-SAM code: original float input minus the quantized chain's input,
    layer by layer) or ``local`` (each layer's own input quantization error on the float model).
    ``beta`` weighs the error energy pooled over all tokens; the AHCQ-SAM code writes 0.001 but sums that
    energy twice, so its effective value is the default 0.002.
    """

    enabled: bool = _opt(False, _boolean)
    iters: int = _opt(200, _integer(0))
    lam: float = _opt(0.003, _real(0.0))
    beta: float = _opt(0.002, _real(0.0))
    energy: float = _opt(0.8, _real(0.0, 1.0, lo_open=True))
    min_cond: float = _opt(100.0, _real(1.0))
    target: SpectrumTarget = _opt(SpectrumTarget.MEAN, _enum(SpectrumTarget))
    calib: int = _opt(32, _integer(1))
    error: ACNRError = _opt(ACNRError.ACCUMULATED, _enum(ACNRError))


@dataclass(frozen=True)
class LNQConfig:
    """Log-nonlinear quantization of post-softmax attention; ``alphas`` are the searched curvatures.
    ``error_p`` (ours as a key): the exponent of the searched error ``mean |(x_hat - x) V|**p``; 2.4 is the
    references', 2 the squared error (``exp/ours/``)."""

    enabled: bool = _opt(False, _boolean)
    alphas: tuple[float, ...] = _opt(LNQ_ALPHAS, _seq(_real(0.0, lo_open=True), "positive numbers"))
    error_p: float = _opt(2.4, _real(1.0, 4.0))


@dataclass(frozen=True)
class AGQConfig:
    """Adaptive-granularity softmax quantizer settings; it is switched on by ``ptq4sam.AGQ``. ``error_p`` as
    in ``lnq``."""

    taus: tuple[int, ...] = _opt((1, 2, 4), _seq(_integer(1, 16), "integers in 1..16", increasing=True))
    error_p: float = _opt(2.4, _real(1.0, 4.0))


@dataclass(frozen=True)
class PCCConfig:
    """Perceptual-consistency clipping; ``threshold`` null takes ``ptq4sam.threshold``. ``passes`` sweeps over
    the four points of each attention (SAQ-SAM: 2, the second with all four quantized)."""

    enabled: bool = _opt(False, _boolean)
    threshold: float | None = _opt(None, _optional(_real(0.0, 1.0, lo_open=True, hi_open=True)))
    percentiles: tuple[float, ...] = _opt(
        DEFAULT_PCC_PERCENTILES, _seq(_real(0.5, 1.0, lo_open=True), "numbers in (0.5, 1]", increasing=True)
    )
    calib: int = _opt(1, _integer(1))
    passes: int = _opt(2, _integer(1))


@dataclass(frozen=True)
class PARConfig:
    """Prompt-aware reconstruction: decoder-layer loss ``beta * (query_weight * rec(queries) + rec(keys)) +
    alpha * par`` (SAQ-SAM weighs the queries 0.01), ``max_prompts`` boxes per image."""

    enabled: bool = _opt(False, _boolean)
    alpha: float = _opt(1.0, _real(0.0))
    beta: float = _opt(1.0, _real(0.0))
    query_weight: float = _opt(0.01, _real(0.0))
    max_prompts: int = _opt(16, _integer(1))


@dataclass(frozen=True)
class AttentionConfig:
    """Attention details (ours): ``rel_pos_float_q`` gives the encoder's relative-position term the float
    query, as SAQ-SAM's encoder attention does, instead of the quantized one."""

    rel_pos_float_q: bool = _opt(False, _boolean)


@dataclass(frozen=True)
class HLUQConfig:
    """HLUQ initial grid: breakpoint fractions of the range x level fractions given to the log region. Ours:
    ``clips``, the fractions of the range its top is searched at (``[1.0]``: the reference's min-max top),
    and ``uniform_candidate``, which also tries uniform grids as degenerate HLUQs (``HLUQuantizer``); the
    defaults are the reference's, ``exp/ours/`` turns both on."""

    range_splits: tuple[float, ...] = _opt((0.1, 0.3, 0.5), _FRACTIONS)
    level_splits: tuple[float, ...] = _opt((0.125, 0.25, 0.5), _FRACTIONS)
    clips: tuple[float, ...] = _opt((1.0,), _seq(_real(0.0, 1.0, lo_open=True), "numbers in (0, 1]"))
    uniform_candidate: bool = _opt(False, _boolean)


@dataclass(frozen=True)
class CAGConfig:
    """Channel-aware grouping schedule; ``groups`` null takes ``ahcptq.group``. ``group_range`` (ours): a
    group's range is the ``envelope`` of its members' ranges, or their ``mean`` (the reference's rule, which
    clips the wider members of every group). ``operands`` (ours): CAG also on the q and k operands of every
    decoder attention, each group one per-tensor sub-product of ``q·kᵀ`` as for a Linear's input."""

    groups: int | None = _opt(None, _optional(_integer(1)))
    group_range: GroupRange = _opt(GroupRange.ENVELOPE, _enum(GroupRange))
    regroup_fractions: tuple[float, ...] = _opt((0.2, 0.4, 0.6, 0.8), _FRACTIONS)
    apply_to_weights: bool = _opt(False, _boolean)
    weight_groups: int = _opt(32, _integer(1))
    operands: bool = _opt(False, _boolean)


@dataclass(frozen=True)
class MixedConfig:
    """Float fallback and mixed precision (ours; ``ahcq.quantization.mixed``) from ``sensitivity``, a
    ``tools/sensitivity.py`` results.json (relative to the YAML that names it): ``float_sites`` most sensitive
    sites stay float; ``bits`` are the widths allocated per site under ``budget`` (``average_bits`` |
    ``bops``) at ``budget_bits`` equivalent uniform bits. ``allocation`` is derived when the config loads."""

    sensitivity: str | None = _opt(None, _optional(_pattern))
    float_sites: int = _opt(0, _integer(0))
    bits: tuple[int, ...] = _opt((), _seq(_integer(2, 8), "bit widths in 2..8", min_len=0, increasing=True))
    budget: Budget = _opt(Budget.AVERAGE_BITS, _enum(Budget))
    budget_bits: float = _opt(5.0, _real(2.0, 32.0))
    allocation: Allocation | None = None


@dataclass(frozen=True)
class OverrideConfig:
    """Per-module override: modules whose name matches ``pattern`` stay float or take partial recipes."""

    pattern: str
    act: tuple[tuple[str, Any], ...] = ()
    weight: tuple[tuple[str, Any], ...] = ()
    keep_float: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pattern": self.pattern}
        if self.keep_float:
            out["float"] = True
        if self.act:
            out["a_qconfig"] = dict(self.act)
        if self.weight:
            out["w_qconfig"] = dict(self.weight)
        return out


@dataclass(frozen=True)
class QConfig:
    """A fully resolved quantization config. ``source`` is the file it was loaded from."""

    a_qconfig: QSpecConfig
    w_qconfig: QSpecConfig
    source: str = "<dict>"
    method: str | None = _opt(None, _optional(_name))
    seed: int = _opt(0, _integer(0))
    calibrate: int = _opt(32, _calibrate)
    float16_weights: bool = _opt(False, _boolean)
    encoder_a_qconfig: QSpecConfig | None = None
    encoder_w_qconfig: QSpecConfig | None = None
    decoder_a_qconfig: QSpecConfig | None = None
    decoder_w_qconfig: QSpecConfig | None = None
    recon: ReconConfig = _section(ReconConfig)
    ptq4sam: PTQ4SAMConfig = _section(PTQ4SAMConfig)
    ahcptq: AHCPTQConfig = _section(AHCPTQConfig)
    acnr: ACNRConfig = _section(ACNRConfig)
    lnq: LNQConfig = _section(LNQConfig)
    agq: AGQConfig = _section(AGQConfig)
    pcc: PCCConfig = _section(PCCConfig)
    par: PARConfig = _section(PARConfig)
    hluq: HLUQConfig = _section(HLUQConfig)
    cag: CAGConfig = _section(CAGConfig)
    attention: AttentionConfig = _section(AttentionConfig)
    mixed: MixedConfig = _section(MixedConfig)
    calibrate_frames: int | None = None
    overrides: tuple[OverrideConfig, ...] = ()

    def derived(self) -> dict[str, Any]:
        """What the config derives from files it names (the ``mixed`` allocation from its sensitivity
        file): part of a run's identity and of its results, beside ``to_dict()``."""
        allocation = self.mixed.allocation
        return {"mixed_allocation": allocation.as_dict()} if allocation is not None else {}

    def to_dict(self) -> dict[str, Any]:
        """The resolved config with YAML spellings; ``parse_qconfig(to_dict())`` gives it back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("source", "calibrate_frames"):
                continue
            value = getattr(self, f.name)
            if f.name == "overrides":
                out[f.name] = [o.to_dict() for o in value]
            elif f.name == "calibrate" and self.calibrate_frames is not None:
                out[f.name] = {"sample": value, "frame": self.calibrate_frames}
            elif value is not None:
                out[f.metadata.get("key") or f.name] = _to_plain(value)
        return out


_SPEC_FIELDS = ("a_qconfig", "w_qconfig", "encoder_a_qconfig", "encoder_w_qconfig",
                "decoder_a_qconfig", "decoder_w_qconfig")


def _to_plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        fields = [f for f in dataclasses.fields(value) if f.metadata]  # derived fields are not YAML keys
        return {f.metadata.get("key") or f.name: _to_plain(getattr(value, f.name)) for f in fields}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


# ------------------------------------------------------------------------------------------------ parser
class _Ctx:
    """Error context: which file each dotted key came from (includes merge several files)."""

    def __init__(self, origins: dict[str, str], default_file: str) -> None:
        self.origins = origins
        self.default_file = default_file

    def file_of(self, path: str) -> str:
        while path:
            if path in self.origins:
                return self.origins[path]
            path = path.rpartition(".")[0]
        return self.default_file

    def error(self, path: str, message: str) -> ConfigError:
        where = f"{path}: " if path else ""
        return ConfigError(f"{self.file_of(path)}: {where}{message}")

    def bad_value(self, path: str, value: Any, expected: str) -> ConfigError:
        return bad_value(self.file_of(path), path, value, expected, ConfigError)


def _yaml_keys(cls: type) -> dict[str, dataclasses.Field]:
    return {f.metadata.get("key") or f.name: f for f in dataclasses.fields(cls) if f.metadata}


def _require_mapping(ctx: _Ctx, path: str, data: Any) -> dict:
    return require_mapping(ctx.file_of(path), path, data, ConfigError)


def _check_known(ctx: _Ctx, path: str, data: dict, allowed: Sequence[str]) -> None:
    check_keys(ctx.file_of(path), path, data, allowed, ConfigError)


def _parse_fields(cls: type, data: Any, ctx: _Ctx, path: str) -> dict[str, Any]:
    """Validate ``data`` against ``cls``'s field checks; returns {field name: value} for the keys given."""
    data = _require_mapping(ctx, path, data)
    keys = _yaml_keys(cls)
    _check_known(ctx, path, data, list(keys))
    out: dict[str, Any] = {}
    for key, value in data.items():
        f = keys[key]
        where = f"{path}.{key}"
        if "section" in f.metadata:
            out[f.name] = None if value is None else _parse_section(f.metadata["section"], value, ctx, where)
            continue
        try:
            out[f.name] = f.metadata["check"](value)
        except _Bad as bad:
            raise ctx.bad_value(where, value, bad.expected) from None
    return out


def _parse_section(cls: type, data: Any, ctx: _Ctx, path: str) -> Any:
    if data is None:
        data = {}
    return cls(**_parse_fields(cls, data, ctx, path))


def _parse_spec(data: Any, ctx: _Ctx, path: str, weight: bool) -> QSpecConfig:
    values = _parse_fields(QSpecConfig, data, ctx, path)
    if "bit" not in values or values["bit"] is None:
        raise ctx.error(f"{path}.bit", "missing; expected an integer in 2..8")
    if weight:
        values = {**_WEIGHT_DEFAULTS, **values}
    if values.get("groups") is not None and values.get("quantizer") != "cag":
        raise ctx.bad_value(f"{path}.groups", values["groups"], "null unless the quantizer is cag")
    return QSpecConfig(**values)


def _parse_override(data: Any, ctx: _Ctx, path: str) -> OverrideConfig:
    data = _require_mapping(ctx, path, data)
    _check_known(ctx, path, data, ["pattern", "a_qconfig", "w_qconfig", "float"])
    if "pattern" not in data:
        raise ctx.error(f"{path}.pattern", "missing; expected a non-empty module-name pattern string")
    try:
        pattern = _pattern(data["pattern"])
    except _Bad as bad:
        raise ctx.bad_value(f"{path}.pattern", data["pattern"], bad.expected) from None
    keep_float = data.get("float", False)
    if not isinstance(keep_float, bool):
        raise ctx.bad_value(f"{path}.float", keep_float, "true or false")
    act, weight = (
        tuple(sorted(_parse_fields(QSpecConfig, data.get(key, {}), ctx, f"{path}.{key}").items()))
        for key in ("a_qconfig", "w_qconfig")
    )
    if keep_float and (act or weight):
        raise ctx.error(path, "'float: true' cannot be combined with a_qconfig / w_qconfig")
    if not keep_float and not (act or weight):
        raise ctx.error(path, "expected 'float: true' or an a_qconfig / w_qconfig partial")
    return OverrideConfig(pattern=pattern, act=act, weight=weight, keep_float=keep_float)


_TOP_SECTIONS = {f.name: f for f in dataclasses.fields(QConfig) if "section" in f.metadata}
_TOP_SCALARS = {f.name: f for f in dataclasses.fields(QConfig) if "check" in f.metadata}
_TOP_KEYS = [*_SPEC_FIELDS, *_TOP_SCALARS, *_TOP_SECTIONS, "overrides"]


def _build(data: Any, ctx: _Ctx) -> QConfig:
    data = _require_mapping(ctx, "", data) if data is not None else {}
    data = apply_dialect(data, ctx.default_file, ctx.error)
    _check_known(ctx, "", data, _TOP_KEYS)
    values: dict[str, Any] = {}
    for name in _SPEC_FIELDS:
        if data.get(name) is not None:
            values[name] = _parse_spec(data[name], ctx, name, weight=name.endswith("w_qconfig"))
    for name, f in _TOP_SCALARS.items():
        if name in data:
            try:
                values[name] = f.metadata["check"](data[name])
            except _Bad as bad:
                raise ctx.bad_value(name, data[name], bad.expected) from None
    for name, f in _TOP_SECTIONS.items():
        if name in data:
            values[name] = _parse_section(f.metadata["section"], data[name], ctx, name)
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list):
        raise ctx.bad_value("overrides", overrides, "a list of {pattern, a_qconfig, w_qconfig, float}")
    values["overrides"] = tuple(_parse_override(o, ctx, f"overrides.{i}") for i, o in enumerate(overrides))
    for role, split in (("a_qconfig", "encoder_a_qconfig"), ("w_qconfig", "encoder_w_qconfig")):
        if role not in values:
            if split not in values:
                raise ctx.error(role, f"missing; give {role} (or SAQ-SAM's {split}/decoder_* pair)")
            values[role] = values[split]
        elif split in values and values[split] != values[role]:
            raise ctx.error(split, f"differs from {role}; the encoder takes the default recipe, so give one "
                                   f"of the two")
    if isinstance(values.get("calibrate"), tuple):
        values["calibrate"], values["calibrate_frames"] = values["calibrate"]
    values["source"] = ctx.default_file
    return _resolve(QConfig(**values), ctx)


def _resolve(cfg: QConfig, ctx: _Ctx) -> QConfig:
    """Fill cross-section defaults and reject combinations that contradict each other."""
    start, end = cfg.recon.b_range
    if start < end:
        raise ctx.bad_value("recon.b_range", list(cfg.recon.b_range), "[start, end] with start >= end")
    groups = cfg.cag.groups if cfg.cag.groups is not None else cfg.ahcptq.group
    if cfg.cag.groups is not None and cfg.cag.groups != cfg.ahcptq.group and cfg.ahcptq.cag:
        raise ctx.error("cag.groups", f"{cfg.cag.groups} contradicts ahcptq.group = {cfg.ahcptq.group}")
    threshold = cfg.pcc.threshold if cfg.pcc.threshold is not None else cfg.ptq4sam.threshold
    if cfg.par.enabled and cfg.recon.enabled and cfg.recon.units is not ReconUnits.STAGES:
        raise ctx.error("par.enabled", f"prompt-aware reconstruction compares whole stages; it needs "
                                       f"recon.units: stages, not {cfg.recon.units.value!r}")
    levels = 2 ** cfg.a_qconfig.bit
    for g in cfg.hluq.level_splits if cfg.ahcptq.hluq else ():
        n_log = g * levels
        if n_log != int(n_log) or not 2 <= n_log < levels:
            expected = f"fractions g with g * 2**bit an integer in 2..{levels - 1} (bit {cfg.a_qconfig.bit})"
            raise ctx.bad_value("hluq.level_splits", list(cfg.hluq.level_splits), expected)
    return dataclasses.replace(
        cfg,
        cag=dataclasses.replace(cfg.cag, groups=groups),
        pcc=dataclasses.replace(cfg.pcc, threshold=threshold),
        mixed=_resolve_mixed(cfg, ctx),
    )


def _resolve_mixed(cfg: QConfig, ctx: _Ctx) -> MixedConfig:
    """The ``mixed`` section with its allocation solved from the sensitivity file."""
    mixed = cfg.mixed
    wanted = mixed.float_sites > 0 or bool(mixed.bits)
    if mixed.sensitivity is None:
        if wanted:
            raise ctx.error("mixed.sensitivity", "missing; float_sites and bits need a sensitivity file "
                                                 "(tools/sensitivity.py)")
        return mixed
    if not wanted:
        raise ctx.error("mixed.sensitivity", "has no effect without mixed.float_sites or mixed.bits")
    try:
        allocation = allocate(read_sensitivity(mixed.sensitivity), cfg.a_qconfig.bit, mixed.float_sites,
                              mixed.bits, mixed.budget, mixed.budget_bits)
    except ValueError as err:
        raise ctx.error("mixed", str(err)) from None
    return dataclasses.replace(mixed, allocation=allocation)


def schema_keys() -> list[str]:
    """Every YAML key of the schema, dotted (``recon.early_stop.patience``), in declaration order; the
    reference-only keys that ``dialects`` translates are not included."""
    def walk(cls: type, prefix: str) -> list[str]:
        keys = []
        for f in dataclasses.fields(cls):
            if not f.metadata:
                continue
            key = f"{prefix}{f.metadata.get('key') or f.name}"
            keys += walk(f.metadata["section"], f"{key}.") if "section" in f.metadata else [key]
        return keys
    spec = [f"{name}.{key}" for name in _SPEC_FIELDS for key in _yaml_keys(QSpecConfig)]
    return [*spec, *walk(QConfig, ""), "overrides"]


# ------------------------------------------------------------------------------------------------ loading
def _read_yaml(path: Path, shown: str) -> Any:
    return read_yaml(path, shown, ConfigError)


def _merge(base: dict, child: dict, origins: dict[str, str], child_file: str, prefix: str = "") -> dict:
    """Deep-merge ``child`` over ``base`` (mappings merge, everything else replaces), recording origins."""
    out = dict(base)
    for key, value in child.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, origins, child_file, f"{path}.")
        else:
            for stale in [p for p in origins if p == path or p.startswith(f"{path}.")]:
                del origins[stale]
            out[key] = value
        origins[path] = child_file
    return out


def _load_tree(path: Path, shown: str, origins: dict[str, str], chain: tuple[Path, ...]) -> dict:
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"{shown}: include cycle through {' -> '.join(p.name for p in (*chain, resolved))}")
    data = _read_yaml(path, shown)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}: the top level must be a mapping of keys, not {type(data).__name__}")
    includes = [k for k in _INCLUDE_KEYS if k in data]
    if len(includes) > 1:
        raise ConfigError(f"{shown}: {includes[1]}: give only one of 'base' and 'root'")
    mixed = data.get("mixed")
    if isinstance(mixed, dict) and isinstance(mixed.get("sensitivity"), str):  # relative to this file
        data["mixed"] = {**mixed, "sensitivity": str(path.parent / mixed["sensitivity"])}
    merged: dict = {}
    if includes:
        key = includes[0]
        parent = data.pop(key)
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"{shown}: {key}: {parent!r} is not allowed; expected a YAML file path")
        parent_path = path.parent / parent
        parent_shown = str(Path(shown).parent / parent)
        if not parent_path.is_file():
            raise ConfigError(f"{shown}: {key}: included file {parent_shown} not found (relative to {shown})")
        merged = _load_tree(parent_path, parent_shown, origins, (*chain, resolved))
    return _merge(merged, data, origins, shown)


def load_qconfig(path: str | Path) -> QConfig:
    """Load, include-resolve and validate a quantization YAML."""
    shown = str(path)
    origins: dict[str, str] = {}
    data = _load_tree(Path(path), shown, origins, ())
    return _build(data, _Ctx(origins, shown))


def parse_qconfig(data: dict[str, Any], source: str = "<dict>") -> QConfig:
    """Validate an already-loaded mapping (e.g. ``QConfig.to_dict()`` output); no includes."""
    if any(k in data for k in _INCLUDE_KEYS):
        raise ConfigError(f"{source}: base: includes need a file; use load_qconfig")
    return _build(data, _Ctx({}, source))
