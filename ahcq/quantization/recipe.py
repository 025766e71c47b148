"""The one resolver from a ``QConfig`` to quantizer specs.

Every path that builds quantizers from a config goes through here: ``quantize_from_config`` for any model,
and ``quantize_sam`` / ``quantize_sam2`` (which add their role tables as site features). So a config key
reaches every quantizer the same way, whichever model it is applied to.

Precedence for one activation slot (later wins): ``a_qconfig`` (``decoder_a_qconfig`` under the decoder
pattern when a config splits them), the site's feature (``feature_fields``: what a method switch makes of a
role-table row), then the config's own ``overrides``. A recipe that names a quantizer family always takes
that family's settings from the config's method sections (``family_options``).
"""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from . import api
from .config import ConfigError, QConfig, QSpecConfig
from .granularity import ChannelGroups, PerTensor, from_ch_axis
from .mixed import SiteKind, site_patterns
from .quantizers import QUANTIZERS
from .quantizers.agq import AGQOptions
from .quantizers.cag import CAGOptions, GroupRange
from .quantizers.hluq import HLUQOptions
from .quantizers.lnq import LNQOptions

__all__ = [
    "Feature",
    "SiteFields",
    "check_allocation",
    "UserOverrides",
    "decoder_fields",
    "family_options",
    "feature_fields",
    "partial_fields",
    "quantize_from_config",
    "quantize_layers",
    "spec_of",
    "user_overrides",
]

UserOverrides = list[tuple[str, dict[str, Any] | None]]
SiteFields = list[tuple[str, dict[str, Any]]]


class Feature(enum.Enum):
    """What a role-table row asks of the config's method switches for one quantizer slot."""

    UNIFORM = "uniform"  # the activation recipe as it is
    CAG = "cag"  # channel-aware grouping when ahcptq.cag
    CAG_OPERAND = "cag_operand"  # channel-aware grouping of an attention's q or k when cag.operands too
    HLUQ = "hluq"  # hybrid log-uniform when ahcptq.hluq
    AGQ_SOFTMAX = "agq_softmax"  # AGQ when ptq4sam.AGQ
    LNQ_SOFTMAX = "lnq_softmax"  # LNQ when lnq.enabled, else AGQ when ptq4sam.AGQ
    BIG_KEY = "big_key"  # an attention key: PTQ4SAM's MSE range search when ptq4sam.BIG


BIG_KEY_OBSERVER = "avg_mse"  # PTQ4SAM's SignAvgMSEFastObserver (its sign is never set: AvgMSEFast)


_OPTIONS: dict[type, Callable[[QConfig], Any]] = {
    HLUQOptions: lambda c: HLUQOptions(range_splits=c.hluq.range_splits, level_splits=c.hluq.level_splits,
                                       clips=c.hluq.clips, uniform_candidate=c.hluq.uniform_candidate),
    LNQOptions: lambda c: LNQOptions(alphas=c.lnq.alphas, error_p=c.lnq.error_p),
    AGQOptions: lambda c: AGQOptions(taus=c.agq.taus, error_p=c.agq.error_p),
    CAGOptions: lambda c: CAGOptions(seed=c.seed, group_range=GroupRange(c.cag.group_range)),
}
"""How each family's options dataclass (the family's ``options`` attribute) is filled from a config."""


def family_options(qconfig: QConfig, quantizer: str) -> Any:
    """The options dataclass of the family registered as ``quantizer``, filled from the config's method
    sections (``None`` for families without options)."""
    options = getattr(QUANTIZERS.get(quantizer), "options", None)  # an unknown name is refused when built
    return None if options is None else _OPTIONS[options](qconfig)


def partial_fields(qconfig: QConfig, items: Mapping[str, Any]) -> dict[str, Any]:
    """``QuantSpec`` field updates of a partial YAML recipe (keys ``quantizer, observer, bit, symmetric,
    ch_axis, groups``; unset ones dropped). The reference's ``ch_axis`` becomes a granularity type here and
    nowhere else; naming a family brings that family's options (and CAG's group count) along."""
    fields = {k: v for k, v in items.items() if v is not None}
    out: dict[str, Any] = {}
    for key in ("quantizer", "observer", "symmetric"):
        if key in fields:
            out[key] = fields[key]
    if "bit" in fields:
        out["bits"] = fields["bit"]
    quantizer = fields.get("quantizer")
    if quantizer == "cag" or "groups" in fields:
        out["granularity"] = ChannelGroups(fields.get("groups", qconfig.cag.groups))
    elif "ch_axis" in fields:
        out["granularity"] = from_ch_axis(fields["ch_axis"])
    if quantizer is not None:
        out["options"] = family_options(qconfig, quantizer)
    return out


def spec_of(qconfig: QConfig, recipe: QSpecConfig) -> api.QuantSpec:
    """The ``QuantSpec`` of a full recipe of ``qconfig``."""
    return api.QuantSpec(**partial_fields(qconfig, dataclasses.asdict(recipe)))


def _per_tensor(qconfig: QConfig, quantizer: str) -> dict[str, Any]:
    """Families that are per-tensor and asymmetric by construction (AGQ, LNQ, HLUQ)."""
    return {"quantizer": quantizer, "symmetric": False, "granularity": PerTensor(),
            "options": family_options(qconfig, quantizer)}


