"""Issue 18: what a conditional block costs in ONNX Runtime by itself (the floor under the speed targets).

    python benchmarks/onnx_floor.py            # cifar10_rnn_gate_110, batch 1, one thread (~6 min)

The exported conditional graph of the bias-set ResNet-110 of ``export_speed.py`` (all gated blocks executed:
threshold 0; the model is :func:`skipnet.bench.bias_set_model`'s) is rewritten into graphs that each keep one more
part of a SkipNet block, and all are timed interleaved against the plain ResNet-110 unfolded from it (same BN-folded
weights, same kernels):

- ``plain``: every ``If`` replaced by its ``then`` branch, gates pruned;
- ``if_only``: every ``If`` kept, its condition a graph input fed ``True``, gates pruned: the cost of running a
  block as an ``If`` branch (the node, and the NCHWc layout boundary: reorder in and out, unfused Add + ReLU);
- ``if_pool``: as ``if_only`` but the condition computed from the block input's spatial mean (the gate's first
  node) against -1e30: adds the pooling;
- ``conditional``: the exported graph (the recurrent gate, ~16 nodes a block, decides);
- ``slice``: the exported graph with every ``If`` replaced by batch-axis ``Slice``s (N = d and 1 - d rows) run
  through the block and the skip path and ``Concat``-ed back: conditional without a subgraph.

Also the half-executed model's conditional and slice graphs, and its ``oracle``: the ``If``s fed the decisions the
conditional graph took on each image as graph inputs, gates pruned (a gate that costs nothing). Reports the
calling thread's CPU time per image (median of interleaved rounds), the overhead per gated block against the
budget the issue sets (at all executed, at most 5% slower than plain) and, at half, the share of the ideal
speed-up from MACs (target 0.85). Writes ``benchmarks/results/onnx_floor.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from skipnet.bench import bias_set_model, environment, load_bench_data, split_pixels, time_interleaved
from skipnet.bench_onnx import _prune, inline_branch, unfold_ifs
from skipnet.cost import cost_model
from skipnet.export import export_model, onnx_session

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"  # as export_speed.py reads it


def _outer_input(node) -> str:
    """The one outer-scope value an ``If``'s ``then`` branch reads (the block input)."""
    sub = next(a.g for a in node.attribute if a.name == "then_branch")
    made = {o for n in sub.node for o in n.output} | {t.name for t in sub.initializer}
    (x,) = {i for n in sub.node for i in n.input if i not in made}
    return x


def _copy_without_nodes(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list]:
    """A copy of ``proto`` whose graph has the rewrite's constants and no nodes yet, and the nodes it had."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    _constants(model.graph)
    old = list(model.graph.node)
    del model.graph.node[:]
    return model, old


def _constants(graph) -> None:
    graph.initializer.extend(
        [
            nh.from_array(np.array([0], np.int64), "fl_zero"),
            nh.from_array(np.array([1], np.int64), "fl_one"),
            nh.from_array(np.array([1, 2, 3], np.int64), "fl_axes"),
            nh.from_array(np.array([], np.int64), "fl_scalar"),
            nh.from_array(np.float32(-1e30), "fl_low"),
        ]
    )


def sliced(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every ``If`` on decision d replaced by Concat(then(x[:d]), else(x[:1-d])) along the batch (batch 1)."""
    model, old = _copy_without_nodes(proto)
    g = model.graph
    for k, node in enumerate(old):
        if node.op_type != "If":
            g.node.append(node)
            continue
        p, x = f"fl{k}_", _outer_input(node)
        g.node.extend(
            [
                helper.make_node("Cast", [node.input[0]], [p + "d"], to=TensorProto.INT64),
                helper.make_node("Reshape", [p + "d", "fl_one"], [p + "n"]),
                helper.make_node("Sub", ["fl_one", p + "n"], [p + "m"]),
                helper.make_node("Slice", [x, "fl_zero", p + "n", "fl_zero"], [p + "xt"]),
                helper.make_node("Slice", [x, "fl_zero", p + "m", "fl_zero"], [p + "xe"]),
            ]
        )
        branch = {a.name: a.g for a in node.attribute}
        then_nodes, (yt,) = inline_branch(g, branch["then_branch"], p + "t/", {x: p + "xt"})
        else_nodes, (ye,) = inline_branch(g, branch["else_branch"], p + "e/", {x: p + "xe"})
        g.node.extend([*then_nodes, *else_nodes, helper.make_node("Concat", [yt, ye], [node.output[0]], axis=0)])
    onnx.checker.check_model(model)
    return model


