"""The exported graphs run by ONNX Runtime in place of SAM's image encoder and mask decoder.

``running_in_onnxruntime`` swaps in modules that hand their inputs to ONNX Runtime sessions, so the
evaluation code that drives the torch model (``sam_runner``: prompt encoder in torch, then the decoder per
chunk of boxes) drives the exported one unchanged, and the numbers are the runtime's.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ahcq.deploy.onnx_export import DECODER_INPUTS

__all__ = ["OrtImageEncoder", "OrtMaskDecoder", "graph_ops", "running_in_onnxruntime", "session"]

QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul",
             "QLinearConv", "MatMulIntegerToFloat", "ConvInteger")


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session with every graph optimisation on and ``threads`` intra-op threads."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def graph_ops(path: Path) -> dict[str, int]:
    """How many nodes of each quantization operator the file holds."""
    counts = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {op: counts[op] for op in QUANT_OPS if counts[op]}


class OrtImageEncoder(nn.Module):
    """SAM's image encoder as an ONNX Runtime session (batch of one, as the evaluation encodes)."""

    def __init__(self, path: Path, img_size: int, threads: int | None = None) -> None:
        super().__init__()
        self.img_size = img_size
        self.session = session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"image": x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


class OrtMaskDecoder(nn.Module):
    """SAM's mask decoder (one mask per prompt) as an ONNX Runtime session."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        self.session = session(path, threads)

    def forward(self, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                sparse_prompt_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor,
                multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if multimask_output:
            raise ValueError("the exported mask decoder gives one mask per prompt (multimask_output=False)")
        feeds = dict(zip(DECODER_INPUTS, (image_embeddings, image_pe, sparse_prompt_embeddings,
                                          dense_prompt_embeddings)))
        arrays = {k: np.ascontiguousarray(v.detach().cpu().float().numpy()) for k, v in feeds.items()}
        masks, ious = self.session.run(None, arrays)
        device = image_embeddings.device
        return torch.from_numpy(masks).to(device), torch.from_numpy(ious).to(device)


@contextmanager
def running_in_onnxruntime(sam: nn.Module, files: dict[str, Path], threads: int | None = None
                           ) -> Iterator[None]:
    """Within the block ``sam``'s mask decoder (and image encoder, when ``files`` has one) run in ONNX
    Runtime; the torch modules are put back after."""
    saved = {part: getattr(sam, part) for part in ("image_encoder", "mask_decoder")}
    try:
        sam.mask_decoder = OrtMaskDecoder(files["mask_decoder"], threads)
        if "image_encoder" in files:
            size = saved["image_encoder"].img_size
            sam.image_encoder = OrtImageEncoder(files["image_encoder"], size, threads)
        yield
    finally:
        for part, module in saved.items():
            setattr(sam, part, module)
