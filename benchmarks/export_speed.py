"""Exported SkipNets (issue 18): speed in ONNX Runtime, and agreement with the eager model.

    python benchmarks/export_speed.py speed       # cifar10_rnn_gate_110, batch 1, ONNX Runtime CPU (~10 min)
    python benchmarks/export_speed.py agreement   # the whole CIFAR-10 test split + ImageNet ResNet-50 (~15 min)

Models. No trained ResNet-110 is at hand, so the networks are *bias-set*: BatchNorm statistics calibrated on
real CIFAR-10 training images (train-mode ``all_on`` passes, cumulative averages), then the recurrent gate's
output layer scaled (x20, so that logits spread) and its bias bisected until the learned greedy gates execute
the wanted fraction of blocks on the benchmark images. Their decisions vary from image to image and block to
block, as a trained model's do; their accuracy is meaningless (random convolution weights).

``speed``: the bias-set model at about half of its gated blocks executed (bias bisected) and at all executed
(threshold 0 in the exported graph, so every gate is computed and every ``If`` takes its ``then`` branch),
exported as the batch-1 conditional ONNX graph, each timed against the plain ResNet-110 unfolded from it
(:func:`skipnet.bench_onnx.unfold_ifs`) and the masked graph, interleaved, one intra-op thread, on real test
images. Also the routed (batched) graph against the exported plain network at batch 32. Thread CPU time is
reported beside wall time (the machine is shared).

``agreement``: for cifar10_rnn_gate_38 (bias-set, ~half executed), the conditional ONNX graph (ONNX Runtime,
batch 1), the conditional pt2 program (batch 1) and the routed ONNX graph and pt2 program (batch 100) against
the eager greedy model at batch 1 on all 10,000 test images: decisions, predicted classes, max logit difference.
Then imagenet_rnn_gate_50 (random weights, BN calibrated on random images, bias-set) on 4 random 224-px images.

Writes ``benchmarks/results/export_speed.json`` / ``export_agreement.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import platform
import sys
import time
from pathlib import Path

import torch

from skipnet.bench_onnx import bench_onnx
from skipnet.data import load_data
from skipnet.export import build_graph, compare, eager_reference, export_model, onnx_session, run_onnx
from skipnet.registry import create_model

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def cifar(limit_train: int = 2048):
    """The CIFAR-10 bundle (test split whole) and its normalisation."""
    data = load_data(str(DATA), batch_size=256, eval_batch_size=500, limit_train=limit_train, workers=0)
    return data, (tuple(data.mean), tuple(data.std))


def pixels(data, split: str, n: int | None = None) -> torch.Tensor:
    """The first ``n`` images of ``split`` as [0, 1] pixels (what the exported graphs take)."""
    loader = data.split(split)
    if hasattr(loader, "train"):
        loader.train = False
    xs, got = [], 0
    for x, _ in loader:
        xs.append(x)
        got += len(x)
        if n is not None and got >= n:
            break
    x = torch.cat(xs)[:n]
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (data.mean, data.std))
    return x * std + mean


@torch.no_grad()
def calibrate(model, batches: list[torch.Tensor]) -> None:
    """BatchNorm running statistics = cumulative averages over ``batches`` (already normalised)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x in batches:
        model(x, "all_on")
    for m in bns:
        m.momentum = 0.1
    model.eval()


@torch.no_grad()
def set_keep(model, x: torch.Tensor, keep: float, scale: float = 20.0) -> float:
    """Scale the gate output layer by ``scale`` and bisect its bias until greedy decisions on ``x`` (normalised)
    execute about ``keep`` of the gated blocks; returns the fraction reached."""
    model.gates.fc.weight.mul_(scale)
    lo, hi = -200.0, 200.0
    frac = 0.0
    for _ in range(30):
        mid = (lo + hi) / 2
        model.set_gate_bias(mid)
        frac = float(model(x, "greedy").trace.decisions.mean())
        if abs(frac - keep) < 0.01:
            break
        lo, hi = (mid, hi) if frac < keep else (lo, mid)
    return frac