def gateless(proto: onnx.ModelProto, pool: bool) -> onnx.ModelProto:
    """Every ``If`` kept, its condition a graph input ``decision_J`` (``pool=False``; J counts the ``If``s) or
    mean(x) >= -1e30; gates pruned."""
    model, old = _copy_without_nodes(proto)
    g = model.graph
    j = 0
    for k, node in enumerate(old):
        if node.op_type == "If":
            p = f"fl{k}_"
            if pool:
                g.node.extend(
                    [
                        helper.make_node("ReduceMean", [_outer_input(node), "fl_axes"], [p + "mean"], keepdims=0),
                        helper.make_node("GreaterOrEqual", [p + "mean", "fl_low"], [p + "ge"]),
                        helper.make_node("Reshape", [p + "ge", "fl_scalar"], [p + "c"]),
                    ]
                )
            else:
                g.input.append(helper.make_tensor_value_info(f"decision_{j}", TensorProto.BOOL, []))
            node.input[0] = p + "c" if pool else f"decision_{j}"
            j += 1
        g.node.append(node)
    keep = [o for o in g.output if o.name == "logits"]
    del g.output[:]
    g.output.extend(keep)
    _prune(g)
    onnx.checker.check_model(model)
    return model


def time_all(
    graphs: dict[str, bytes], images: np.ndarray, repeats: int, ref: str, decisions: np.ndarray | None = None
) -> dict[str, float]:
    """CPU ms per image of each graph (batch 1), interleaved rounds; checks that every graph's logits agree with
    those of graph ``ref`` (``plain`` only where all blocks execute). A graph's ``decision_J`` inputs are fed
    ``decisions[image, J]`` (all ``True`` without ``decisions``)."""
    sessions = {k: onnx_session(b, threads=1, layout="nchw") for k, b in graphs.items()}

    def runner(s):
        def feed(i: int) -> dict[str, np.ndarray]:
            out = {s.get_inputs()[0].name: images[i : i + 1]}
            for v in s.get_inputs()[1:]:
                j = int(v.name.removeprefix("decision_"))
                out[v.name] = np.array(True if decisions is None else bool(decisions[i, j]))
            return out

        feeds = [feed(i) for i in range(len(images))]
        return lambda: [s.run(None, f)[0] for f in feeds]

    outs = {k: np.concatenate(runner(s)()) for k, s in sessions.items()}
    for k, o in outs.items():
        if (k != "plain" or ref == "plain") and np.abs(o - outs[ref]).max() > 1e-4:
            sys.exit(f"{k}: logits differ from {ref}'s by {np.abs(o - outs[ref]).max():.2e}")
    cpu: dict[str, list[float]] = {}
    time_interleaved({k: runner(s) for k, s in sessions.items()}, repeats, 2, cpu)
    return {k: 1e3 * statistics.median(v) / len(images) for k, v in cpu.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(HERE / "results" / "onnx_floor.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    data, stats = load_bench_data(DATA)
    model, reached = bias_set_model("cifar10_rnn_gate_110", data, stats, 0.5)
    images = split_pixels(data, "test", args.images).numpy()
    full = onnx.load_from_string(export_model(model, "onnx", stats=stats, threshold=0.0, probes=1).payload)
    half = onnx.load_from_string(export_model(model, "onnx", stats=stats, probes=1).payload)
    blocks = sum(n.op_type == "If" for n in full.graph.node)
    all_on = {
        "plain": unfold_ifs(full, "then"),
        "if_only": gateless(full, pool=False),
        "if_pool": gateless(full, pool=True),
        "conditional": full,
        "slice": sliced(full),
    }
    ms = time_all({k: m.SerializeToString() for k, m in all_on.items()}, images, args.repeats, "plain")
    session = onnx_session(half.SerializeToString(), threads=1, layout="nchw")
    decisions = np.concatenate([session.run(None, {"images": images[i : i + 1]})[2] for i in range(len(images))])
    cm = cost_model(model, images.shape[-1])
    ideal = float(cm.total_macs_all_on / cm.macs_per_image(torch.from_numpy(decisions)).mean())
    half_graphs = {
        "plain": all_on["plain"],
        "conditional": half,
        "slice": sliced(half),
        "oracle": gateless(half, False),
    }
    ms_half = time_all(
        {k: m.SerializeToString() for k, m in half_graphs.items()}, images, args.repeats, "conditional", decisions
    )
    per_block = {k: 1e3 * (v - ms["plain"]) / blocks for k, v in ms.items()}
    result = {
        "env": environment("torch", "onnxruntime"),
        "model": "cifar10_rnn_gate_110, BN calibrated on CIFAR-10, gate bias set (export_speed.py)",
        "gated_blocks": blocks,
        "keep_half": reached,
        "cpu_ms_all_executed": ms,
        "overhead_us_per_block": per_block,
        "budget_us_per_block_5pct": 1e3 * 0.05 * ms["plain"] / blocks,
        "cpu_ms_half_executed": ms_half,
        "half_executed": float(decisions.mean()),
        "ideal_speedup_half": ideal,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for k, v in ms.items():
        print(f"all executed  {k:<12} {v:6.2f} ms  {v / ms['plain'] - 1:+7.1%}  {per_block[k]:6.1f} us per gated block")
    print(f"budget (5% of plain over {blocks} gated blocks): {result['budget_us_per_block_5pct']:.1f} us per block")
    for k, v in ms_half.items():
        speedup = ms_half["plain"] / v
        share = f"{speedup:.2f}x of ideal {ideal:.2f}x = {speedup / ideal:.2f}"
        print(f"half ({decisions.mean():.2f})   {k:<12} {v:6.2f} ms  {share}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
