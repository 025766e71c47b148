"""Train the small SAM 2.1 testbed on the generated demo clips, on CPU: first-frame mask prompts, tracking
through memory, the way SAM2 itself is trained for video.

    python tools/make_demo_videos.py --out data/demo_videos --seed 0 --num-train 300 --num-val 12
    python tools/train_tiny_sam2.py --config projects/configs/sam2/tiny_sam2.yaml --steps 8000 \\
        --threads 1 --seed 0 --out ckpt/tiny_sam2.pt

The model is what ``--config`` (a video-run YAML) builds from its ``model`` section, so training and
evaluation (``ahcq/solver/test_quant_video.py``) build the same network. Each step takes a window of
``--frames`` frames (a random stride, flip and time direction) of one training clip, prompts every target
visible on the window's first frame with its GT mask and tracks the rest through sam2's own
``_track_step`` and memory encoder, with gradients through the memory. Loss per tracked frame, as in
SAM2's training, but with a box-balanced BCE in place of the focal term (see ``frame_loss``): BCE + dice
on the best of the three masks, L1 on its predicted IoU (mask terms only where the object is visible) and
BCE on the object score (visible or not).

Writes ``--out`` in sam2's format ({"model": state_dict}, float16 storage to stay small), a json sidecar
(``--out`` with suffix .json: command, seed, steps, the J&F of the saved file on ``dataset`` of the
config) and a resume state (suffix .state.pt).
"""
from __future__ import annotations

import argparse
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
from sam2.modeling.sam2_base import SAM2Base
from sam2.utils.misc import _load_img_as_tensor
from tqdm import tqdm

from ahcq.data.coco_io import atomic_write_bytes
from ahcq.models.sam2_checkpoint import build_sam2_model, load_sam2, run_overrides
from ahcq.video import evaluate, read_dataset
from ahcq.video.datasets import VideoSample
from ahcq.video.propagation import predict_videos
from ahcq.yaml_schema import SchemaError, expand_env, read_yaml

IMG_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMG_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


@dataclass
class Clip:
    """One training clip in memory: normalised frames (T x 3 x S x S) and target masks (N x T x S x S)."""

    frames: torch.Tensor
    masks: torch.Tensor


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """A boolean mask at the model's square input size, resized as sam2's ``add_new_mask`` resizes prompts."""
    m = torch.from_numpy(mask).float()[None, None]
    m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (m[0, 0] >= 0.5).float()


def load_clip(sample: VideoSample, size: int) -> Clip:
    """Frames preprocessed exactly as sam2's video loader does, and every target's mask on every frame."""
    frames = torch.stack([(_load_img_as_tensor(str(p), size)[0].float() - IMG_MEAN) / IMG_STD
                          for p in sample.frame_paths])
    masks = []
    for obj in sample.objects:
        per_frame = [sample.gt_mask(obj, t) if t in sample.annotations[obj] else np.zeros(sample.size, bool)
                     for t in range(len(sample.frame_paths))]
        masks.append(torch.stack([resize_mask(m, size) for m in per_frame]))
    return Clip(frames, torch.stack(masks))


def sample_window(clip: Clip, rng: np.random.Generator, length: int, min_area: float) -> Clip | None:
    """A random window (stride 1-3, optionally reversed in time and flipped left-right) whose first frame
    shows at least one target; only those targets are kept. None when the draw has no such target."""
    total = clip.frames.shape[0]
    stride = int(rng.integers(1, 4))
    while stride > 1 and (length - 1) * stride >= total:
        stride -= 1
    span = min((length - 1) * stride + 1, total)
    start = int(rng.integers(0, total - span + 1))
    idx = torch.arange(start, start + span, stride)
    if rng.random() < 0.5:
        idx = idx.flip(0)
    frames, masks = clip.frames[idx], clip.masks[:, idx]
    if rng.random() < 0.5:
        frames, masks = frames.flip(-1), masks.flip(-1)
    visible = masks[:, 0].flatten(1).sum(1) >= min_area
    if not visible.any():
        return None
    return Clip(frames, masks[visible])


def box_region(gt: torch.Tensor) -> torch.Tensor:
    """N x S x S: True inside each mask's bounding box (all False for an empty mask)."""
    rows, cols = gt.any(2), gt.any(1)
    rows = (rows.cumsum(1) > 0) & (rows.flip(1).cumsum(1).flip(1) > 0)
    cols = (cols.cumsum(1) > 0) & (cols.flip(1).cumsum(1).flip(1) > 0)
    return rows[:, :, None] & cols[:, None, :]


