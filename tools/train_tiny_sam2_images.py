"""Train the tiny SAM 2.1 (the video testbed's sizes) as an image model on the demo set, for SAM2 on COCO
images.

    python tools/make_demo_data.py
    python tools/train_tiny_sam2_images.py --data data/demo --steps 12000 --minutes 25 --threads 1 \\
        --seed 0 --out runs/tiny_sam2_images.pt
    python ahcq/solver/test_quant.py --config projects/configs/demo/tiny_sam2_oracle.py --fp-only \\
        --cfg-options model.sam.checkpoint=runs/tiny_sam2_images.pt

A model of the video testbed's sizes (``--config``'s model section) learns SAM2's image path
(``SAM2ImagePredictor``'s: image encoder, no-memory embedding, prompt encoder, mask decoder with the
high-resolution features) on the demo train split, from scratch or from ``--init``: each step one image, up
to ``--boxes`` of its objects prompted with their boxes, the loss of ``train_tiny_sam2.frame_loss`` on the
three masks upsampled to the input size. Writes ``--out`` in sam2's format (float16 storage) and a json
sidecar with the model section (so ``TinySAM2`` builds it), the command, seed and steps. What it reached on
two CPU cores is in docs/results.md (SAM2 on images).
"""
from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from sam2.modeling.sam2_base import SAM2Base
from sam2.utils.transforms import SAM2Transforms
from tqdm import tqdm
from train_tiny_sam2 import box_prompt, frame_loss, half_state, lr_factor, read_model_section

from ahcq.data.coco_io import atomic_write_bytes
from ahcq.models.sam2_checkpoint import build_sam2_model, load_sam2, run_overrides


def load_split(data: Path, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every train image with objects: (1 x 3 x S x S input as sam2 prepares it, N x S x S masks)."""
    coco = COCO(str(data / "annotations" / "instances_train.json"))
    transforms = SAM2Transforms(resolution=size, mask_threshold=0.0)
    out = []
    for info in tqdm(coco.dataset["images"], desc="load train", unit="img"):
        anns = [a for a in coco.imgToAnns[info["id"]] if a["area"] > 0 and not a.get("iscrowd")]
        if not anns:
            continue
        image = np.asarray(Image.open(data / "train" / info["file_name"]).convert("RGB"))
        masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).float()[:, None]
        masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)[:, 0] >= 0.5
        keep = masks.flatten(1).any(1)
        if keep.any():
            out.append((transforms(image)[None], masks[keep].float()))
    return out


def image_loss(model: SAM2Base, image: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The box-prompted loss of one image's objects through SAM2's image path."""
    backbone = model.forward_image(image)
    _, feats, _, sizes = model._prepare_backbone_features(backbone)
    feats[-1] = feats[-1] + model.no_mem_embed
    maps = [f.permute(1, 2, 0).reshape(1, -1, *s) for f, s in zip(feats, sizes)]
    prompt = box_prompt(masks > 0)
    sparse, dense = model.sam_prompt_encoder(points=(prompt["point_coords"], prompt["point_labels"]),
                                             boxes=None, masks=None)
    low, ious, _, obj = model.sam_mask_decoder(
        image_embeddings=maps[-1], image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
        repeat_image=True, high_res_features=maps[:-1])
    high = F.interpolate(low, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return frame_loss(high, ious, obj, masks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("projects/configs/sam2/tiny_sam2.yaml"),
                   help="video-run YAML whose model section gives the sizes")
    p.add_argument("--init", type=Path, help="start from these weights (sam2 format) instead of scratch")
    p.add_argument("--data", type=Path, default=Path("data/demo"))
    p.add_argument("--out", type=Path, default=Path("runs/tiny_sam2_images.pt"))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock cap; the schedule is --steps")
    p.add_argument("--until", type=int,
                   help="stop after this step (the schedule stays --steps), to repeat a capped run")
    p.add_argument("--boxes", type=int, default=8, help="objects prompted per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if min(args.steps, args.boxes, args.threads, args.until or 1) < 1:
        p.error("--steps, --until, --boxes and --threads must be positive")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model_cfg, _ = read_model_section(args.config)
    model_cfg.pop("checkpoint", None)
    overrides = run_overrides(model_cfg, video=False)
    if args.init is not None and not args.init.is_file():
        raise SystemExit(f"error: --init {args.init}: no such checkpoint")
    model = (load_sam2(model_cfg["config"], args.init, overrides) if args.init
             else build_sam2_model(model_cfg["config"], overrides))
    train = load_split(args.data, model.image_size)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.01)
    model.train()
    start = time.perf_counter()
    losses = []
    pbar = tqdm(total=args.steps, unit="step", desc="train")
    step = 0
    last_step = min(args.steps, args.until or args.steps)
    while step < last_step and time.perf_counter() - start < args.minutes * 60:
        image, masks = train[int(rng.integers(len(train)))]
        pick = torch.from_numpy(rng.permutation(len(masks))[:args.boxes])
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.steps, args.warmup_steps)
        loss, parts = image_loss(model, image, masks[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        pbar.update(1)
        losses.append(parts["iou"])
        if step % 50 == 0:
            pbar.set_postfix(loss=f"{float(loss):.3f}", iou=f"{np.mean(losses[-50:]):.3f}")
    pbar.close()
    buf = io.BytesIO()
    torch.save({"model": half_state(model)}, buf)
    atomic_write_bytes(args.out, buf.getvalue())
    command = shlex.join(["tools/train_tiny_sam2_images.py", *(sys.argv[1:] if argv is None else argv)])
    record = {"model": model_cfg, "init": None if args.init is None else str(args.init),
              "data": str(args.data), "seed": args.seed,
              "steps": step, "train_minutes": round((time.perf_counter() - start) / 60, 2),
              "train_iou_last_200": round(float(np.mean(losses[-200:])), 4), "command": command,
              "storage_dtype": "float16"}
    atomic_write_bytes(args.out.with_suffix(".json"), json.dumps(record, indent=2).encode("utf-8"))
    print(f"saved {args.out} after {step} steps; train IoU (last 200 steps) "
          f"{record['train_iou_last_200']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
