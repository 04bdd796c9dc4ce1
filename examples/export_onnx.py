"""Export a SkipNet to ONNX and run it in ONNX Runtime: a graph that still skips, outside PyTorch.

    pip install -e '.[export]'                                      # onnx, onnxruntime, onnxscript
    python examples/export_onnx.py                                  # the shipped SkipNet-38 -> skipnet.onnx
    python examples/export_onnx.py my_skipnet.pt --out my_skipnet.onnx --graph conditional

``--graph routed`` (the default here) takes any batch: per gated block the images that execute it are gathered,
run and scattered back. ``--graph conditional`` (the default of ``skipnet export``) is batch 1, each gated block an
ONNX ``If`` on its gate's decision. The graph takes float32 images in [0, 1], (B, C, H, W) — the normalisation and
the threshold are inside it — and returns ``logits`` (B, classes), and the gates' ``probs`` and ``decisions`` (0/1), each (B, N) per gated block.
"""

from __future__ import annotations

import argparse

import torch

import skipnet
from skipnet.evaluate import checkpoint_stats, eval_mode_for
from skipnet.export import export_model, write_export
from skipnet.gated import GateMode


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "checkpoint", nargs="?", default="pretrained:cifar10_rnn_gate_38", help=".pt, .safetensors or pretrained:NAME"
    )
    ap.add_argument("--out", default="skipnet.onnx", help="the ONNX file to write (default: skipnet.onnx)")
    ap.add_argument("--graph", choices=["routed", "conditional"], default="routed", help="(default: routed)")
    ap.add_argument("--images", type=int, default=8, help="random test images to run (default: 8)")
    args = ap.parse_args(argv)
    import onnxruntime  # the export extra: pip install -e '.[export]'

    model, ckpt = skipnet.load_model(args.checkpoint)
    mode = eval_mode_for(model)  # how it was trained and validated
    if mode != GateMode.GREEDY:  # a gated graph decides with the gates: only for a SkipNet whose gates were trained
        why = {
            GateMode.ALL_ON: "runs every block (mode all_on: a plain ResNet, or gates never trained, as in stage base)",
            GateMode.RANDOM: "decides at random (mode random, stochastic depth), which no exported graph does",
        }[mode]
        raise SystemExit(
            f"export_onnx.py: {args.checkpoint} {why}, so a gated graph would not be the model it is; export it with "
            f"every block on: skipnet export {args.checkpoint} OUT.onnx --graph plain"
        )
    # Checked before it is returned: the exported graph, run in ONNX Runtime, must take every decision and class
    # of the eager model on probe images (logits within 1e-4), or export_model raises.
    exported = export_model(model, "onnx", graph=args.graph, stats=checkpoint_stats(ckpt), ckpt=ckpt)
    write_export(exported, args.out)

    session = onnxruntime.InferenceSession(args.out, providers=["CPUExecutionProvider"])
    batch = 1 if args.graph == "conditional" else args.images
    c, s = model.config.in_channels, model.config.image_size
    images = torch.rand(args.images, c, s, s)  # your images here: float32 RGB in [0, 1], not normalised
    logits, decisions = [], []
    for x in images.split(batch):
        out = session.run(None, {"images": x.numpy()})  # -> logits, gate probs, decisions
        logits.append(torch.from_numpy(out[0]))
        decisions.append(torch.from_numpy(out[2]))
    logits, decisions = torch.cat(logits), torch.cat(decisions)

    stats = checkpoint_stats(ckpt)  # the same images through the eager model, normalised as it was trained
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in stats) if stats else (0.0, 1.0)
    with torch.no_grad():
        eager = model((images - mean) / std)
    same = bool((eager.trace.decisions.to(decisions.dtype) == decisions).all())
    diff = float((eager.logits - logits).abs().max())
    print(
        f"wrote {args.out} ({args.graph}); ONNX Runtime on {args.images} images: "
        f"{float(decisions.float().mean()):.0%} of the gated blocks executed, decisions "
        f"{'identical to' if same else 'DIFFERENT from'} PyTorch's, max logit difference {diff:.1e}"
    )
    return {"same_decisions": same, "max_abs_logit_diff": diff, "executed": float(decisions.float().mean())}


if __name__ == "__main__":
    main()
