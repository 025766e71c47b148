"""Train the small SAM (ahcq.models.tiny_sam) with box prompts on the demo set, on CPU, within a time budget.

    python tools/train_tiny_sam.py --data data/demo --minutes 60 --threads 2 --out ckpt/tiny_sam.pth

Saves a plain fp32 state dict in the official SAM key layout (``--out``), a json sidecar with the
build arguments and the final val metric (``--out`` with suffix .json) and a resume state
(suffix .state.pt). Val metric: COCO segm mAP with oracle GT boxes, score = predicted IoU.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from segment_anything.modeling import Sam
from tqdm import tqdm

from ahcq.data.coco_io import atomic_write_bytes, load_coco_json, mask_to_rle, rle_to_mask
from ahcq.models.tiny_sam import build_tiny_sam


@dataclass
class Split:
    """A COCO split held in memory: images (HxWx3 uint8), xyxy boxes and boolean masks per image."""

    ann_file: Path
    image_ids: list[int]
    images: list[np.ndarray]
    boxes: list[np.ndarray]
    masks: list[np.ndarray]
    categories: list[np.ndarray]


def load_split(root: Path, split: str) -> Split:
    """Load images and annotations of ``root/split``; images without annotations are skipped."""
    ann_file = root / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise FileNotFoundError(f"{ann_file} not found; run tools/make_demo_data.py first")
    data = load_coco_json(ann_file)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    out = Split(ann_file, [], [], [], [], [])
    for info in data["images"]:
        anns = by_image.get(info["id"], [])
        if not anns:
            continue
        out.image_ids.append(info["id"])
        out.images.append(np.array(Image.open(root / split / info["file_name"]).convert("RGB")))
        out.boxes.append(np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                    a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=np.float32))
        out.masks.append(np.stack([rle_to_mask(a["segmentation"]) for a in anns]))
        out.categories.append(np.array([a["category_id"] for a in anns]))
    if not out.images:
        raise ValueError(f"{ann_file}: no annotated images")
    return out


def make_batch(
    split: Split, indices: list[int], rng: np.random.Generator, max_boxes: int, augment: bool
) -> list[dict[str, torch.Tensor]]:
    """Per image: float image (3xHxW, 0-255), xyxy boxes and GT masks; augmented: a random dihedral
    transform (transpose and flips, the shapes have no canonical orientation) and box jitter."""
    batch = []
    for i in indices:
        img, boxes, masks = split.images[i], split.boxes[i].copy(), split.masks[i]
        pick = rng.permutation(len(boxes))[:max_boxes]
        boxes, masks = boxes[pick], masks[pick]
        if augment:
            if rng.random() < 0.5:
                img, masks, boxes = img.transpose(1, 0, 2), masks.transpose(0, 2, 1), boxes[:, [1, 0, 3, 2]]
            h, w = img.shape[:2]
            if rng.random() < 0.5:
                img, masks = img[:, ::-1], masks[:, :, ::-1]
                boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
            if rng.random() < 0.5:
                img, masks = img[::-1], masks[:, ::-1]
                boxes[:, [1, 3]] = h - boxes[:, [3, 1]]
            side = np.tile(boxes[:, 2:] - boxes[:, :2], 2)  # (w, h, w, h) per box
            noise = np.clip(rng.normal(0.0, 0.05, boxes.shape) * side, -4.0, 4.0)
            boxes = np.clip(boxes + noise, 0, [w, h, w, h]).astype(np.float32)
        batch.append({
            "image": torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float(),
            "boxes": torch.from_numpy(boxes),
            "masks": torch.from_numpy(np.ascontiguousarray(masks)),
        })
    return batch


def predict(
    sam: Sam, images: list[torch.Tensor], boxes: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mask logits at image size (N x H x W) and predicted IoU (N) per image, single mask token."""
    emb = sam.image_encoder(torch.stack([sam.preprocess(x) for x in images]))
    out = []
    for e, img, b in zip(emb, images, boxes):
        sparse, dense = sam.prompt_encoder(points=None, boxes=b, masks=None)
        low, iou = sam.mask_decoder(
            image_embeddings=e[None], image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        size = tuple(img.shape[-2:])
        out.append((sam.postprocess_masks(low, size, size)[:, 0], iou[:, 0]))
    return out


def box_region(masks: torch.Tensor) -> torch.Tensor:
    """Boolean N x H x W region of each mask's tight bounding box."""
    rows, cols = masks.any(2), masks.any(1)
    rows = (rows.cumsum(1) > 0) & (rows.flip(1).cumsum(1).flip(1) > 0)
    cols = (cols.cumsum(1) > 0) & (cols.flip(1).cumsum(1).flip(1) > 0)
    return rows[:, :, None] & cols[:, None, :]


def compute_loss(sam: Sam, batch: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
    """Box-balanced BCE + dice on mask logits, plus MSE between predicted IoU and the IoU achieved.

    The BCE averages inside and outside the object's box separately: with a plain pixel mean the
    many easy background pixels make "predict empty everywhere" a long plateau when training from
    scratch; balanced, the decoder has to use the box from the first steps.
    """
    preds = predict(sam, [b["image"] for b in batch], [b["boxes"] for b in batch])
    logits = torch.cat([p[0].flatten(1) for p in preds])
    iou_pred = torch.cat([p[1] for p in preds])
    gt_masks = torch.cat([b["masks"] for b in batch])
    inside = box_region(gt_masks).flatten(1).float()
    gt = gt_masks.flatten(1).float()
    ce = F.binary_cross_entropy_with_logits(logits, gt, reduction="none")
    bce = 0.5 * ((ce * inside).sum(1) / inside.sum(1).clamp(min=1)
                 + (ce * (1 - inside)).sum(1) / (1 - inside).sum(1).clamp(min=1)).mean()
    prob = logits.sigmoid()
    dice = (1 - (2 * (prob * gt).sum(1) + 1) / (prob.sum(1) + gt.sum(1) + 1)).mean()
    hard = (logits.detach() > 0).float()
    inter, union = (hard * gt).sum(1), ((hard + gt) > 0).float().sum(1)
    iou_true = inter / union.clamp(min=1)
    iou_loss = F.mse_loss(iou_pred, iou_true)
    loss = bce + dice + iou_loss
    return loss, {"loss": loss.item(), "bce": bce.item(), "dice": dice.item(), "iou_mse": iou_loss.item(),
                  "miou": iou_true.mean().item()}


@torch.inference_mode()
def evaluate(sam: Sam, split: Split, desc: str = "val") -> dict[str, float]:
    """COCO segm mAP (in %) with GT boxes as prompts, masks thresholded at 0, score = predicted IoU."""
    was_training = sam.training
    sam.eval()
    results = []
    for i in tqdm(range(len(split.images)), desc=desc, unit="img", leave=False):
        img = torch.from_numpy(split.images[i]).permute(2, 0, 1).float()
        masks, iou = predict(sam, [img], [torch.from_numpy(split.boxes[i])])[0]
        for m, s, c in zip((masks > sam.mask_threshold).numpy(), iou.tolist(), split.categories[i].tolist()):
            results.append({"image_id": split.image_ids[i], "category_id": c,
                            "segmentation": mask_to_rle(m), "score": float(s)})
    sam.train(was_training)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(split.ann_file))
        ev = COCOeval(gt, gt.loadRes(results), iouType="segm")
        ev.params.imgIds = split.image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ["mAP", "AP50", "AP75", "APs", "APm", "APl"]
    return {n: round(float(v) * 100, 2) for n, v in zip(names, ev.stats[:6])}


def lr_factor(step: int, progress: float, warmup: int, min_ratio: float = 0.02) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay over training progress in [0, 1]."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(sam: Sam, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay only on weight matrices (not norms, biases, embeddings)."""
    decay, no_decay = [], []
    for name, p in sam.named_parameters():
        skip = p.ndim < 2 or any(key in name for key in ("pos", "token", "point_embed", "mask_embed"))
        (no_decay if skip else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def save_checkpoint(sam: Sam, out: Path, sidecar: dict[str, Any], state: dict[str, Any]) -> None:
    """Atomically write the fp32 state dict (official layout), its json sidecar and the resume state."""
    buf = io.BytesIO()
    torch.save({k: v.detach().float().clone() for k, v in sam.state_dict().items()}, buf)
    atomic_write_bytes(out, buf.getvalue())
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(sidecar, indent=2).encode("utf-8"))
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(out.with_suffix(".state.pt"), buf.getvalue())


def _save(sam: Sam, opt: torch.optim.Optimizer, rng: np.random.Generator, args: argparse.Namespace,
          argv: list[str] | None, build_args: dict[str, Any], state: dict[str, Any]) -> None:
    """Checkpoint after an evaluation, so an interrupted run keeps its latest evaluated weights."""
    sidecar = {
        "build_args": build_args, "storage_dtype": "float32", "seed": args.seed, "steps": state["step"],
        "train_minutes": round(state["elapsed_s"] / 60, 2), "data": str(args.data),
        "command": shlex.join(["tools/train_tiny_sam.py", *(sys.argv[1:] if argv is None else argv)]),
        "val_segm_oracle_boxes": state["history"][-1], "history": state["history"],
    }
    state.update(build_args=build_args, optimizer=opt.state_dict(), rng=rng.bit_generator.state,
                 torch_rng=torch.get_rng_state())
    save_checkpoint(sam, args.out, sidecar, state)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/demo"), help="output folder of make_demo_data.py")
    p.add_argument("--out", type=Path, default=Path("ckpt/tiny_sam.pth"))
    p.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget, evaluation included")
    p.add_argument("--steps", type=int, default=0, help="if > 0: schedule over and stop at this many steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="images per step")
    p.add_argument("--boxes-per-image", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--eval-every", type=float, default=10.0, help="minutes between val evaluations")
    p.add_argument("--resume", type=Path, help="a .pth written by this script; its .state.pt is used")
    p.add_argument("--build-args", type=json.loads, default={}, help="json dict for build_tiny_sam()")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.threads < 1 or args.batch_size < 1 or args.boxes_per_image < 1:
        p.error("--minutes, --threads, --batch-size and --boxes-per-image must be positive")
    if not isinstance(args.build_args, dict):
        p.error("--build-args must be a json object")
    params = inspect.signature(build_tiny_sam).parameters
    defaults = {k: v.default for k, v in params.items() if k != "checkpoint"}
    unknown = sorted(set(args.build_args) - set(defaults))
    if unknown:
        p.error(f"--build-args: unknown keys {unknown}; known: {sorted(defaults)}")
    args.build_args = json.loads(json.dumps({**defaults, **args.build_args}))  # tuples -> lists, as in json
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    state: dict[str, Any] = {"step": 0, "elapsed_s": 0.0, "history": [], "losses": []}
    build_args = dict(args.build_args)
    if args.resume is not None:
        state_file = args.resume.with_suffix(".state.pt")
        if not state_file.is_file():
            raise SystemExit(f"error: resume state {state_file} not found")
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        build_args = state["build_args"]
    sam = build_tiny_sam(**build_args, checkpoint=args.resume)
    try:
        train, val = load_split(args.data, "train"), load_split(args.data, "val")
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    too_big = max(max(im.shape[:2]) for im in train.images + val.images)
    if too_big > sam.image_encoder.img_size:
        raise SystemExit(f"error: {too_big}px images exceed the model input {sam.image_encoder.img_size}px")
    opt = make_optimizer(sam, args.lr, args.weight_decay)
    if args.resume is not None:
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
    sam.train()
    budget = args.minutes * 60.0
    start, last_eval = time.perf_counter() - state["elapsed_s"], state["elapsed_s"]
    pbar = tqdm(total=int(budget), initial=int(state["elapsed_s"]), unit="s", desc="train")
    while True:
        elapsed = time.perf_counter() - start
        progress = state["step"] / args.steps if args.steps > 0 else elapsed / budget
        done = progress >= 1.0 or elapsed >= budget
        if done or elapsed - last_eval >= args.eval_every * 60:
            state["elapsed_s"] = elapsed
            metric = evaluate(sam, val)
            state["history"].append({"step": state["step"], "min": round(elapsed / 60, 2), **metric})
            tqdm.write(f"step {state['step']}: val {state['history'][-1]}")
            _save(sam, opt, rng, args, argv, build_args, state)
            last_eval = time.perf_counter() - start
        if done:
            break
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(state["step"], progress, args.warmup_steps)
        batch = make_batch(train, rng.integers(len(train.images), size=args.batch_size).tolist(),
                           rng, args.boxes_per_image, augment=True)
        loss, parts = compute_loss(sam, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        if state["step"] % 25 == 0:
            state["losses"].append({"step": state["step"], "min": round(elapsed / 60, 2),
                                    **{k: round(v, 4) for k, v in parts.items()}})
            pbar.set_postfix(step=state["step"], loss=f"{parts['loss']:.3f}", miou=f"{parts['miou']:.3f}")
        pbar.update(int(time.perf_counter() - start) - pbar.n)
    pbar.close()
    final = state["history"][-1]
    print(f"saved {args.out} after {state['step']} steps; val segm mAP {final['mAP']:.2f} (oracle boxes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
