"""What decides the result of a reconstruction: ``ReconSettings``, stored with a resumable state."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ahcq.quantization.config import CacheDtype, LossAxis, QConfig

__all__ = ["ReconSettings"]


@dataclass(frozen=True)
class ReconSettings:
    """The reconstruction recipe the engine runs (``from_qconfig`` reads ``recon.*``, ``cag`` and ``seed``).

    ``drop_prob`` is the probability that an element stays quantized (1.0 = BRECQ, no dropping).
    ``max_items`` / ``chunk_items`` cap and chunk the items (boxes) of each sample.
    """

    iters: int = 20000
    batch_size: int = 1
    weight_lr: float = 1e-3
    scale_lr: float = 4e-5
    warm_up: float = 0.2
    weight: float = 0.01
    b_range: tuple[float, float] = (20.0, 2.0)
    drop_prob: float = 1.0
    regroup_fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    patience: int | None = None
    min_delta: float = 0.0
    seed: int = 0
    max_items: int | None = None
    chunk_items: int | None = None
    cache_dtype: CacheDtype = CacheDtype.FLOAT32
    act_quant: bool = True
    loss_axis: LossAxis = LossAxis.CHANNELS

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f"ReconSettings: iters and batch_size must be >= 1 (got {self.iters}, "
                             f"{self.batch_size})")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise ValueError(f"ReconSettings: drop_prob must be in [0, 1], got {self.drop_prob}")
        for name, kind in (("cache_dtype", CacheDtype), ("loss_axis", LossAxis)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise ValueError(f"ReconSettings: {name} must be one of {[m.value for m in kind]}, got "
                                 f"{getattr(self, name)!r}") from None
        if list(self.regroup_fractions) != sorted(self.regroup_fractions) or not all(
                0 < f < 1 for f in self.regroup_fractions):
            raise ValueError(f"ReconSettings: regroup_fractions must increase inside (0, 1), "
                             f"got {self.regroup_fractions}")

    @classmethod
    def from_qconfig(cls, qconfig: QConfig, **overrides: Any) -> ReconSettings:
        """Settings from a loaded ``QConfig`` (``recon.*``, ``cag.regroup_fractions``, ``seed``)."""
        r = qconfig.recon
        values = dict(
            iters=r.iters, batch_size=r.batch_size, weight_lr=r.weight_lr, scale_lr=r.scale_lr,
            warm_up=r.warm_up, weight=r.weight, b_range=tuple(r.b_range),
            drop_prob=r.drop_prob if r.dropping else 1.0,
            regroup_fractions=tuple(qconfig.cag.regroup_fractions), seed=qconfig.seed,
            patience=r.early_stop.patience if r.early_stop is not None else None,
            min_delta=r.early_stop.min_delta if r.early_stop is not None else 0.0,
            cache_dtype=r.cache_dtype, act_quant=r.act_quant, loss_axis=r.loss_axis,
        )
        values.update(overrides)
        return cls(**values)

    @property
    def float_p(self) -> float:
        """QDrop probability that an element stays float (the quantizers' ``drop_p``)."""
        return 1.0 - self.drop_prob

    def as_dict(self) -> dict[str, Any]:
        """Plain values (enums by value, tuples as lists): what a saved state records and compares."""
        out = {}
        for key, value in self.__dict__.items():
            value = value.value if isinstance(value, (CacheDtype, LossAxis)) else value
            out[key] = list(value) if isinstance(value, tuple) else value
        return out
