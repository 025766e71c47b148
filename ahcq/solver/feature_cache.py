"""On-disk cache of what never changes during PTQ: the prompt boxes and SAM's encoder inputs of each image.

The prompt detector is by far the costliest thing that does not depend on quantization, and the references
reran it for every calibration pass and every reconstruction unit. Here each image is prepared once
(``DetWrapperInstanceSAM.prepare``) and stored as one file, so a crashed run keeps what it finished and
any later run (another qconfig, ``--limit``, more calibration images) reuses every image it shares.

Layout: ``<root>/<run key>/samples/<image key>.pt`` and, when the encoder stays float,
``<root>/<run key>/embeddings-<device type>-<encoder fingerprint>/<image key>.pt`` (float embeddings).
The run key hashes the resolved mmdet config, the size and mtime of every file that config's model
names (SAM and detector weights, detector config, prompt annotation files), a fingerprint of the prompt
source's weights and the code version (``code_version``); the image key adds the image path, its size,
mtime and COCO id; embeddings are keyed by a fingerprint of the encoder's weights as well. Encoder inputs
are stored as the resized uint8 pixels (a sixth of the float tensor) when they re-normalise bit-exactly,
float32 otherwise.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from segment_anything.modeling import Sam
from torch import nn

import ahcq
from ahcq.models.image_runner import PromptedModel, input_side, is_sam2
from ahcq.models.sam_runner import Prompts, SamImage, SamSample
from ahcq.solver.run_identity import plugin_root, source_digest

__all__ = ["CACHE_VERSION", "CacheStats", "CachedImage", "FeatureCache", "default_cache_dir",
           "module_fingerprint", "run_key"]

CACHE_VERSION = f"ahcq-{ahcq.__version__}-features-1"
logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``CACHE_VERSION`` plus a hash of the sources that produce cached content (the mmdet plugin, which
    prepares images and runs the prompt sources, and this module), so editing them invalidates the cache."""
    digest = hashlib.sha256(CACHE_VERSION.encode())
    digest.update(source_digest([plugin_root()], (".py",)).encode() + Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def default_cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/ahcq/features``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ahcq" / "features"


def _referenced_files(value: Any) -> Iterable[str]:
    """Every string inside a nested config value that names an existing file."""
    if isinstance(value, str):
        if os.path.isfile(value):
            yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _referenced_files(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _referenced_files(v)


def _stat(path: str) -> list[Any]:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


@torch.no_grad()
def module_fingerprint(module: nn.Module) -> str:
    """Hash of every tensor's name, shape and float64 sum and sum of squares: it tells apart weights that
    no file names (random initialisations, in-memory edits) at the cost of one pass over them."""
    digest = hashlib.sha256()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        t64 = t.detach().double()
        digest.update(f"{name}{tuple(t.shape)}{float(t64.sum())!r}{float(t64.square().sum())!r}".encode())
    return digest.hexdigest()[:24]


def run_key(config: Mapping[str, Any], prompt_fingerprint: str = "") -> str:
    """Hash of the resolved config, the files its model names (size + mtime), the prompt source's weights
    and the cache version."""
    files = sorted(_stat(p) for p in set(_referenced_files(config.get("model", {}))))
    parts = {"config": config, "files": files, "prompt": prompt_fingerprint, "version": code_version()}
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _image_key(img_meta: Mapping[str, Any]) -> str:
    filename = img_meta["filename"]
    image_id = (img_meta.get("img_info") or {}).get("id")
    blob = json.dumps([*_stat(filename), image_id])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pack_image(sam: PromptedModel, image: SamImage) -> dict[str, Any]:
    """The encoder input without padding, as uint8 pixels when that round-trips bit for bit (SAM's
    normalisation of integer pixels; SAM2 resizes after scaling to [0, 1], so its input stays float)."""
    h, w = image.input_size
    crop = image.tensor[..., :h, :w].cpu()
    if is_sam2(sam):
        return {"normalized": crop, "input_size": image.input_size, "original_size": image.original_size}
    pixels = (crop * sam.pixel_std.cpu() + sam.pixel_mean.cpu()).round().clamp(0, 255).to(torch.uint8)
    if torch.equal(sam.preprocess(pixels.float().to(sam.device)).cpu(), image.tensor.cpu()):
        return {"pixels": pixels, "input_size": image.input_size, "original_size": image.original_size}
    return {"normalized": crop, "input_size": image.input_size, "original_size": image.original_size}


def _unpack_image(sam: PromptedModel, data: Mapping[str, Any]) -> SamImage:
    if "pixels" in data:
        tensor = sam.preprocess(data["pixels"].float().to(sam.device))
    else:
        crop = data["normalized"].to(sam.device)
        size = input_side(sam)
        tensor = torch.nn.functional.pad(crop, (0, size - crop.shape[-1], 0, size - crop.shape[-2]))
    return SamImage(tensor, tuple(data["input_size"]), tuple(data["original_size"]))


@dataclass
class CacheStats:
    """How many images of one split were found in the cache and how many were computed."""

    hits: int = 0
    misses: int = 0

    @property
    def status(self) -> str:
        if self.misses == 0:
            return "hit"
        return "miss" if self.hits == 0 else "partial"


@dataclass
class CachedImage:
    """One cached image: its key, mmdet meta (filename, id) and the prepared sample."""

    key: str
    filename: str
    image_id: int | None
    sample: SamSample


class FeatureCache:
    """Per-image cache of prepared SAM samples (and float embeddings) under ``root/<run key>``."""

    def __init__(self, root: str | os.PathLike, key: str, encoder_fingerprint: str = "") -> None:
        self.dir = Path(root) / key
        self.key = key
        self.encoder_fingerprint = encoder_fingerprint

    def _sample_path(self, image_key: str) -> Path:
        return self.dir / "samples" / f"{image_key}.pt"

    def _embedding_path(self, image_key: str, device: torch.device) -> Path:
        return self.dir / f"embeddings-{device.type}-{self.encoder_fingerprint}" / f"{image_key}.pt"

    def prepare(
        self,
        model: Any,
        items: Iterable[tuple[torch.Tensor, dict]],
        stats: CacheStats,
        progress: Callable[[Iterable], Iterable] = iter,
    ) -> list[str]:
        """Image keys of ``items`` ((img, img_meta) from the test pipeline), preparing the uncached ones.

        Only here does the prompt source run, and only for images that are not yet cached.
        """
        keys = []
        for img, meta in progress(items):
            image_key = _image_key(meta)
            path = self._sample_path(image_key)
            if path.is_file():
                stats.hits += 1
            else:
                stats.misses += 1
                (sample,) = model.prepare(img[None], [meta])
                record = {
                    "filename": meta["filename"],
                    "image_id": (meta.get("img_info") or {}).get("id"),
                    "image": _pack_image(model.sam, sample.image),
                    "boxes": sample.prompts.boxes.cpu(),
                    "scores": sample.prompts.scores.cpu(),
                    "labels": sample.prompts.labels.cpu(),
                }
                _atomic_save(record, path)
            keys.append(image_key)
        return keys

    def load(self, sam: PromptedModel, image_key: str) -> CachedImage:
        """The cached sample of ``image_key``, its encoder input rebuilt on ``sam``'s device."""
        record = torch.load(self._sample_path(image_key), map_location="cpu", weights_only=True)
        prompts = Prompts(record["boxes"], record["scores"], record["labels"])
        sample = SamSample(_unpack_image(sam, record["image"]), prompts)
        return CachedImage(image_key, record["filename"], record["image_id"], sample)

    def embedding(self, sam: Sam, cached: CachedImage) -> torch.Tensor:
        """The float image embedding of ``cached`` (computed with ``sam``'s encoder once, then read back).

        Call only while ``sam``'s encoder is float and holds the weights ``encoder_fingerprint`` was taken of.
        """
        path = self._embedding_path(cached.key, sam.device)
        if path.is_file():
            return torch.load(path, map_location=sam.device, weights_only=True)
        with torch.no_grad():
            embedding = sam.image_encoder(cached.sample.image.tensor.to(sam.device))
        _atomic_save(embedding.cpu(), path)
        return embedding

    def has_embeddings(self, keys: Iterable[str], device: torch.device) -> bool:
        """Whether every image in ``keys`` has a cached float embedding for ``device``."""
        return all(self._embedding_path(k, device).is_file() for k in keys)
