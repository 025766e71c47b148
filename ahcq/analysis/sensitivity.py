"""Per-site sensitivity of a quantized SAM: how much each quantizer site alone costs, and how much the fully
quantized model gains when that site alone goes back to float.

A site is the set of quantizers one module owns (a ``QuantLinear``/``QuantConv2d``: input, weight, output;
an attention twin: q, k, v, prob), or one quantizer (``granularity="quantizer"``). A site "in float" has its
quantizers off and, for a layer, its original float weight (``QuantLayer.float_reference``: a transform such
as ACNR changed the weight the quantizers see). Each measurement runs the model on the evaluation images with
their ground-truth boxes as prompts and scores

- ``error``: the mean squared error of the mask decoder's low-resolution mask probabilities (sigmoid of its
  logits) against the float model's: bounded, so a background logit moving from -20 to -40 (no change in
  the mask) does not swamp the changes that move a mask's boundary;
- ``mask_ap``: COCO mask AP x 100 of the predicted masks (pycocotools), scored by SAM's predicted IoU.

``macs`` (multiply-accumulates per evaluation image: a layer's ``out x fan_in``, an attention's ``q k^T`` and
``attn v``) weighs a site in the mixed-precision budgets (``ahcq.quantization.mixed``).
"""
from __future__ import annotations

import contextlib
import copy
import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from ahcq.analysis import Sample
from ahcq.data.coco_io import mask_bbox, mask_to_rle
from ahcq.models.sam_runner import decode_boxes, encode, prepare_image
from ahcq.progress import progress_bar
from ahcq.quantization.api import iter_quantizers, quantization_disabled
from ahcq.quantization.layers import QuantLayer
from ahcq.quantization.mixed import SiteKind
from ahcq.quantization.quantizers import Mode, Quantizer

__all__ = ["Evaluation", "Evaluator", "Site", "SiteGranularity", "measure_sites", "model_macs",
           "quantizer_sites"]

logger = logging.getLogger(__name__)


@dataclass
class Site:
    """One measured site: its name (a module path, or a quantizer's for quantizer granularity), its
    quantizers, the layer it belongs to (``None`` for an attention twin's slots) and its MACs per image."""

    name: str
    quantizers: list[Quantizer]
    layer: QuantLayer | None
    kind: SiteKind
    macs: float = 0.0
    bits: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Evaluation:
    """Output error against the float model and mask AP x 100 of one model state."""

    error: float
    mask_ap: float


class SiteGranularity(str, enum.Enum):
    """What one site is: every quantizer of one module, or one quantizer."""

    LAYER = "layer"
    QUANTIZER = "quantizer"


def quantizer_sites(model: nn.Module, granularity: SiteGranularity = SiteGranularity.LAYER) -> list[Site]:
    """The sites of ``model`` in module order: one per owning module, or one per quantizer."""
    modules = dict(model.named_modules())
    sites: dict[str, Site] = {}
    for name, q in iter_quantizers(model):
        owner_name = name.rpartition(".")[0]
        owner = modules[owner_name]
        layer = owner if isinstance(owner, QuantLayer) else None
        key = owner_name if granularity is SiteGranularity.LAYER else name
        kind = SiteKind.LAYER if layer is not None else SiteKind.ATTENTION
        site = sites.setdefault(key, Site(key, [], layer, kind))
        site.quantizers.append(q)
        site.bits = sorted({*site.bits, q.bits})
    return list(sites.values())


