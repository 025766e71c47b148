"""The reference repositories' YAML layouts, read as their code reads them.

An ``ahcqsam:`` section is always read as AHCQ-SAM's code reads it (below). A YAML without a ``method:`` key
is a reference file; its layout says whose: an ``ahcqsam:`` section is
AHCQ-SAM's, split ``encoder_*`` / ``decoder_*`` recipes are SAQ-SAM's, an ``ahcptq:`` section AHCPTQ's and a
``ptq4sam:`` section PTQ4SAM's. ``apply_dialect`` rewrites such a file into our keys, before validation:

* everywhere: no ``recon:`` section means no reconstruction (the references run it only
  ``if hasattr(q_config, 'recon')``); ``recon.keep_gpu`` (where the references keep their cache) is accepted
  with a warning and dropped;
* AHCQ-SAM: ``ahcqsam: {acnr, k, cag, group, hluq, lnq}`` becomes ``acnr.enabled``, ``acnr.iters``,
  ``ahcptq.{cag, group, hluq}`` and ``lnq.enabled``; its SAM files (``calibrate`` an image count) reconstruct
  whole ViT blocks and whole two-way layers (``recon.units: layers``), its SAM2 files (``calibrate: {sample,
  frame}``) the sub-blocks of its SAM2 code (``blocks``);
* SAQ-SAM: what its script's default flags add (``--recon_unit per_stage``, ``--recon_encoder CAMS``,
  ``--recon_decoder CLM``, ``--CAM_loss PAR``): stage units with PAR, float query in the encoder's
  relative-position term; its code adds no rounding regulariser and trains the rounding at Adam's default
  rate, so ``recon.weight`` / ``recon.weight_lr`` are inert there and are ignored here with a warning that
  names them. PCC (``--FFC``) is ``pcc.enabled: true`` (``exp/saqsam/`` has it on).

A key the file sets itself is never overridden, except the inert SAQ-SAM keys above.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["AHCQSAM_KEYS", "ConfigWarning", "apply_dialect", "dialect_of"]

AHCQSAM_KEYS = ("acnr", "k", "cag", "group", "hluq", "lnq")
SPLIT_KEYS = ("encoder_a_qconfig", "encoder_w_qconfig", "decoder_a_qconfig", "decoder_w_qconfig")
SAQ_ADAM_LR = 1e-3  # SAQ-SAM builds the rounding optimiser without a learning rate: torch's default

Fail = Callable[[str, str], Exception]


class ConfigWarning(UserWarning):
    """A config key is accepted for compatibility but does not do what its name says here."""


def dialect_of(data: dict[str, Any]) -> str | None:
    """The reference method whose layout ``data`` has, or ``None`` (our layout, or no method section)."""
    if "method" in data:
        return None
    if "ahcqsam" in data:
        return "ahcqsam"
    if any(k in data for k in SPLIT_KEYS):
        return "saqsam"
    if "ahcptq" in data:
        return "ahcptq"
    if "ptq4sam" in data:
        return "ptq4sam"
    return None


def _fill(data: dict[str, Any], section: str, values: dict[str, Any]) -> None:
    """Set ``section.key`` for every key the file does not set itself."""
    current = data.get(section)
    current = dict(current) if isinstance(current, dict) else ({} if current is None else current)
    if not isinstance(current, dict):
        return  # not a mapping: validation names it
    for key, value in values.items():
        current.setdefault(key, value)
    data[section] = current


def _translate_ahcqsam(data: dict[str, Any], fail: Fail) -> None:
    """``ahcqsam:`` -> our sections; a value contradicting the same setting given in our keys is refused."""
    section = data.pop("ahcqsam")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise fail("ahcqsam", f"{section!r} is not allowed; expected a mapping of {', '.join(AHCQSAM_KEYS)}")
    for key in section:
        if key not in AHCQSAM_KEYS:
            raise fail(f"ahcqsam.{key}", f"unknown key {key!r}; allowed keys: {', '.join(AHCQSAM_KEYS)}")
    targets = {"acnr": ("acnr", "enabled"), "k": ("acnr", "iters"), "cag": ("ahcptq", "cag"),
               "group": ("ahcptq", "group"), "hluq": ("ahcptq", "hluq"), "lnq": ("lnq", "enabled")}
    for key, value in section.items():
        target, field = targets[key]
        current = data.get(target)
        if isinstance(current, dict) and field in current and current[field] != value:
            raise fail(f"ahcqsam.{key}", f"{value!r} contradicts {target}.{field} = {current[field]!r}")
        _fill(data, target, {field: value})


def _saqsam_inert(data: dict[str, Any], source: str) -> None:
    recon = data.get("recon")
    if not isinstance(recon, dict):
        return
    inert = {"weight": 0.0, "weight_lr": SAQ_ADAM_LR}
    for key, value in inert.items():
        if key in recon and recon[key] != value:
            warnings.warn(f"{source}: recon.{key} {recon[key]!r} is inert in SAQ-SAM's code (no rounding "
                          f"regulariser; the rounding trains at Adam's default rate) and is ignored here as "
                          f"well (using {value}); add 'method: saqsam' to the file to use it",
                          ConfigWarning, stacklevel=4)
        recon[key] = value


def _drop_keep_gpu(data: dict[str, Any], source: str) -> None:
    recon = data.get("recon")
    if isinstance(recon, dict) and "keep_gpu" in recon:
        data["recon"] = {k: v for k, v in recon.items() if k != "keep_gpu"}
        warnings.warn(f"{source}: recon.keep_gpu is accepted for the reference configs and has no effect: "
                      f"the reconstruction cache is held in host memory (spilled to disk past its budget)",
                      ConfigWarning, stacklevel=4)


def apply_dialect(data: dict[str, Any], source: str, fail: Fail) -> dict[str, Any]:
    """``data`` (a merged YAML mapping) in our keys, read as its reference code reads it."""
    data = dict(data)
    dialect = dialect_of(data)
    if "recon" not in data:
        data["recon"] = {"enabled": False}
    _drop_keep_gpu(data, source)
    if "ahcqsam" in data:
        _translate_ahcqsam(data, fail)
    if dialect is None:
        return data
    data["method"] = dialect
    if dialect == "ahcqsam":
        video = isinstance(data.get("calibrate"), dict)
        _fill(data, "recon", {"units": "blocks" if video else "layers"})
    elif dialect == "saqsam":
        _fill(data, "recon", {"units": "stages"})
        _fill(data, "par", {"enabled": True})
        _fill(data, "attention", {"rel_pos_float_q": True})
        _saqsam_inert(data, source)
    return data