def bias_set_model(arch: str, data, stats, keep: float, n: int = 64):
    torch.manual_seed(0)
    model = create_model(arch)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in stats)
    train_px = (pixels(data, "train", 512) - mean) / std
    train = [train_px[i : i + 128] for i in range(0, 512, 128)]
    calibrate(model, train)
    test = (pixels(data, "test", n) - mean) / std
    reached = set_keep(model, test, keep)
    return model.eval(), reached


def env() -> dict:
    import onnxruntime

    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
        "command": " ".join(sys.argv),
    }


def imagenet_model(arch: str, keep: float, n: int):
    """An ImageNet SkipNet with random weights, BN calibrated on random images, gate bias set; ``n`` random
    224-px images in [0, 1] and the normalisation."""
    stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in stats)
    torch.manual_seed(0)
    model = create_model(arch)
    gen = torch.Generator().manual_seed(1)
    calibrate(model, [(torch.rand(8, 3, 224, 224, generator=gen) - mean) / std for _ in range(2)])
    images = torch.rand(n, 3, 224, 224, generator=gen)
    reached = set_keep(model, (images - mean) / std, keep)
    return model.eval(), reached, images, stats


def speed(args) -> dict:
    torch.set_num_threads(1)
    if args.arch.startswith("imagenet"):
        model, reached, images, stats = imagenet_model(args.arch, 0.5, args.images)
        what = f"{args.arch}, random weights, BN calibrated on random images, gate bias set"
    else:
        data, stats = cifar()
        images = pixels(data, "test", args.images)
        model, reached = bias_set_model(args.arch, data, stats, 0.5)
        what = f"{args.arch}, BN calibrated on CIFAR-10, gate bias set"
    print(f"bias-set {args.arch}: {reached:.3f} of gated blocks executed", flush=True)
    rows = []
    for label, threshold in (("half", None), ("all", 0.0)):
        t0 = time.time()
        ex = export_model(model, "onnx", graph="conditional", stats=stats, threshold=threshold, probes=2)
        print(f"exported the conditional graph ({label}) in {time.time() - t0:.0f} s; check {ex.check}", flush=True)
        res = bench_onnx(ex.payload, ex.meta, images=images, repeats=args.repeats, warmup=2, threads=1)
        res["setting"] = label
        rows.append(res)
        print(_line(res), flush=True)
    if args.arch.startswith("imagenet") or args.no_batched:
        return {"env": env(), "model": what, "rows": rows}
    t0 = time.time()
    ex_r = export_model(model, "onnx", graph="routed", stats=stats, probes=1)
    ex_p = export_model(model, "onnx", graph="plain", stats=stats, probes=1)
    print(f"exported the routed ({ex_r.graph}) and plain graphs in {time.time() - t0:.0f} s", flush=True)
    res = bench_onnx(
        ex_r.payload,
        ex_r.meta,
        plain_bytes=ex_p.payload,
        images=pixels(data, "test", 64),
        batch_size=32,
        repeats=max(3, args.repeats // 2),
        warmup=1,
        threads=1,
    )
    res["setting"] = "half, batched"
    rows.append(res)
    print(_line(res), flush=True)
    return {"env": env(), "model": what, "rows": rows}


def _line(r: dict) -> str:
    return (
        f"{r['setting']:<14} {r['graph']:<11} batch {r['batch_size']:>2} keep {r['keep']:.3f}  plain "
        f"{r['cpu_ms_plain']:.2f} ms  masked {r['cpu_ms_masked'] or float('nan'):.2f} ms  "
        f"skipnet {r['cpu_ms_routed']:.2f} ms "
        f"(CPU time)  speed-up {r['speedup_cpu']:.2f}x of ideal {r['ideal_speedup']:.2f}x = "
        f"{r['efficiency_cpu']:.2f}; wall {r['speedup']:.2f}x"
    )


def _agree_all(fn, model, graph, images: torch.Tensor, batch: int, ref: tuple | None = None) -> dict:
    """Run ``fn`` over ``images`` in batches of ``batch`` and compare with the eager greedy model at batch 1."""
    logits, decs = [], []
    for i in range(0, len(images), batch):
        out = fn(images[i : i + batch])
        logits.append(torch.as_tensor(out[0]))
        decs.append(torch.as_tensor(out[2]))
    if ref is None:
        ref_l, ref_d = [], []
        for i in range(len(images)):
            rl, rd = eager_reference(model, graph, images[i : i + 1])
            ref_l.append(rl)
            ref_d.append(rd)
        ref = (torch.cat(ref_l), torch.cat(ref_d))
    res = compare(ref[0], ref[1], torch.cat(logits), torch.cat(decs))
    return res, ref


def agreement(args) -> dict:
    torch.set_num_threads(1)
    data, stats = cifar()
    model, reached = bias_set_model("cifar10_rnn_gate_38", data, stats, 0.5)
    images = pixels(data, "test", args.limit)
    print(f"bias-set cifar10_rnn_gate_38: {reached:.3f} executed; {len(images)} test images", flush=True)
    out = {"env": env(), "cifar10": {"arch": "cifar10_rnn_gate_38", "model": "BN calibrated, gate bias set"}}
    ref = None
    graph = build_graph(model, "conditional", stats)
    for name, fmt, kind, batch in (
        ("conditional_onnx", "onnx", "conditional", 1),
        ("conditional_pt2", "pt2", "conditional", 1),
        ("routed_onnx", "onnx", "routed", 100),
        ("routed_pt2", "pt2", "routed", 100),
    ):
        t0 = time.time()
        ex = export_model(model, fmt, graph=kind, stats=stats, probes=1)
        if fmt == "onnx":
            session = onnx_session(ex.payload)
            fn = lambda x, s=session: run_onnx(s, x)  # noqa: E731
        else:
            module = torch.export.load(io.BytesIO(ex.payload)).module()
            fn = lambda x, m=module: m(x)  # noqa: E731
        with torch.no_grad():
            res, ref = _agree_all(fn, model, graph, images, batch, ref)
        res.update({"graph": ex.graph, "batch": batch, "seconds": round(time.time() - t0, 1)})
        out["cifar10"][name] = res
        print(name, res, flush=True)
    # ImageNet ResNet-50 with the recurrent gate, random weights, on a few random 224-px images
    torch.manual_seed(0)
    inet = create_model("imagenet_rnn_gate_50")
    gen = torch.Generator().manual_seed(1)
    calibrate(inet, [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(2)])
    x = torch.rand(args.imagenet_images, 3, 224, 224, generator=gen)
    inet_stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in inet_stats)
    reached = set_keep(inet, (torch.rand(8, 3, 224, 224, generator=gen) - mean) / std, 0.5)
    out["imagenet"] = {"arch": "imagenet_rnn_gate_50", "model": "random weights, BN calibrated, gate bias set"}
    g50 = build_graph(inet, "conditional", inet_stats)
    ref = None
    for name, fmt in (("conditional_onnx", "onnx"), ("conditional_pt2", "pt2")):
        t0 = time.time()
        ex = export_model(inet, fmt, graph="conditional", stats=inet_stats, probes=1)
        if fmt == "onnx":
            session = onnx_session(ex.payload)
            fn = lambda x, s=session: run_onnx(s, x)  # noqa: E731
        else:
            module = torch.export.load(io.BytesIO(ex.payload)).module()
            fn = lambda x, m=module: m(x)  # noqa: E731
        with torch.no_grad():
            res, ref = _agree_all(fn, inet, g50, x, 1, ref)
        res.update({"seconds": round(time.time() - t0, 1), "bias_set_keep_on_calibration_images": reached})
        out["imagenet"][name] = res
        print("imagenet", name, res, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("speed", "agreement"))
    p.add_argument("--arch", default="cifar10_rnn_gate_110", help="speed: the architecture")
    p.add_argument("--images", type=int, default=16, help="speed: test images per round (batch 1)")
    p.add_argument("--no-batched", action="store_true", help="speed: skip the routed batched graph")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--limit", type=int, default=None, help="agreement: first N test images (default: all)")
    p.add_argument("--imagenet-images", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = speed(args) if args.what == "speed" else agreement(args)
    tag = "" if args.what == "agreement" or args.arch == "cifar10_rnn_gate_110" else f"_{args.arch}"
    out = Path(args.out or HERE / "results" / f"export_{args.what}{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
