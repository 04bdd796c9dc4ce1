"""Predict the class of every image in a folder with a SkipNet, and how many blocks each image ran.

    python examples/predict_folder.py path/to/images                       # the shipped SkipNet-38 (CIFAR-10)
    python examples/predict_folder.py path/to/images --checkpoint my_skipnet.pt --csv predictions.csv

Images are read with Pillow (PNG, JPEG, BMP, WebP, ...; any mode is converted to the checkpoint's channels),
resized to the checkpoint's image size and normalised as it was trained. Greedy gates at the stored threshold,
routed: the blocks an image skips are never run for it.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

import skipnet

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """One image as a float tensor (C, size, size) in [0, 1]: small images resized, large ones as ImageNet
    (shorter side to size / 0.875, then the centre crop)."""
    with Image.open(path) as im:
        x = pil_to_tensor(im.convert("L" if channels == 1 else "RGB")).float() / 255.0
    if size >= 64:
        return center_crop(resize(x, round(size / 0.875), antialias=True), [size, size])
    return resize(x, [size, size], antialias=True)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a folder of images (searched recursively)")
    ap.add_argument(
        "--checkpoint", default="pretrained:cifar10_rnn_gate_38", help=".pt, .safetensors or pretrained:NAME"
    )
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    ap.add_argument("--csv", default=None, help="also write the predictions to this CSV file")
    args = ap.parse_args(argv)

    model, ckpt = skipnet.load_model(args.checkpoint)  # eval mode, greedy gates at the stored threshold
    meta = ckpt["data"]
    classes = meta.get("classes") or [str(i) for i in range(model.config.num_classes)]
    mean = torch.tensor(meta.get("mean", [0.0] * model.config.in_channels)).view(1, -1, 1, 1)
    std = torch.tensor(meta.get("std", [1.0] * model.config.in_channels)).view(1, -1, 1, 1)
    paths = sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in SUFFIXES)
    if not paths:
        raise SystemExit(f"no images in {args.folder}")

    rows = []
    with torch.no_grad():
        for i in range(0, len(paths), args.batch_size):
            chunk = paths[i : i + args.batch_size]
            x = torch.stack([load_image(p, model.config.in_channels, model.config.image_size) for p in chunk])
            out = model((x - mean) / std)  # SkipOutput: logits and the GateTrace
            probs = out.logits.softmax(1)
            executed = out.trace.decisions.sum(1)  # gated blocks each image ran
            for p, pr, k in zip(chunk, probs, executed):
                c = int(pr.argmax())
                rows.append(
                    {
                        "image": str(p),
                        "class": classes[c],
                        "confidence": round(float(pr[c]), 4),
                        "gated_blocks_run": int(k),
                        "gated_blocks": model.num_gates,
                    }
                )
    for r in rows:
        print(
            f"{r['image']}: {r['class']} ({r['confidence']:.0%}), "
            f"ran {r['gated_blocks_run']}/{r['gated_blocks']} gated blocks"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
