"""Train a SkipNet in your own loop: supervised pre-training (SP), then hybrid RL (HRL), then greedy inference.

    python examples/train_own_loop.py                      # tiny_feedforward_14 on scikit-learn's digits
    python examples/train_own_loop.py --steps 20           # a few steps per stage (what the tests run)

``model(x, mode=...)`` returns a ``SkipOutput`` (``.logits``, ``.trace``); the mode says how the gates decide and does
not follow ``model.train()``: train with ``mode="hard"`` (SP: straight-through hard gates, Eq. 7) or
``mode="sample"`` (HRL: sampled gates and REINFORCE, Eq. 5-6). The checkpoint it writes records the data's
normalisation, so ``skipnet eval OUT --data digits`` and the other examples take it as it is.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

import skipnet
from skipnet.cost import cost_model, fewer_macs
from skipnet.data import load_data
from skipnet.losses import hybrid_returns, reinforce_loss


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="tiny_feedforward_14", help="any gated architecture (skipnet models)")
    ap.add_argument("--steps", type=int, default=300, help="training steps per stage (default: 300)")
    ap.add_argument("--alpha", type=float, default=2.0, help="HRL's reward per skipped block, Eq. 5 (default: 2)")
    ap.add_argument("--out", default="my_skipnet.pt", help="the checkpoint to write (default: my_skipnet.pt)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    data = load_data("digits", batch_size=64, val_split=0.15)  # your own DataLoader works the same way
    model = skipnet.create_model(
        args.arch, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size
    )
    model.set_gate_bias(2.0)  # gates start open (p = 0.88), as `skipnet train --stage sp` from scratch
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)

    model.train()
    for images, labels in itertools.islice(itertools.cycle(data.train), args.steps):  # SP: straight-through gates
        out = model(images, mode="hard")
        loss = F.cross_entropy(out.logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for images, labels in itertools.islice(itertools.cycle(data.train), args.steps):  # HRL: sampled gates
        out = model(images, mode="sample")
        ce = F.cross_entropy(out.logits, labels, reduction="none")
        returns = hybrid_returns(ce, out.trace.decisions, alpha=args.alpha)  # (B, N): per sample, per gate
        loss = ce.mean() + reinforce_loss(out.trace.log_probs, returns)
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.eval()  # greedy gates at threshold 0.5, routed: skipped blocks cost nothing
    cost, right, seen, macs = cost_model(model), 0, 0, 0.0
    with torch.no_grad():
        for images, labels in data.test:
            out = model(images)
            right += int((out.logits.argmax(1) == labels).sum())
            seen += len(labels)
            macs += float(cost.macs_per_image(out.trace.decisions).sum())
    result = {
        "accuracy": 100.0 * right / seen,
        "macs_per_image": macs / seen,
        "macs_reduction": 100.0 * (1.0 - macs / seen / cost.total_macs_all_on),
    }
    print(
        f"test accuracy {result['accuracy']:.2f}% at {result['macs_per_image']:,.0f} MACs per image "
        f"({fewer_macs(result['macs_reduction'])} than the plain ResNet)"
    )

    record = {"name": data.name, "classes": data.classes, "mean": list(data.mean), "std": list(data.std)}
    record |= {"num_classes": data.num_classes, "image_size": data.image_size, "in_channels": data.in_channels}
    skipnet.save_checkpoint(args.out, model, data=record | {"val_split": 0.15})
    restored, _ = skipnet.load_model(args.out)  # eval mode, same threshold and gate mode
    x = next(iter(data.test))[0]
    with torch.no_grad():
        assert torch.equal(restored(x).logits, model(x).logits)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