def model_macs(model: nn.Module, sites: Sequence[Site], run: Callable[[], None]) -> None:
    """Fill every site's MACs per ``run()`` (one evaluation image): a layer counts ``output elements x
    fan-in``; an attention twin ``2 x elements(prob) x head dim`` from its prob quantizer's call."""
    counts: dict[int, float] = {}
    handles = []
    owners = {id(s.layer): s for s in sites if s.layer is not None}

    def layer_hook(module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        fan_in = module.weight[0].numel()
        counts[id(module)] = counts.get(id(module), 0.0) + out.numel() * fan_in

    def prob_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        value = kwargs.get("value")
        if value is not None:
            counts[id(module)] = counts.get(id(module), 0.0) + 2.0 * args[0].numel() * value.shape[-1]

    for name, module in model.named_modules():
        if id(module) in owners:
            handles.append(module.register_forward_hook(layer_hook))
        elif name.endswith("prob_quantizer"):
            handles.append(module.register_forward_pre_hook(prob_hook, with_kwargs=True))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    for site in sites:
        if site.layer is not None:
            site.macs = counts.get(id(site.layer), 0.0)
        else:
            site.macs = sum(counts.get(id(q), 0.0) for q in site.quantizers)


class Evaluator:
    """Runs the model on the evaluation samples and scores it against the float model and the ground truth.

    The float logits are taken once, at construction, with every quantizer off and every layer's float
    reference weight.
    """

    def __init__(self, sam: nn.Module, samples: Sequence[Sample], max_boxes: int) -> None:
        self.sam, self.samples, self.max_boxes = sam, list(samples), max_boxes
        self.categories = [s.categories[:max_boxes] for s in self.samples]
        self._gt = self._ground_truth()
        with quantization_disabled(sam):
            self.float_logits = [logits for logits, _, _ in self._run()]

    def _ground_truth(self) -> COCO:
        images, anns = [], []
        for sample, cats in zip(self.samples, self.categories):
            h, w = sample.image.shape[:2]
            images.append({"id": sample.image_id, "height": h, "width": w})
            for mask, cat in zip(sample.masks[:self.max_boxes], cats):
                anns.append({"id": len(anns) + 1, "image_id": sample.image_id, "category_id": int(cat),
                             "segmentation": mask_to_rle(mask), "area": float(mask.sum()),
                             "bbox": mask_bbox(mask),
                             "iscrowd": 0})
        coco = COCO()
        coco.dataset = {"images": images, "annotations": anns,
                        "categories": [{"id": int(c)} for c in sorted({int(c) for cs in self.categories
                                                                        for c in cs})]}
        with contextlib.redirect_stdout(None):
            coco.createIndex()
        return coco

    def _run(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(low-res logits, masks, predicted IoU)`` per sample."""
        captured: list[torch.Tensor] = []
        handle = self.sam.mask_decoder.register_forward_hook(
            lambda _m, _a, out: captured.append(out[0].detach().float().cpu()))
        try:
            with torch.no_grad():
                for sample in self.samples:
                    captured.clear()
                    image = prepare_image(self.sam, sample.image)
                    boxes = torch.from_numpy(sample.boxes[:self.max_boxes])
                    masks, iou = decode_boxes(self.sam, encode(self.sam, image), image, boxes)
                    yield torch.cat(captured), masks, iou
        finally:
            handle.remove()

    def __call__(self) -> Evaluation:
        errors, detections = [], []
        for (logits, masks, iou), ref, sample, cats in zip(self._run(), self.float_logits, self.samples,
                                                           self.categories):
            errors.append(float(((logits.double().sigmoid() - ref.double().sigmoid()) ** 2).mean()))
            for mask, score, cat in zip(masks.numpy(), iou.tolist(), cats):
                detections.append({"image_id": sample.image_id, "category_id": int(cat),
                                   "segmentation": mask_to_rle(mask), "score": float(score)})
        return Evaluation(float(np.mean(errors)), self._mask_ap(detections))

    def _mask_ap(self, detections: list[dict[str, Any]]) -> float:
        if not detections:
            return 0.0
        with contextlib.redirect_stdout(None):
            dt = self._gt.loadRes(copy.deepcopy(detections))
            coco_eval = COCOeval(self._gt, dt, "segm")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return round(100.0 * max(float(coco_eval.stats[0]), 0.0), 3)


@contextlib.contextmanager
def _state(sites: Sequence[Site], quantized: Callable[[Site], bool]) -> Iterator[None]:
    """Every site quantized or in float as ``quantized(site)`` says; modes and weights restored on exit."""
    saved = [(q, q.mode) for s in sites for q in s.quantizers]
    with contextlib.ExitStack() as stack:
        for site in sites:
            on = quantized(site)
            for q in site.quantizers:
                q.mode = Mode.QUANTIZE if on else Mode.OFF
            if not on and site.layer is not None and site.kind is SiteKind.LAYER:
                stack.enter_context(site.layer.float_reference())
        try:
            yield
        finally:
            for q, mode in saved:
                q.mode = mode


def measure_sites(sites: Sequence[Site], evaluate: Evaluator, what: Sequence[str] = ("alone", "removed")
                  ) -> dict[str, Any]:
    """The float and fully quantized evaluations, and per site ``alone`` (only this site quantized) and
    ``removed`` (every site but this one quantized) as asked; rows in site order."""
    with _state(sites, lambda s: False):
        fp = evaluate()
    with _state(sites, lambda s: True):
        full = evaluate()
    rows = []
    for site in progress_bar(sites, desc="sites", unit="site"):
        row: dict[str, Any] = {"site": site.name, "kind": site.kind.value, "bits": site.bits,
                               "macs": site.macs, "quantizers": len(site.quantizers)}
        if "alone" in what:
            with _state(sites, lambda s, site=site: s is site):
                alone = evaluate()
            row.update(alone_error=alone.error, alone_ap_drop=round(fp.mask_ap - alone.mask_ap, 3))
        if "removed" in what:
            with _state(sites, lambda s, site=site: s is not site):
                removed = evaluate()
            row.update(removed_error=removed.error, removed_ap_gain=round(removed.mask_ap - full.mask_ap, 3))
        logger.info("site %s: %s", site.name, {k: v for k, v in row.items() if k not in ("site", "kind")})
        rows.append(row)
    return {"float": vars(fp), "quantized": vars(full), "sites": rows}