def frame_loss(multimasks: torch.Tensor, ious: torch.Tensor, obj_logits: torch.Tensor,
               gt: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-frame loss for N objects (multimask logits N x M x S x S, ious N x M, obj_logits N x 1):
    box-balanced BCE + dice on the best of the M masks, L1 on its predicted IoU, BCE on the object score.

    SAM2 fine-tunes a pretrained model with 20 x focal + dice; from scratch, a pixel-mean loss over objects
    of about 1 % of the frame makes "predict nothing" a plateau hundreds of steps long, so the BCE averages
    inside and outside the object's box separately (as tools/train_tiny_sam.py does for images)."""
    present = (gt.flatten(1).sum(1) > 0).float()
    target = gt[:, None].expand_as(multimasks)
    inside = box_region(gt > 0)[:, None].expand_as(multimasks).flatten(2).float()
    ce = F.binary_cross_entropy_with_logits(multimasks, target, reduction="none").flatten(2)
    bce = 0.5 * ((ce * inside).sum(-1) / inside.sum(-1).clamp(min=1)
                 + (ce * (1 - inside)).sum(-1) / (1 - inside).sum(-1).clamp(min=1))
    prob = multimasks.sigmoid().flatten(2)
    flat = target.flatten(2)
    dice = 1 - (2 * (prob * flat).sum(-1) + 1) / (prob.sum(-1) + flat.sum(-1) + 1)
    per_mask = bce + dice
    best = per_mask.argmin(1)
    rows = torch.arange(len(best))
    hard = (multimasks[rows, best].detach() > 0).flatten(1).float()
    inter = (hard * gt.flatten(1)).sum(1)
    union = ((hard + gt.flatten(1)) > 0).float().sum(1)
    iou_true = inter / union.clamp(min=1)
    iou_l1 = (ious[rows, best] - iou_true).abs()
    obj = F.binary_cross_entropy_with_logits(obj_logits[:, 0], present, reduction="none")
    loss = ((per_mask[rows, best] + iou_l1) * present + obj).mean()
    return loss, {"mask": float((per_mask[rows, best].detach() * present).mean()), "obj": float(obj.mean()),
                  "iou": float((iou_true * present).sum() / present.sum().clamp(min=1))}


def box_prompt(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """sam2's box prompt (corner points labelled 2 and 3, in input pixels) of each mask's bounding box."""
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float())
    coords = torch.stack(boxes).view(-1, 2, 2)
    return {"point_coords": coords, "point_labels": torch.tensor([[2, 3]]).repeat(len(boxes), 1)}


def track_window(model: SAM2Base, window: Clip, use_box: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """Prompt frame 0 with GT masks (or their boxes), track the rest through memory; the mean loss of the
    frames the mask decoder predicted (a box-prompted frame 0 included: it teaches the decoder to segment
    from the first steps on, as SAM2's training mixes box, click and mask prompts)."""
    n_obj, n_frames = window.masks.shape[:2]
    backbone = model.forward_image(window.frames)
    _, feats, pos, sizes = model._prepare_backbone_features(backbone)
    output: dict[str, dict[int, Any]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    losses, parts = [], []
    for t in range(n_frames):
        feats_t = [f[:, t:t + 1].repeat(1, n_obj, 1) for f in feats]
        pos_t = [p[:, t:t + 1].repeat(1, n_obj, 1) for p in pos]
        mask_prompt = window.masks[:, :1] if t == 0 and not use_box else None
        points = box_prompt(window.masks[:, 0]) if t == 0 and use_box else None
        current, heads, _, _ = model._track_step(t, t == 0, feats_t, pos_t, sizes, points, mask_prompt,
                                                 output, n_frames, False, None)
        multimasks, ious, low, high, obj_ptr, obj_logits = heads[1], heads[2], *heads[3:]
        current.update(pred_masks=low, pred_masks_high_res=high, obj_ptr=obj_ptr)
        model._encode_memory_in_output(feats_t, sizes, None, True, high, obj_logits, current)
        output["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = current
        if t > 0 or use_box:
            loss, part = frame_loss(multimasks, ious, obj_logits, window.masks[:, t])
            losses.append(loss)
            parts.append(part)
    summary = {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}
    return torch.stack(losses).mean(), summary


@torch.inference_mode()
def score(model: SAM2Base, samples: list[VideoSample]) -> dict[str, float]:
    """J&F (official and AHCQ-SAM protocols) of the video predictor on ``samples``."""
    was_training = model.training
    model.eval()
    report = evaluate(samples, predict_videos(model, samples, progress=False))
    model.train(was_training)
    return {k: round(float(v), 2) for k, v in report.as_dict().items()}


def half_state(model: SAM2Base) -> dict[str, torch.Tensor]:
    """The state dict with floating tensors stored as float16 (they load back into the float32 model)."""
    return {k: (v.detach().half() if v.is_floating_point() else v.detach()).clone()
            for k, v in model.state_dict().items()}


def save(model: SAM2Base, opt: torch.optim.Optimizer, rng: np.random.Generator, out: Path,
         sidecar: dict[str, Any], state: dict[str, Any]) -> None:
    """Atomically write the checkpoint, its sidecar and the resume state."""
    buf = io.BytesIO()
    torch.save({"model": half_state(model)}, buf)
    atomic_write_bytes(out, buf.getvalue())
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(sidecar, indent=2).encode("utf-8"))
    buf = io.BytesIO()
    torch.save({**state, "weights": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, buf)
    atomic_write_bytes(out.with_suffix(".state.pt"), buf.getvalue())


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float = 0.02) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio`` at ``steps``."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    progress = min(step / max(steps, 1), 1.0)
    return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("projects/configs/sam2/tiny_sam2.yaml"),
                   help="video-run YAML: its model section builds the network, its dataset is the val set")
    p.add_argument("--train-root", type=Path, default=Path("data/demo_videos/train"), help="SA-V root")
    p.add_argument("--out", type=Path, default=Path("ckpt/tiny_sam2.pt"))
    p.add_argument("--steps", type=int, default=8000, help="the schedule's length (one clip window a step)")
    p.add_argument("--minutes", type=float, default=88.0, help="wall-clock cap; the schedule is --steps")
    p.add_argument("--until", type=int,
                   help="stop after this step (the schedule stays --steps), to repeat a capped run")
    p.add_argument("--frames", type=int, default=8, help="frames per training window (1 prompt + tracked)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--box-prob", type=float, default=0.5,
                   help="share of windows prompted by boxes instead of masks on their first frame")
    p.add_argument("--eval-every", type=int, default=1000, help="steps between val J&F evaluations")
    p.add_argument("--resume", action="store_true", help="continue from --out's .state.pt")
    args = p.parse_args(argv)
    positive = (args.steps, args.frames - 1, args.threads, args.eval_every, args.until or 1)
    if min(positive) < 1 or args.minutes <= 0:
        p.error("--steps, --until, --threads, --eval-every and --minutes must be positive, "
                "--frames at least 2")
    return args


def read_model_section(config: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, dataset) sections of a video-run YAML."""
    try:
        data = expand_env(read_yaml(config) or {})
    except SchemaError as err:
        raise SystemExit(f"error: {config}: {err}") from err
    if "model" not in data or "dataset" not in data:
        raise SystemExit(f"error: {config}: needs model and dataset sections")
    return dict(data["model"]), dict(data["dataset"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model_cfg, data_cfg = read_model_section(args.config)
    overrides = run_overrides(model_cfg)
    model = build_sam2_model(model_cfg["config"], overrides, video=True)
    size = model.image_size
    try:
        train = [load_clip(s, size) for s in tqdm(read_dataset(args.train_root, "sav", "train"),
                                                  desc="load train", unit="clip")]
        val = read_dataset(data_cfg["root"], data_cfg.get("layout", "sav"), data_cfg.get("split"))
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n and "token" not in n]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr)
    state: dict[str, Any] = {"step": 0, "elapsed_s": 0.0, "history": [], "losses": []}
    if args.resume:
        saved = torch.load(args.out.with_suffix(".state.pt"), map_location="cpu", weights_only=False)
        model.load_state_dict(saved.pop("weights"))
        opt.load_state_dict(saved.pop("optimizer"))
        rng.bit_generator.state = saved.pop("rng")
        torch.set_rng_state(saved.pop("torch_rng"))
        state = saved
    command = shlex.join(["tools/train_tiny_sam2.py", *(sys.argv[1:] if argv is None else argv)])
    model.train()
    start = time.perf_counter() - state["elapsed_s"]
    min_area = 0.002 * size * size
    pbar = tqdm(total=args.steps, initial=state["step"], unit="step", desc="train")
    last_step = min(args.steps, args.until or args.steps)
    while state["step"] < last_step and time.perf_counter() - start < args.minutes * 60:
        window = None
        while window is None:
            window = sample_window(train[int(rng.integers(len(train)))], rng, args.frames, min_area)
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(state["step"], args.steps, args.warmup_steps)
        loss, parts = track_window(model, window, rng.random() < args.box_prob)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        opt.step()
        state["step"] += 1
        pbar.update(1)
        if state["step"] % 50 == 0:
            state["losses"].append({"step": state["step"], "loss": round(float(loss), 4),
                                    **{k: round(v, 4) for k, v in parts.items()}})
            pbar.set_postfix(loss=f"{float(loss):.3f}", iou=f"{parts['iou']:.3f}")
        last = state["step"] >= last_step or time.perf_counter() - start >= args.minutes * 60
        if state["step"] % args.eval_every == 0 or last:
            state["elapsed_s"] = time.perf_counter() - start
            state["history"].append({"step": state["step"], "min": round(state["elapsed_s"] / 60, 2),
                                     **score(model, val)})
            tqdm.write(f"step {state['step']}: {state['history'][-1]}")
            sidecar = {"config": str(args.config), "model": model_cfg, "seed": args.seed,
                       "steps": state["step"], "train_minutes": round(state["elapsed_s"] / 60, 2),
                       "command": command, "storage_dtype": "float16", "history": state["history"]}
            save(model, opt, rng, args.out, sidecar, state)
    pbar.close()
    saved_model = load_sam2(model_cfg["config"], args.out, overrides, video=True)
    final = score(saved_model, val)
    sidecar = json.loads(args.out.with_suffix(".json").read_text())
    sidecar["val"] = {"root": str(data_cfg["root"]), "videos": len(val), **final}
    atomic_write_bytes(args.out.with_suffix(".json"), json.dumps(sidecar, indent=2).encode("utf-8"))
    print(f"saved {args.out} after {state['step']} steps; val J&F {final['official/J&F']:.2f} (official), "
          f"{final['ahcq/J&F']:.2f} (AHCQ-SAM)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
