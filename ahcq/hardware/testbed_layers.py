"""Layers of the quantized trained testbed SAM (ckpt/tiny_sam.pth), exported with their real activations.

The committed small SAM is quantized with the project's AHCQ-SAM recipe (``exp/ahcqsam/w4a4.yaml``: BIG,
statistics, ACNR and recalibration, no reconstruction) on a few images of the demo set with their
ground-truth boxes as prompts; ``switch_to_evaluation`` merges every CAG input quantizer to its final group
count along the reconstruction's progressive schedule (8G, 4G, 2G, G). Two layers are exported with
``ahcq.quantization.export.export_linear`` on the inputs they receive, through the quantized model, on a
demo image that was not used for calibration:

* an encoder MLP lin2 (HLUQ input, no output quantizer: it feeds the residual sum, fixed-point output);
* a mask-decoder attention ``q_proj`` (CAG input), requantized to the codes of the attention's query
  quantizer (the ``q`` slot of ``QuantDecoderAttention``, which takes ``q_proj``'s output directly).

Demo images are drawn in memory exactly as ``tools/make_demo_data.py`` draws its val split (generator
seeded by ``(seed, 1, index)``, boxes = tight mask boxes), so no files are needed.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from segment_anything.modeling import Sam
from torch import nn

from ahcq.data.coco_io import mask_bbox
from ahcq.data.shapes import SceneSpec, draw_scene
from ahcq.models.sam_attention import QuantDecoderAttention
from ahcq.models.sam_quantize import quantize_sam
from ahcq.models.sam_runner import SamImage, decode_boxes, prepare_image
from ahcq.models.tiny_sam import build_tiny_sam
from ahcq.quantization.config import load_qconfig
from ahcq.quantization.export import export_linear
from ahcq.quantization.layers import QuantLinear
from ahcq.quantization.quantizers import Quantizer
from ahcq.seeding import seed_everything
from ahcq.solver.calibration import calibrate, switch_to_evaluation

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO_ROOT / "ckpt" / "tiny_sam.pth"
QCONFIG = REPO_ROOT / "exp" / "ahcqsam" / "w4a4.yaml"
LIN2 = "image_encoder.blocks.3.mlp.lin2"
Q_PROJ = "mask_decoder.transformer.layers.1.self_attn.q_proj"
DEMO_VAL_SPLIT = 1  # tools/make_demo_data.SPLITS["val"]
DEMO_SIZE = 128


@dataclass
class DemoImage:
    """One demo image as SAM sees it and its ground-truth boxes (xyxy, original pixels)."""

    image: SamImage
    boxes: torch.Tensor


def demo_scene(index: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Val image ``index`` of the demo set (uint8 HxWx3) and its COCO boxes ``[x, y, w, h]`` (float32)."""
    rng = np.random.default_rng([seed, DEMO_VAL_SPLIT, index])
    image, objects = draw_scene(SceneSpec(size=DEMO_SIZE), rng)
    return image, np.asarray([mask_bbox(o.mask) for o in objects], dtype=np.float32)


def demo_image(sam: Sam, index: int, seed: int = 0) -> DemoImage:
    """``demo_scene`` prepared for ``sam``, boxes as xyxy prompts."""
    image, xywh = demo_scene(index, seed)
    boxes = torch.as_tensor(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1))
    return DemoImage(prepare_image(sam, image), boxes)


def _forward(sam: Sam, sample: DemoImage) -> None:
    """Encoder, then the mask decoder over every box (as the pipeline's calibration forward)."""
    with torch.no_grad():
        embedding = sam.image_encoder(sample.image.tensor)
    decode_boxes(sam, embedding, sample.image, sample.boxes)


def quantized_testbed(calib_images: int = 2, checkpoint: Path = CHECKPOINT, qconfig: Path = QCONFIG,
                      demo_seed: int = 0) -> Sam:
    """The tiny SAM quantized (encoder included) and calibrated on demo val images ``0..calib_images-1``,
    in its evaluation state (CAG quantizers merged to G groups, every quantizer on)."""
    args = json.loads(Path(checkpoint).with_suffix(".json").read_text())["build_args"]
    sam = build_tiny_sam(**args, checkpoint=checkpoint)
    cfg = load_qconfig(qconfig)
    seed_everything(cfg.seed)
    samples = [demo_image(sam, i, demo_seed) for i in range(calib_images)]
    quantize_sam(sam, cfg, quant_encoder=True)
    calibrate(sam, samples, lambda s: _forward(sam, s), cfg)
    switch_to_evaluation(sam)
    return sam


def capture_inputs(sam: Sam, names: list[str], sample: DemoImage) -> dict[str, torch.Tensor]:
    """Input activations ``[tokens, Cin]`` of the named Linears on one forward of ``sample``."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook(name: str) -> Callable[[nn.Module, tuple], None]:
        return lambda _m, inputs: seen[name].append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]))

    handles = [sam.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        _forward(sam, sample)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def query_quantizer(sam: Sam, q_proj: str) -> Quantizer | None:
    """The quantizer that takes ``q_proj``'s output: the ``q`` slot of its attention (``None`` if empty)."""
    attention = sam.get_submodule(q_proj.rsplit(".", 1)[0])
    if not isinstance(attention, QuantDecoderAttention):
        raise TypeError(f"{q_proj} is not the q_proj of a quantized decoder attention")
    slot = attention.quantizer("q")
    return slot if isinstance(slot, Quantizer) else None


def export_testbed_layers(folder: Path, calib_images: int = 2, lin2: str = LIN2, q_proj: str = Q_PROJ,
                          checkpoint: Path = CHECKPOINT) -> dict[str, Path]:
    """Quantize the testbed, capture the two layers' inputs on demo val image ``calib_images`` and export them
    to ``folder/lin2.npz`` and ``folder/q_proj.npz``; returns those paths."""
    sam = quantized_testbed(calib_images, checkpoint)
    inputs = capture_inputs(sam, [lin2, q_proj], demo_image(sam, calib_images))
    layers = {name: sam.get_submodule(name) for name in (lin2, q_proj)}
    for name, layer in layers.items():
        if not isinstance(layer, QuantLinear):
            raise TypeError(f"{name} is {type(layer).__name__}, not a QuantLinear")
    paths = {"lin2": Path(folder) / "lin2.npz", "q_proj": Path(folder) / "q_proj.npz"}
    export_linear(layers[lin2], inputs[lin2], paths["lin2"])
    export_linear(layers[q_proj], inputs[q_proj], paths["q_proj"],
                  next_quantizer=query_quantizer(sam, q_proj))
    return paths