def feature_fields(qconfig: QConfig, feature: Feature) -> dict[str, Any]:
    """``QuantSpec`` field updates that ``feature`` takes under ``qconfig``'s method switches ({} = none)."""
    agq = _per_tensor(qconfig, "agq") if qconfig.ptq4sam.agq else {}
    if feature is Feature.UNIFORM:
        return {}
    if feature is Feature.CAG:
        return partial_fields(qconfig, {"quantizer": "cag"}) if qconfig.ahcptq.cag else {}
    if feature is Feature.CAG_OPERAND:
        return feature_fields(qconfig, Feature.CAG) if qconfig.cag.operands else {}
    if feature is Feature.HLUQ:
        return _per_tensor(qconfig, "hluq") if qconfig.ahcptq.hluq else {}
    if feature is Feature.LNQ_SOFTMAX:
        return _per_tensor(qconfig, "lnq") if qconfig.lnq.enabled else agq
    if feature is Feature.AGQ_SOFTMAX:
        return agq
    if feature is Feature.BIG_KEY:
        return {"observer": BIG_KEY_OBSERVER} if qconfig.ptq4sam.big else {}
    raise ValueError(f"unknown feature {feature!r}")


def user_overrides(qconfig: QConfig) -> UserOverrides:
    """The ``mixed`` allocation's per-site widths, then the config's ``overrides`` (which win), as
    ``api.quantize`` takes them (``None`` keeps the match float)."""
    out: UserOverrides = []
    allocation = qconfig.mixed.allocation
    for site, kind, bits in allocation.sites if allocation is not None else ():
        width = partial_fields(qconfig, {"bit": bits}) if bits is not None else None
        slots = {"act": width} if kind is SiteKind.ATTENTION else {"act": width, "weight": width}
        out.append((site_patterns(site, kind), None if bits is None else slots))
    for o in qconfig.overrides:
        partial = {slot: partial_fields(qconfig, dict(items))
                   for slot, items in (("act", o.act), ("weight", o.weight)) if items}
        out.append((o.pattern, None if o.keep_float else partial))
    return out


def check_allocation(model: nn.Module, qconfig: QConfig) -> None:
    """Refuse a ``mixed`` allocation whose sites are not modules of ``model`` (a sensitivity file measured
    on another model would otherwise change nothing)."""
    allocation = qconfig.mixed.allocation
    if allocation is None:
        return
    names = {name for name, _ in model.named_modules()}
    missing = [site for site, _, _ in allocation.sites if site not in names]
    if missing:
        raise ConfigError(f"{qconfig.source}: mixed.sensitivity {qconfig.mixed.sensitivity}: sites not in "
                          f"this model: {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def decoder_fields(qconfig: QConfig) -> dict[str, dict[str, Any]]:
    """SAQ-SAM's separate decoder recipes, where they differ from the default ones (full specs as fields)."""
    split = {"act": (qconfig.decoder_a_qconfig, qconfig.a_qconfig),
             "weight": (qconfig.decoder_w_qconfig, qconfig.w_qconfig)}
    return {slot: partial_fields(qconfig, dataclasses.asdict(dec)) for slot, (dec, default) in split.items()
            if dec is not None and dec != default}


def quantize_layers(
    model: nn.Module, qconfig: QConfig, sites: SiteFields = (), skip: Iterable[str] = (),
    decoder_pattern: str | None = None,
) -> tuple[nn.Module, api.QuantSpec, api.QuantSpec]:
    """Swap ``model``'s Linear/Conv2d layers (``api.quantize``) following ``qconfig``; ``sites`` are
    ``(pattern, input-slot field updates)`` from a role table, ``skip`` patterns stay float.

    Returns the quantized model (a bare Linear/Conv2d is replaced, not changed in place) and the activation
    recipes for slots the generic API does not know (attention twins): the default one and the decoder's
    (the same unless the config splits them).
    """
    act, weight = spec_of(qconfig, qconfig.a_qconfig), spec_of(qconfig, qconfig.w_qconfig)
    decoder = decoder_fields(qconfig)
    if decoder and decoder_pattern is None:
        raise ConfigError(f"{qconfig.source}: decoder_*_qconfig differs from the default recipe; "
                          "pass decoder_pattern to say which modules it applies to")
    overrides: UserOverrides = [(decoder_pattern, decoder)] if decoder else []
    overrides += [(pattern, {"act": fields}) for pattern, fields in sites if fields]
    model = api.quantize(model, act=act, weight=weight, overrides=overrides + user_overrides(qconfig),
                         skip=list(skip))
    return model, act, act.updated(decoder["act"], "decoder_a_qconfig") if "act" in decoder else act


def quantize_from_config(model: nn.Module, qconfig: QConfig, skip: Sequence[str] = (),
                         decoder_pattern: str | None = None) -> nn.Module:
    """Swap ``model``'s Linear/Conv2d layers for quantized ones following ``qconfig``; returns the model.

    ``decoder_pattern`` names the modules that take SAQ-SAM's ``decoder_*_qconfig`` when a config gives a
    split encoder/decoder recipe that differs from the default one.
    """
    return quantize_layers(model, qconfig, skip=skip, decoder_pattern=decoder_pattern)[0]
