"""Exported SkipNets (issue 18): speed in ONNX Runtime, and agreement with the eager model.

    python benchmarks/export_speed.py speed       # cifar10_rnn_gate_110, batch 1, ONNX Runtime CPU (~10 min)
    python benchmarks/export_speed.py agreement   # the whole CIFAR-10 test split + ImageNet ResNet-50 (~15 min)
    python benchmarks/export_speed.py shipped --models NAME ...  # shipped models, as skipnet runs them (~5 min each)
    python benchmarks/export_speed.py workers --models NAME ... --threads 2 --workers 2  # batch 32 on all cores

Models. No trained ResNet-110 is at hand, so the networks are *bias-set*: BatchNorm statistics calibrated on
real CIFAR-10 training images (train-mode ``all_on`` passes, cumulative averages), then the recurrent gate's
output layer scaled (x20, so that logits spread) and its bias bisected until the learned greedy gates execute
the wanted fraction of blocks on the benchmark images. Their decisions vary from image to image and block to
block, as a trained model's do; their accuracy is meaningless (random convolution weights). See
:func:`skipnet.bench.bias_set_model`.

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
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from skipnet.bench import (
    bias_set_model,
    bisect_gate_bias,
    calibrate_batchnorm,
    environment,
    load_bench_data,
    split_pixels,
    time_interleaved,
)
from skipnet.bench_onnx import bench_onnx
from skipnet.export import build_graph, compare, eager_reference, export_model, onnx_session, run_onnx
from skipnet.registry import create_model

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def cifar(limit_train: int = 2048):
    """The CIFAR-10 bundle (test split whole) and its normalisation."""
    return load_bench_data(DATA, limit_train)


def env() -> dict:
    """Where and when this ran (the versions of torch and ONNX Runtime among it)."""
    return environment("torch", "onnxruntime")


def imagenet_model(arch: str, keep: float, n: int):
    """An ImageNet SkipNet with random weights, BN calibrated on random images, gate bias set; ``n`` random
    224-px images in [0, 1] and the normalisation."""
    stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in stats)
    torch.manual_seed(0)
    model = create_model(arch)
    gen = torch.Generator().manual_seed(1)
    calibrate_batchnorm(model, [(torch.rand(8, 3, 224, 224, generator=gen) - mean) / std for _ in range(2)])
    images = torch.rand(n, 3, 224, 224, generator=gen)
    reached = bisect_gate_bias(model, (images - mean) / std, keep)
    return model.eval(), reached, images, stats


def speed(args) -> dict:
    torch.set_num_threads(1)
    if args.arch.startswith("imagenet"):
        model, reached, images, stats = imagenet_model(args.arch, 0.5, args.images)
        what = f"{args.arch}, random weights, BN calibrated on random images, gate bias set"
    else:
        data, stats = cifar()
        images = split_pixels(data, "test", args.images)
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
        images=split_pixels(data, "test", 64),
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
    images = split_pixels(data, "test", args.limit)
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
    calibrate_batchnorm(inet, [torch.randn(8, 3, 224, 224, generator=gen) for _ in range(2)])
    x = torch.rand(args.imagenet_images, 3, 224, 224, generator=gen)
    inet_stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in inet_stats)
    reached = bisect_gate_bias(inet, (torch.rand(8, 3, 224, 224, generator=gen) - mean) / std, 0.5)
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


def shipped(args) -> dict:
    """The shipped models' conditional ONNX graphs (batch 1) and routed ones (batches of 100), as skipnet runs them
    (``onnx_session``: the blocked layouts and the fused gates for this CPU), against the eager greedy model at
    batch 1 on the whole test split."""
    from skipnet.pretrained import load_pretrained

    torch.set_num_threads(1)
    data, _ = cifar(limit_train=256)
    images = split_pixels(data, "test", args.limit)
    out = {"env": env(), "images": len(images), "models": {}}
    for name in args.models:
        t0 = time.time()
        model, ckpt = load_pretrained(name)
        stats = (tuple(ckpt["data"]["mean"]), tuple(ckpt["data"]["std"]))
        session = onnx_session(export_model(model.eval(), "onnx", stats=stats, probes=1).payload)
        graph = build_graph(model, "conditional", stats)
        routed = onnx_session(export_model(model.eval(), "onnx", graph="routed", stats=stats, probes=1).payload)
        with torch.no_grad():
            res, ref = _agree_all(lambda x, s=session: run_onnx(s, x), model, graph, images, 1)
            res["routed"], _ = _agree_all(lambda x, s=routed: run_onnx(s, x), model, graph, images, 100, ref)
        out["models"][name] = res | {"seconds": round(time.time() - t0, 1)}
        print(name, out["models"][name], flush=True)
    return out


# ------------------------------------------------------------------------------------------- deploy (issue 32)
DEPLOY_MODELS = ("cifar10_rnn_gate_38", "cifar10_aig_gate_38", "cifar10_rnn_gate_110")


def deploy_model(arch: str, data, stats):
    """The shipped pretrained model of that name (its own normalisation; any zoo name, e.g. the per-image routing
    issue's cifar10_aig_gate_38_ordered), else the bias-set model of that architecture."""
    from skipnet.pretrained import load_pretrained, read_index

    if arch in read_index():
        model, ckpt = load_pretrained(arch)
        d = ckpt["data"]
        return model.eval(), (tuple(d["mean"]), tuple(d["std"])), f"pretrained:{arch} (shipped)"
    model, reached = bias_set_model(arch, data, stats, 0.5)
    return model, stats, f"{arch}, BN calibrated on CIFAR-10, gate bias set ({reached:.2f} executed on 64 images)"


def oracle_graph(cond: bytes) -> bytes:
    """The blocked-layout conditional graph with its gates pruned: each ``If`` reads its decision from a graph
    input ``d<k>`` (a gate that costs nothing; the floor under any gate)."""
    import onnx
    from onnx import TensorProto, helper

    from skipnet.bench_onnx import _prune
    from skipnet.export import blocked_layout

    proto = onnx.load_from_string(blocked_layout(cond, fuse_gates=False))
    ifs = [n for n in proto.graph.node if n.op_type == "If"]
    for k, node in enumerate(ifs):
        node.input[0] = f"d{k}"
        proto.graph.input.append(helper.make_tensor_value_info(f"d{k}", TensorProto.BOOL, []))
    keep = [o for o in proto.graph.output if o.name == "logits"]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    _prune(proto.graph)
    return proto.SerializeToString()


# intra-op threads of every session and of PyTorch in ``deploy`` (``--threads``; 1 unless told)
THREADS = {"intra_op": 1}


def ort_runner(payload: bytes, batches: list, feeds=None, layout: str = "nchw", threads: int | None = None, **opts):
    """A callable running an ONNX Runtime session (``threads`` intra-op threads, ``THREADS`` unless given) over
    ``batches``; ``feeds`` adds inputs per batch; ``opts`` go to ``onnx_session`` (e.g. ``workers``)."""
    from skipnet.export import onnx_session

    s = onnx_session(payload, threads or THREADS["intra_op"], layout=layout, **opts)
    name = s.get_inputs()[0].name
    extra = feeds or [{} for _ in batches]
    return lambda: [s.run(None, {name: b, **f}) for b, f in zip(batches, extra)]


def aoti_runner(payload: bytes, batches: list, tag: str):
    """AOTInductor: the pt2 program ``payload`` compiled to native code (``aoti_compile_and_package``), loaded with
    its runner; ``(callable over batches, compile seconds)``."""
    import tempfile

    program = torch.export.load(io.BytesIO(payload))
    t0 = time.time()
    path = Path(tempfile.mkdtemp()) / f"{tag}.pt2"
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    runner = torch._inductor.aoti_load_package(str(path))
    xs = [torch.from_numpy(b) for b in batches]

    def run():
        with torch.inference_mode():
            return [runner(x) for x in xs]

    return run, time.time() - t0


def _deploy_exports(model, stats, pt2: bool) -> dict:
    ex = {}
    for key, fmt, graph, thr in (
        ("cond", "onnx", "conditional", None),
        ("cond_all", "onnx", "conditional", 0.0),
        ("plain", "onnx", "plain", None),
        ("routed", "onnx", "routed", None),
        ("cond_pt2", "pt2", "conditional", None),
        ("cond_all_pt2", "pt2", "conditional", 0.0),
        ("plain_pt2", "pt2", "plain", None),
        ("routed_pt2", "pt2", "routed", None),
    ):
        if fmt == "pt2" and not pt2:
            continue
        t0 = time.time()
        ex[key] = export_model(model, fmt, graph=graph, stats=stats, threshold=thr, probes=1)
        print(f"  exported {key} in {time.time() - t0:.0f} s", flush=True)
    return ex


# (label, SkipNet variant, its all-executed twin, the plain reference): one row of the lever table each
LEVERS_B1 = (
    ("ORT, conditional, ORT_ENABLE_ALL (the default before)", "cond", "cond_all", "plain"),
    ("ORT, conditional, ORT_ENABLE_EXTENDED (no NCHWc)", "cond_ext", "cond_all_ext", "plain"),
    ("ORT, conditional, ORT_ENABLE_BASIC", "cond_basic", "cond_all_basic", "plain"),
    ("ORT, conditional, allow_spinning=0", "cond_nospin", "cond_all_nospin", "plain"),
    ("ORT, gate as one LSTM node (NCHW across If)", "lstm", "all_lstm", "plain"),
    ("ORT, NCHWc kept across If, each If behind a Reshape (before)", "nchwc_reshape", "all_nchwc_reshape", "plain"),
    ("ORT, NCHWc kept across If", "nchwc", "all_nchwc", "plain"),
    ("ORT, NCHWc across If + LSTM gate (layout=nchwc)", "fused", "all_fused", "plain"),
    ("ORT, floor: NCHWc across If, decisions fed (gate free)", "oracle", "oracle_all", "plain"),
    ("AOTInductor (torch.cond compiled), vs its own plain", "aoti_cond", "aoti_cond_all", "aoti_plain"),
    ("AOTInductor, vs ONNX Runtime's plain", "aoti_cond", "aoti_cond_all", "plain"),
)


def _b1_variants(ex: dict, batches: list, decisions: torch.Tensor | None, rnn: bool = True) -> dict:
    from skipnet.export import blocked_layout, lstm_gates, ort_optimized

    cond, cond_all, plain = ex["cond"].payload, ex["cond_all"].payload, ex["plain"].payload
    v = {"plain": ort_runner(plain, batches), "plain_ext": ort_runner(plain, batches, level="extended")}
    for key, payload in (("cond", cond), ("cond_all", cond_all)):
        v[key] = ort_runner(payload, batches)
        v[f"{key}_ext"] = ort_runner(payload, batches, level="extended")
        v[f"{key}_basic"] = ort_runner(payload, batches, level="basic")
        v[f"{key}_nospin"] = ort_runner(payload, batches, spinning=False)
    for key, payload in (("", cond), ("all_", cond_all)):
        if rnn:  # the LSTM rewrite is the recurrent gate's (ONNX Runtime's own optimised file of a feed-forward
            # gate does not even reload: its branch values reuse the outer graph's names, fixed by blocked_layout)
            v[f"{key}lstm"] = ort_runner(lstm_gates(ort_optimized(payload)).SerializeToString(), batches)
        v[f"{key}nchwc"] = ort_runner(blocked_layout(payload, fuse_gates=False), batches)
        reshaped = blocked_layout(payload, fuse_gates=False, direct_conditions=False)
        v[f"{key}nchwc_reshape"] = ort_runner(reshaped, batches)
        if rnn:
            v[f"{key}fused"] = ort_runner(payload, batches, layout="nchwc")
    if decisions is not None:
        oracle = oracle_graph(cond)
        n = decisions.shape[1]
        fed = [{f"d{k}": np.array(bool(d[k])) for k in range(n)} for d in decisions]
        v["oracle"] = ort_runner(oracle, batches, feeds=fed)
        v["oracle_all"] = ort_runner(oracle, batches, feeds=[{f"d{k}": np.array(True) for k in range(n)}] * len(fed))
    return v


def _agreement(outs: dict) -> dict:
    """Every variant's logits and decisions against ONNX Runtime's default session of the same graph."""
    ref = {k: outs["cond_all" if "all" in k else ("plain" if "plain" in k else "cond")] for k in outs}
    return {key: _agree_outputs(out, ref[key]) for key, out in outs.items()}


def _agree_outputs(out: list, ref: list) -> dict:
    """One variant's logits, classes and decisions against a reference's, over the same batches."""
    la = np.concatenate([np.asarray(o[0]) for o in out])
    lb = np.concatenate([np.asarray(o[0]) for o in ref])
    r = {"max_abs_logit_diff": float(np.abs(la - lb).max()), "same_classes": bool((la.argmax(1) == lb.argmax(1)).all())}
    if len(out[0]) == 3 and len(ref[0]) == 3:
        da = np.concatenate([np.asarray(o[2]) for o in out])
        r["decision_mismatches"] = int((da != np.concatenate([np.asarray(o[2]) for o in ref])).sum())
    return r


def _time(variants: dict, rounds: int, n: int) -> dict:
    cpu: dict = {}
    wall = time_interleaved(variants, rounds, 2, cpu)
    return {
        k: {"cpu_ms": 1e3 * statistics.median(cpu[k]) / n, "wall_ms": 1e3 * statistics.median(wall[k]) / n}
        for k in variants
    }


def _lever_rows(levers, times: dict, ideal: float, gated: int) -> list[dict]:
    """One row per lever: times, efficiency and all-executed overhead in the calling thread's CPU time at one
    intra-op thread (all the work runs there, and the machine may be shared), in wall time at several (the other
    threads' work is not the caller's CPU time); ``wall_efficiency`` always in wall time."""
    clock = "cpu_ms" if THREADS["intra_op"] == 1 else "wall_ms"
    rows = []
    for label, half, full, ref in levers:
        if half not in times:
            continue
        t, p = times[half][clock], times[ref][clock]
        row = {"lever": label, "ms": t, "plain_ms": p, "speedup": p / t, "ideal": ideal, "efficiency": p / t / ideal}
        row["wall_efficiency"] = times[ref]["wall_ms"] / times[half]["wall_ms"] / ideal
        if full in times:
            ta = times[full][clock]
            row |= {"all_ms": ta, "overhead_all": ta / p - 1, "us_per_block": 1e3 * (ta - p) / gated}
        rows.append(row)
    return rows


def _aoti_variants(ex: dict, batches: list, keys: tuple, tag: str) -> tuple[dict, dict]:
    variants, seconds = {}, {}
    for key, pt2 in keys:
        variants[key], seconds[key] = aoti_runner(ex[pt2].payload, batches, f"{tag}_{key}")
        print(f"  AOTInductor {key}: compiled in {seconds[key]:.0f} s", flush=True)
    return variants, seconds


def _aoti_agreement(variants: dict, model, graph_name: str, stats, batches: list) -> dict:
    """AOTInductor's outputs against the eager greedy model (decisions, classes, logits), per variant."""
    res = {}
    for key, run in variants.items():
        thr = 0.0 if "all" in key else None
        graph = build_graph(model, "plain" if "plain" in key else graph_name, stats, thr)
        outs = run()
        tot = {"max_abs_logit_diff": 0.0, "decision_mismatches": 0, "same_classes": True}
        for x, out in zip(batches, outs):
            r = compare(
                *eager_reference(model, graph, torch.from_numpy(x)),
                *((out, None) if "plain" in key else (out[0], out[2])),
            )
            tot["max_abs_logit_diff"] = max(tot["max_abs_logit_diff"], r["max_abs_logit_diff"])
            tot["decision_mismatches"] += r.get("decision_mismatches", 0)
            tot["same_classes"] &= r["same_classes"]
        res[key] = tot
    return res


def load_seconds(payload: bytes) -> dict:
    """Seconds to open a session on the conditional graph: as written (ORT_ENABLE_ALL), precompiled (the model
    ONNX Runtime optimised, saved via ``optimized_model_filepath``, opened without optimisation), and
    ``layout="nchwc"`` (the rewrite, its probe check against the graph as written, and both sessions)."""
    from skipnet.export import blocked_layout, onnx_session, ort_optimized

    pre = ort_optimized(payload).SerializeToString()
    blocked = blocked_layout(payload)
    res = {}
    for key, fn in (
        ("as_written", lambda: onnx_session(payload, layout="nchw")),
        ("precompiled", lambda: onnx_session(pre, layout="nchw", level="disable")),
        ("precompiled_nchwc", lambda: onnx_session(blocked, layout="nchw", level="disable")),
        ("layout_nchwc", lambda: onnx_session(payload, layout="nchwc")),
    ):
        t0 = time.perf_counter()
        try:
            for _ in range(3):
                fn()
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own optimised file of a feed-forward-gate graph
            res[key] = f"fails to load: {str(exc).splitlines()[0][:160]}"  # reuses names across If branches
            continue
        res[key] = (time.perf_counter() - t0) / 3
    return res


def macs_ideal(model, size: int, decisions: torch.Tensor) -> float:
    """The MACs ideal speed-up of the routes ``decisions`` took: the plain network's MACs over their mean."""
    from skipnet.cost import cost_model

    cm = cost_model(model, size)
    return float(cm.total_macs_all_on) / float(cm.macs_per_image(decisions).mean())


def deploy_batch1(model, arch: str, ex: dict, stats, images: torch.Tensor, args) -> dict:
    batches = [images[i : i + 1].contiguous().numpy() for i in range(len(images))]
    first = ort_runner(ex["cond"].payload, batches)()
    dec = torch.from_numpy(np.concatenate([o[2] for o in first]))
    ideal = macs_ideal(model, int(images.shape[-1]), dec)
    variants = _b1_variants(ex, batches, dec, rnn=model.config.gate == "rnn")
    aoti_s, aoti_agree = {}, {}
    if args.aoti and arch in args.aoti_models:
        keys = (("aoti_plain", "plain_pt2"), ("aoti_cond", "cond_pt2"), ("aoti_cond_all", "cond_all_pt2"))
        aoti, aoti_s = _aoti_variants(ex, batches, keys, "b1")
        aoti_agree = _aoti_agreement(aoti, model, "conditional", stats, batches)
        variants |= aoti
    outs = {k: f() for k, f in variants.items() if not k.startswith(("aoti", "oracle"))}
    times = _time(variants, args.rounds, len(batches))
    return {
        "batch": 1,
        "images": len(images),
        "executed": float(dec.mean()),
        "ideal": ideal,
        "times": times,
        "agreement": _agreement(outs) | aoti_agree,
        "aoti_compile_s": aoti_s,
        "load_s": load_seconds(ex["cond"].payload),
        "rows": _lever_rows(_levers_b1(model), times, ideal, int(dec.shape[1])),
    }


def _levers_b1(model) -> tuple:
    """The batch-1 levers that apply to ``model``: the LSTM rewrite is the recurrent gate's; a feed-forward gate's
    ``layout="nchwc"`` is the blocked layout alone (its head as 1x1 convolutions measured no faster: issue 32)."""
    if model.config.gate == "rnn":
        return LEVERS_B1
    nchwc = "ORT, NCHWc kept across If"
    kept = [lv for lv in LEVERS_B1 if "LSTM" not in lv[0]]
    return tuple((f"{nchwc} (layout=nchwc)" if lv[0] == nchwc else lv[0], *lv[1:]) for lv in kept)


LEVERS_B32 = (
    ("ORT, routed, ORT_ENABLE_ALL", "routed", None, "plain"),
    ("ORT, routed, NCHWc kept through Gather/ScatterND (layout=nchwc)", "routed_nchwc", None, "plain"),
    ("ORT, routed, NCHWc kept, no whole-batch If (the rewrite before)", "routed_unguarded", None, "plain"),
    ("ORT, routed, ORT_ENABLE_EXTENDED (no NCHWc)", "routed_ext", None, "plain"),
    ("ORT, masked (every block; no saving)", "masked", None, "plain"),
    ("AOTInductor, routed, vs its own plain", "aoti_routed", None, "aoti_plain"),
)


def whole_batch_share(routed: bytes, images: torch.Tensor, batch: int = 32) -> float:
    """The share of (batch, gated block) pairs that every image of the batch executes, over ``images`` in batches of
    ``batch`` (the blocks the routed graph's whole-batch ``If`` runs ungathered)."""
    batches = [images[i : i + batch].contiguous().numpy() for i in range(0, len(images) - batch + 1, batch)]
    dec = np.stack([o[2] for o in ort_runner(routed, batches, layout="nchw")()])  # (batches, batch, blocks)
    return float(dec.min(axis=1).mean())


def deploy_batch32(model, arch: str, ex: dict, stats, test: torch.Tensor, args) -> dict:
    """Batch 32 on the first 64 of the ``test`` images (timed); the whole-batch share over all of them."""
    from skipnet.export import blocked_routed

    images = test[:64]
    batches = [images[i : i + 32].contiguous().numpy() for i in range(0, len(images), 32)]
    routed, plain = ex["routed"].payload, ex["plain"].payload
    v = {"plain": ort_runner(plain, batches), "routed": ort_runner(routed, batches)}
    v["routed_nchwc"] = ort_runner(routed, batches, layout="nchwc")
    v["routed_unguarded"] = ort_runner(blocked_routed(routed, guards=False), batches)
    v["routed_ext"] = ort_runner(routed, batches, level="extended")
    if ex.get("masked") is not None:
        v["masked"] = ort_runner(ex["masked"].payload, batches)
    routed_out = v["routed"]()  # the decisions, and the reference of the blocked layout's agreement below
    dec = torch.from_numpy(np.concatenate([o[2] for o in routed_out]))
    ideal = macs_ideal(model, int(images.shape[-1]), dec)
    aoti_s, aoti_agree = {}, {}
    if args.aoti and arch in args.aoti_models:
        keys = (("aoti_plain", "plain_pt2"), ("aoti_routed", "routed_pt2"))
        aoti, aoti_s = _aoti_variants(ex, batches, keys, "b32")
        try:
            aoti_agree = _aoti_agreement(aoti, model, "routed", stats, batches)
            v |= aoti
        except RuntimeError as exc:  # the routed program's data-dependent sizes (recorded, not timed)
            aoti_agree = {"aoti_routed": {"error": str(exc).strip().splitlines()[0][:200]}}
            print(f"  AOTInductor routed fails at batch 32: {aoti_agree['aoti_routed']['error']}", flush=True)
    for key in ("routed_nchwc", "routed_unguarded"):
        aoti_agree[key] = _agree_outputs(v[key](), routed_out)
    whole = whole_batch_share(routed, test)
    times = _time(v, max(3, args.rounds // 2), len(images))
    return {
        "batch": 32,
        "images": len(images),
        "executed": float(dec.mean()),
        "ideal": ideal,
        "times": times,
        "agreement": aoti_agree,
        "aoti_compile_s": aoti_s,
        "whole_batch_share": whole,
        "rows": _lever_rows(LEVERS_B32, times, ideal, int(dec.shape[1])),
    }


def deploy(args) -> dict:
    THREADS["intra_op"] = args.threads
    torch.set_num_threads(args.threads)
    data, cifar_stats = cifar()
    out = {"env": env(), "rounds": args.rounds, "threads": args.threads, "models": []}
    for arch in args.models:
        model, stats, what = deploy_model(arch, data, cifar_stats)
        print(f"{what}", flush=True)
        ex = _deploy_exports(model, stats, args.aoti and arch in args.aoti_models)
        ex["masked"] = export_model(model, "onnx", graph="masked", stats=stats, probes=1)
        entry = {"arch": arch, "model": what, "gated_blocks": len(model.gated_blocks)}
        entry["batch1"] = deploy_batch1(model, arch, ex, stats, split_pixels(data, "test", args.images), args)
        _print_rows(arch, entry["batch1"])
        entry["batch32"] = deploy_batch32(model, arch, ex, stats, split_pixels(data, "test", 1024), args)
        _print_rows(arch, entry["batch32"])
        out["models"].append(entry)
    return out


def workers(args) -> dict:
    """Batch 32 on all cores (issue 32): each model's routed graph and its plain ResNet, as skipnet runs them
    (``onnx_session``), at one intra-op thread, at ``--threads`` intra-op threads, and as ``--workers`` one-thread
    sessions on shards of each batch (``ShardedSession``); wall time on the first 64 test images, the plain and the
    routed graph interleaved, each way in its own rounds."""
    torch.set_num_threads(1)
    data, cifar_stats = cifar()
    images = split_pixels(data, "test", 64)
    batches = [images[i : i + 32].contiguous().numpy() for i in range(0, len(images), 32)]
    n, w = args.threads, args.workers
    out = {"env": env(), "rounds": args.rounds, "threads": n, "workers": w, "images": len(images), "models": []}
    for arch in args.models:
        model, stats, what = deploy_model(arch, data, cifar_stats)
        print(what, flush=True)
        v = {}
        for key in ("plain", "routed"):
            payload = export_model(model, "onnx", graph=key, stats=stats, probes=1).payload
            for tag, threads, k in (("t1", 1, 1), (f"t{n}", n, 1), (f"w{w}", 1, w)):
                v[f"{key}_{tag}"] = ort_runner(payload, batches, layout="nchwc", threads=threads, workers=k)
        ref, sharded = v["routed_t1"](), v[f"routed_w{w}"]()
        same = all(np.array_equal(a, b) for x, y in zip(ref, sharded) for a, b in zip(x, y))
        dec = torch.from_numpy(np.concatenate([o[2] for o in ref]))
        ideal = macs_ideal(model, int(images.shape[-1]), dec)
        tags, times = ("t1", f"t{n}", f"w{w}"), {}
        for tag in tags:  # each way timed by itself: spinning intra-op threads of one way would slow another's
            times |= _time({k: v[k] for k in (f"plain_{tag}", f"routed_{tag}")}, args.rounds, len(images))
        wall = {k: t["wall_ms"] for k, t in times.items()}
        rows = {tag: wall[f"plain_{tag}"] / wall[f"routed_{tag}"] / ideal for tag in tags}
        rows[f"w{w}_vs_best_plain"] = min(wall[f"plain_t{n}"], wall[f"plain_w{w}"]) / wall[f"routed_w{w}"] / ideal
        entry = {"arch": arch, "model": what, "executed": float(dec.mean()), "ideal": ideal, "wall_ms": wall}
        out["models"].append(entry | {"efficiency": rows, "sharded_equal_one_session": same})
        print(f"  ideal {ideal:.2f}x, efficiency {rows}, sharded outputs equal: {same}", flush=True)
    return out


def workers_markdown(result: dict) -> str:
    """The table of :func:`workers` as markdown (written beside the JSON)."""
    n, w = result["threads"], result["workers"]
    lines = [f"# Batch 32 on all cores (issue 32): `{result['env']['command']}`", "", f"{result['env']}", ""]
    lines += [
        f"Wall time per image, median of {result['rounds']} rounds over {result['images']} test images (plain and "
        "routed interleaved, each way in its own rounds); "
        f"efficiency = (plain / SkipNet) / the MACs ideal, each run the same way; the last column against the "
        f"faster plain way at {n} cores.",
        "",
        f"| model | ideal | 1 thread | {n} intra-op threads | {w} one-thread workers | workers vs best plain | "
        f"plain ms: 1 / {n} threads / {w} workers | routed ms: the same | sharded = one session |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        e, t = m["efficiency"], m["wall_ms"]
        lines.append(
            f"| {m['model']} | {m['ideal']:.2f}x | {e['t1']:.3f} | {e[f't{n}']:.3f} | {e[f'w{w}']:.3f} | "
            f"{e[f'w{w}_vs_best_plain']:.3f} | {t['plain_t1']:.3f} / {t[f'plain_t{n}']:.3f} / {t[f'plain_w{w}']:.3f} "
            f"| {t['routed_t1']:.3f} / {t[f'routed_t{n}']:.3f} / {t[f'routed_w{w}']:.3f} | "
            f"{m['sharded_equal_one_session']} |"
        )
    return "\n".join(lines) + "\n"


def _print_rows(arch: str, res: dict) -> None:
    print(f"{arch}, batch {res['batch']}: {res['executed']:.3f} executed, ideal {res['ideal']:.2f}x", flush=True)
    for r in res["rows"]:
        extra = f"  all executed {r['overhead_all']:+.1%} ({r['us_per_block']:.1f} us/block)" if "all_ms" in r else ""
        print(f"  {r['lever']:<58} {r['ms']:7.3f} ms  eff {r['efficiency']:.3f}{extra}", flush=True)


def deploy_markdown(result: dict) -> str:
    """The lever table of :func:`deploy` as markdown (written beside the JSON)."""
    lines = [f"# Deploy speed (issue 32): `{result['env']['command']}`", "", f"{result['env']}", ""]
    threads = result.get("threads", 1)
    for m in result["models"]:
        for key in ("batch1", "batch32"):
            r = m[key]
            whole = r.get("whole_batch_share")
            share = "" if whole is None else f", {whole:.1%} of (batch, block) pairs of 1,024 images whole-batch"
            lines += [
                f"## {m['model']}, batch {r['batch']} ({r['executed']:.3f} of {m['gated_blocks']} gated blocks "
                f"executed{share}, ideal {r['ideal']:.2f}x, median of {result['rounds']} interleaved rounds, "
                f"{threads} intra-op thread(s), {'CPU' if threads == 1 else 'wall'} time; wall time in its column)",
                "",
                "| lever | SkipNet ms/img | plain ms/img | speed-up | efficiency | (wall) | all executed: overhead | "
                "per block |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for row in r["rows"]:
                over = f"{row['overhead_all']:+.1%} | {row['us_per_block']:.1f} µs" if "all_ms" in row else "— | —"
                lines.append(
                    f"| {row['lever']} | {row['ms']:.3f} | {row['plain_ms']:.3f} | {row['speedup']:.2f}x | "
                    f"{row['efficiency']:.3f} | {row['wall_efficiency']:.3f} | {over} |"
                )
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("speed", "agreement", "deploy", "shipped", "workers"))
    p.add_argument("--arch", default="cifar10_rnn_gate_110", help="speed: the architecture")
    p.add_argument("--images", type=int, default=16, help="speed: test images per round (batch 1)")
    p.add_argument("--no-batched", action="store_true", help="speed: skip the routed batched graph")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--limit", type=int, default=None, help="agreement: first N test images (default: all)")
    p.add_argument("--imagenet-images", type=int, default=4)
    p.add_argument("--out", default=None)
    p.add_argument("--models", nargs="+", default=list(DEPLOY_MODELS), help="deploy: the architectures")
    p.add_argument("--rounds", type=int, default=15, help="deploy: interleaved rounds (batch 32: half)")
    p.add_argument("--no-aoti", dest="aoti", action="store_false", help="deploy: leave AOTInductor out")
    p.add_argument(
        "--threads", type=int, default=1, help="deploy: intra-op threads (all cores: the wall-time column counts)"
    )
    p.add_argument(
        "--aoti-models", nargs="+", default=["cifar10_rnn_gate_38"], help="deploy: models also compiled by AOTInductor"
    )
    p.add_argument("--workers", type=int, default=2, help="workers: one-thread sessions on shards of each batch")
    args = p.parse_args()
    if args.what in ("deploy", "workers"):
        result = deploy(args) if args.what == "deploy" else workers(args)
        name = "deploy_speed.json" if args.what == "deploy" else "workers_speed.json"
        out = Path(args.out or HERE / "results" / name)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        md = deploy_markdown(result) if args.what == "deploy" else workers_markdown(result)
        out.with_suffix(".md").write_text(md)
        print(f"wrote {out} and {out.with_suffix('.md')}")
        return
    if args.what == "shipped":
        result, name = shipped(args), "export_agreement_shipped.json"
    else:
        result = speed(args) if args.what == "speed" else agreement(args)
        tag = "" if args.what == "agreement" or args.arch == "cifar10_rnn_gate_110" else f"_{args.arch}"
        name = f"export_{args.what}{tag}.json"
    out = Path(args.out or HERE / "results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
