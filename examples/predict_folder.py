"""Predict the class of every image in a folder with a SkipNet, and how many blocks each image ran.

    python examples/predict_folder.py path/to/images                       # the shipped SkipNet-38 (CIFAR-10)
    python examples/predict_folder.py path/to/images --checkpoint my_skipnet.pt --csv predictions.csv

The library behind ``skipnet predict`` (``skipnet.predict``): every image file under the folder is read as the
checkpoint's own data was (decoded to 8-bit RGB, or grey for a one-channel network, resized to its image size,
normalised with its recorded statistics), and the model runs in the mode it was trained and validated in: a
SkipNet's learned gates decide greedily at its stored threshold, routed (the blocks an image skips are never run
for it); a plain ResNet, or a gated network trained in stage base (untrained gates), runs every block. The
checkpoint may also be an exported .onnx or .pt2 file. Unreadable files are skipped with one line each.
"""

from __future__ import annotations

import argparse
import csv

from skipnet.predict import load_predictor, predict


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="a folder of images (searched recursively)")
    ap.add_argument(
        "--checkpoint",
        default="pretrained:cifar10_rnn_gate_38",
        help=".pt, .safetensors, pretrained:NAME, or an exported .onnx / .pt2",
    )
    ap.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    ap.add_argument("--csv", default=None, help="also write the predictions to this CSV file")
    args = ap.parse_args(argv)

    predictor = load_predictor(args.checkpoint)  # the mode it was validated in; its classes and preprocessing
    result = predict(
        predictor,
        [args.folder],
        batch_size=args.batch_size,
        on_skip=lambda name, reason: print(f"skipped {name}: {reason}"),
    )
    rows = [
        {
            "image": r["image"],
            "class": r["class"],
            "confidence": round(r["probability"], 4),
            "gated_blocks_run": r["gated_blocks_executed"],  # of the gated blocks, how many this image ran
            "gated_blocks": r["gated_blocks"],
        }
        for r in result.rows
    ]
    for r in rows:
        print(
            f"{r['image']}: {r['class']} ({r['confidence']:.0%}), "
            f"ran {r['gated_blocks_run']}/{r['gated_blocks']} gated blocks"
        )
    if args.csv and rows:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
