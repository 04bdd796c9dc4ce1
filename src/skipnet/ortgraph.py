"""ONNX Runtime graphs for the CPU they run on (issue 32): the rewrites skipnet applies when it opens an exported
graph, and the session it opens it in.

ONNX Runtime's layout pass (its blocked NCHWc convolutions, ~1.7x faster) stops at ``If`` boundaries and at
``Gather``/``ScatterND``: :func:`blocked_layout` keeps the blocked layout across a conditional graph's ``If`` nodes
(and makes the recurrent gate one ``LSTM`` node, :func:`lstm_gates`), :func:`blocked_routed` through a routed
graph's gathers and scatters (and runs a block that the whole batch takes ungathered). Each starts from the graph
as ONNX Runtime optimises it on this CPU (:func:`ort_optimized`), so its result is for this CPU and runtime version
only. :func:`onnx_session` applies the rewrite that fits a graph, checks it against the graph as written on probe
images and falls back, with a warning, where it does not apply; with ``workers`` it returns a
:class:`ShardedSession`, several sessions that run a batch's shards at once (throughput on several cores). The
exported files themselves (:mod:`skipnet.export`) stay standard, portable ONNX.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from skipnet.errors import SkipnetError

LOGIT_TOL = 1e-4  # max |exported - eager| logit difference accepted by the export's own check (and a rewrite's),
# relative to the largest logit where that is over 1


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or the one error that says how to install them (also checks onnxscript)."""
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401 - torch.onnx's dynamo exporter needs it
    except ImportError as exc:
        raise SkipnetError(
            f"ONNX export and benchmarking need onnx, onnxruntime and onnxscript ({exc.name} is missing); "
            "install them with: pip install 'skipnet[export]' (or pip install -e '.[export]')"
        ) from None
    return onnx, onnxruntime


NCHWC = "com.microsoft.nchwc"  # ONNX Runtime's blocked-layout operators (CPU execution provider)


def ort_optimized(model_bytes: bytes, level: str = "all") -> Any:
    """The model ONNX Runtime runs after its graph optimisations at ``level`` (``all``: with the NCHWc layout
    rewrite; the result is for this CPU and runtime version only), as a ModelProto."""
    import tempfile

    onnx, ort = require_onnx()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = _LEVELS[level](ort)
    with tempfile.TemporaryDirectory() as tmp:
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


_LEVELS = {
    "disable": lambda ort: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": lambda ort: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": lambda ort: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": lambda ort: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _attr(node: Any, name: str) -> Any:
    import onnx

    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def _blocked_branch(sub: Any, outer: str, blocked: str) -> int:
    """Rewrite an ``If`` branch of an NCHWc-optimised graph to take the block input in the blocked layout
    (``blocked``, instead of reordering ``outer`` in) and return its output blocked: the final reorder, residual
    ``Add`` and ``Relu`` fold into the last convolution (its ``Sum`` input and ``Relu`` activation), as in the
    plain network. Returns the output's channel count (0 for an identity branch)."""
    ren, nodes = {}, []
    for n in sub.node:
        if n.domain == NCHWC and n.op_type == "ReorderInput" and n.input[0] == outer:
            ren[n.output[0]] = blocked
        else:
            nodes.append(n)
    made = {}
    for n in nodes:
        n.input[:] = [blocked if i == outer and n.op_type == "Identity" else ren.get(i, i) for i in n.input]
        made.update({o: n for o in n.output})
    want = sub.output[0].name  # unique in the model (branch-local names such as reorder_token_5 are not)
    last, drop, channels, value = made[want], set(), 0, want
    if last.op_type == "ReorderOutput":
        drop.add(id(last))
        channels, value = _attr(last, "channels"), last.input[0]
    elif last.op_type == "Relu" and made.get(last.input[0]) is not None and made[last.input[0]].op_type == "Add":
        channels, value = _fold_residual(made, last, outer, blocked, drop)
    elif last.op_type != "Identity":
        raise ValueError(f"a branch ending in {last.op_type}")
    kept = [n for n in nodes if id(n) not in drop]
    for n in kept:
        n.input[:] = [want if i == value else i for i in n.input]
        n.output[:] = [want if o == value else o for o in n.output]
    if any(outer in n.input for n in kept):
        raise ValueError("a branch reads the block input in NCHW")
    del sub.node[:]
    sub.node.extend(kept)
    sub.output[0].type.tensor_type.ClearField("shape")
    return channels


def _fold_residual(made: dict[str, Any], relu: Any, outer: str, blocked: str, drop: set[int]) -> tuple[int, str]:
    """``Relu(Add(ReorderOutput(conv), residual))`` ending a branch -> the NCHWc ``conv`` with the (blocked)
    residual as its ``Sum`` input and a ``Relu`` activation; the folded nodes' ids added to ``drop``.
    Returns ``(channels, the conv's output)``."""
    add = made[relu.input[0]]
    a, b = add.input
    reorder, other = (made[a], b) if a in made and made[a].op_type == "ReorderOutput" else (made[b], a)
    conv = made[reorder.input[0]]
    if other == outer:
        total = blocked
    elif made[other].op_type == "ReorderOutput":  # the downsample's output, reordered back: take it blocked
        total = made[other].input[0]
        drop.add(id(made[other]))
    else:
        raise ValueError(f"a residual from {made[other].op_type}")
    plain_conv = conv.domain == NCHWC and conv.op_type == "Conv" and len(conv.input) <= 3
    if not plain_conv or any(a.name == "activation" for a in conv.attribute):
        raise ValueError("the block's last convolution is not a plain NCHWc Conv")
    conv.input.extend([""] * (3 - len(conv.input)) + [total])
    conv.attribute.append(_make_attr("activation", "Relu"))
    drop.update({id(reorder), id(add), id(relu)})
    return _attr(reorder, "channels"), conv.output[0]


def _pool_blocked(node: Any, value: str) -> list[Any]:
    """The gate's ``ReduceMean`` over H, W as NCHWc ``GlobalAveragePool`` of the blocked ``value`` (at 1x1 the
    blocked and plain layouts are one), reshaped as the ``ReduceMean`` returned it."""
    from onnx import helper

    pooled = node.output[0] + "_pooled"
    nodes = [helper.make_node("GlobalAveragePool", [value], [pooled], domain=NCHWC)]
    if _attr(node, "keepdims"):
        return [*nodes, helper.make_node("Identity", [pooled], [node.output[0]])]
    return [*nodes, helper.make_node("Flatten", [pooled], [node.output[0]], axis=1)]  # (B, C), an empty batch too


def _reorder_out(blocked: str, plain: str, channels: int) -> Any:
    from onnx import helper

    return helper.make_node("ReorderOutput", [blocked], [plain], domain=NCHWC, channels_last=0, channels=channels)


def blocked_layout(model_bytes: bytes, fuse_gates: bool = True, direct_conditions: bool = True) -> bytes:
    """A conditional graph rewritten to keep ONNX Runtime's blocked NCHWc layout across its ``If`` nodes (issue 32).

    ONNX Runtime optimises each ``If`` branch by itself: a value that crosses the boundary is plain NCHW, so every
    executed block reorders its input in and its output out, and leaves its residual ``Add`` + ``Relu`` unfused.
    This takes the graph as ONNX Runtime optimises it *on this CPU* (its NCHWc operators and pre-reordered weights)
    and passes the blocked values through the ``If`` nodes instead: each branch reads the blocked block input and
    returns its blocked output (the residual and ReLU fused into the last convolution, as in the plain network),
    the gates pool the blocked value (NCHWc ``GlobalAveragePool``: at 1x1 the blocked and plain layouts are one),
    and anything else reads a reordered copy. Same function (the same kernels as the plain network; the gates'
    means summed in another order, ~1e-7). The result is for this CPU and ONNX Runtime version only: build it
    where it runs (:func:`onnx_session` does with ``layout="nchwc"``). Raises ``ValueError`` for a graph it does
    not recognise (no ``If``, a branch that is not a convolution chain); :func:`onnx_session` also checks the
    result against the graph as written on probe images before it uses it.
    ``fuse_gates`` also rewrites the recurrent gates into one ``LSTM`` node each (:func:`lstm_gates`);
    ``direct_conditions`` lets each ``If`` read its gate's comparison without the ``Reshape`` to a scalar
    (:func:`_direct_conditions`; off only to measure it)."""
    proto = ort_optimized(model_bytes)
    graph, blocked, channels, nodes, restored = proto.graph, {}, {}, [], set()
    if not any(n.op_type == "If" for n in graph.node):
        raise ValueError("no If node")
    _unique_branch_names(graph)
    inits = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.domain == NCHWC and n.op_type == "ReorderOutput":
            blocked[n.output[0]], channels[n.input[0]] = n.input[0], _attr(n, "channels")
    for n in graph.node:
        if n.op_type == "If":
            branches = [a.g for a in n.attribute]
            made = {o for b in branches for m in b.node for o in m.output}
            (outer,) = {i for b in branches for m in b.node for i in m.input if i in blocked and i not in made}
            outs = {_blocked_branch(b, outer, blocked[outer]) for b in branches} - {0}
            name = n.output[0] + "_nchwc"
            blocked[n.output[0]], channels[name], n.output[0] = name, (outs or {channels[blocked[outer]]}).pop(), name
        elif n.op_type == "ReduceMean" and n.input[0] in blocked and _spatial(inits, n):
            nodes += _pool_blocked(n, blocked[n.input[0]])
            continue
        elif n.domain == NCHWC and n.op_type == "ReorderOutput":
            continue  # put back below, where a plain consumer needs it
        for i in n.input:
            if i in blocked and i not in restored and blocked[i] != i:
                restored.add(i)
                nodes.append(_reorder_out(blocked[i], i, channels[blocked[i]]))
        nodes.append(n)
    if direct_conditions:  # one node fewer a gate (a feed-forward gate's too; measured in export_speed.py deploy)
        _direct_conditions(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    prune_graph(graph)
    return (lstm_gates(proto) if fuse_gates else proto).SerializeToString()


def blocked_routed(model_bytes: bytes, guards: bool = True) -> bytes:
    """A routed graph rewritten to keep ONNX Runtime's blocked NCHWc layout through its per-block ``Gather`` and
    ``ScatterND`` (issue 32, batches).

    ONNX Runtime's layout pass stops at operators it has no blocked kernel for, so each block of the routed graph
    as it optimises it gathers its images in NCHW, reorders them in, runs its convolutions, reorders the result
    out, adds the residual and applies the ReLU in NCHW, and scatters back in NCHW; the gate pools the NCHW value.
    Gathering and scattering along the batch axis are the same on the blocked value (the batch is its outer axis),
    so here each block gathers and scatters the blocked values, its residual and ReLU fold into its last
    convolution (its ``Sum`` input and ``Relu`` activation, as in the plain network), and the gate pools the blocked
    value (NCHWc ``GlobalAveragePool``); anything else reads a reordered copy. Same function (the gates' means
    summed in another order, ~1e-7). ``guards`` also runs each block on the whole batch, ungathered, when every
    image takes it (:func:`_whole_batch_guards`). For this CPU and ONNX Runtime version only, like
    :func:`blocked_layout`; raises ``ValueError`` for a graph that is not a routed one."""
    proto = ort_optimized(model_bytes)
    graph = proto.graph
    if any(n.op_type == "If" for n in graph.node) or not any(n.op_type == "ScatterND" for n in graph.node):
        raise ValueError("not a routed graph (ScatterND per block, no If)")
    rewrite = _RoutedLayout(graph)
    for n in graph.node:
        rewrite.take(n)
    nodes = rewrite.finish()
    nodes = _whole_batch_guards(nodes, set(rewrite.blocked.values())) if guards else nodes
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    prune_graph(graph)
    return proto.SerializeToString()


def _whole_batch_guards(nodes: list[Any], blocked: set[str]) -> list[Any]:
    """Each block that gathers its images from a blocked value and scatters them back into it, as an ``If`` on
    whether every image of the batch executes it: then the block runs on the whole batch, with neither gather nor
    scatter; else it gathers, runs and scatters as before. ONNX Runtime's ``ScatterND`` copies its whole input
    before it writes the updates, so a block that every image executes paid a gather and two copies of the batch
    for nothing (issue 32, batch 32: 0.786 -> 0.816 of the ideal on the bias-set SkipNet-110, where a third of the
    blocks run for the whole batch; 0.840 -> 0.828 on a per-image SkipNet-38, a tenth; ``export_speed.py
    deploy``). PyTorch's routed execution skips the gather in the same case. ``blocked`` names the blocked values.
    A block whose values are read outside it stays as it is."""
    made, users = {o: n for n in nodes for o in n.output}, _users(nodes)
    out, taken = [], set()
    for k, n in enumerate(nodes):
        if id(n) in taken:
            continue
        block = _scattered_block(n, nodes[k + 1 :], users, made) if n.output[0] in blocked else None
        if block is None:
            out.append(n)
            continue
        seg, before, decisions = block
        taken.update(id(m) for m in (*seg, *before))
        out += [*before, *_guarded(seg, decisions, f"_whole{k}")]
    return out


def _scattered_block(gather: Any, rest: list[Any], users: dict, made: dict) -> Any:
    """For a ``Gather`` along the batch: ``(the block's nodes from it to the ScatterND back into the value it
    gathers from, the other nodes before that ScatterND, the decision vector)``; ``None`` where it is not such a
    block."""
    if gather.op_type != "Gather":
        return None
    x = gather.input[0]
    end = next((j for j, m in enumerate(rest) if m.op_type == "ScatterND" and m.input[0] == x), None)
    decisions, v = None, gather.input[1]
    while v in made and decisions is None:  # the index is NonZero(decisions), reshaped
        decisions = made[v].input[0] if made[v].op_type == "NonZero" else None
        v = made[v].input[0] if made[v].input else ""
    if end is None or decisions is None:
        return None
    seg, inside = [gather], set(gather.output)
    for m in rest[:end]:
        if inside.intersection(m.input):
            seg.append(m)
            inside.update(m.output)
    seg.append(rest[end])
    ids = {id(m) for m in seg}
    if any(id(u) not in ids for m in seg[:-1] for o in m.output for u in users.get(o, [])):
        return None
    return seg, [m for m in rest[:end] if id(m) not in ids], decisions


def _guarded(seg: list[Any], decisions: str, tag: str) -> list[Any]:
    """:func:`_whole_batch_guards`' nodes for one block ``seg`` (its ``Gather`` ... ``ScatterND``)."""
    import onnx
    from onnx import TensorProto, helper

    gather, scatter = seg[0], seg[-1]
    result, ren = scatter.output[0], {gather.output[0]: gather.input[0]}
    whole = []
    for m in seg[1:-1]:  # the block on the whole batch: its convolutions read the block input itself
        c = onnx.NodeProto()
        c.CopyFrom(m)
        c.input[:] = [ren.get(i, i) for i in c.input]
        for q, o in enumerate(c.output):
            ren[o] = c.output[q] = o + tag
        whole.append(c)
    scatter.output[0] = result + tag  # the block's own nodes, as they were, are the other branch

    def branch(name: str, body: list[Any], value: str) -> Any:
        return helper.make_graph(body, name + tag, [], [helper.make_tensor_value_info(value, TensorProto.FLOAT, None)])

    as_int, least, every = decisions + tag + "_int", decisions + tag + "_min", decisions + tag + "_all"
    return [
        helper.make_node("Cast", [decisions], [as_int], to=TensorProto.INT32),
        helper.make_node("ReduceMin", [as_int], [least], keepdims=0),
        helper.make_node("Cast", [least], [every], to=TensorProto.BOOL),
        helper.make_node(
            "If",
            [every],
            [result],
            then_branch=branch("whole", whole, ren[scatter.input[2]]),
            else_branch=branch("some", seg, scatter.output[0]),
        ),
    ]


class _RoutedLayout:
    """:func:`blocked_routed`'s walk over the optimised routed graph, node by node (:meth:`take`): which plain
    values have a blocked twin, and the nodes of the rewritten graph."""

    def __init__(self, graph: Any) -> None:
        self.graph, self.inits, self.users = graph, {t.name: t for t in graph.initializer}, _users(graph.node)
        self.made = {o: n for n in graph.node for o in n.output}
        self.blocked: dict[str, str] = {}  # plain value -> its blocked twin
        self.channels: dict[str, int] = {}  # blocked value -> its (unpadded) channels
        self.alive = {i.name for i in graph.input} | set(self.inits)  # plain values the rewritten graph has
        self.ren: dict[str, str] = {}  # a ReorderInput's output -> the blocked twin it duplicates
        self.pending: dict[str, tuple[Any, str]] = {}  # a foldable Add's output -> (its convolution, residual)
        self.nodes: list[Any] = []

    def take(self, n: Any) -> None:
        from onnx import helper

        blocked = self.blocked
        n.input[:] = [self.ren.get(i, i) for i in n.input]
        if n.domain == NCHWC and n.op_type == "ReorderOutput":
            blocked[n.output[0]], self.channels[n.input[0]] = n.input[0], _attr(n, "channels")
        elif n.domain == NCHWC and n.op_type == "ReorderInput" and n.input[0] in blocked:
            self.ren[n.output[0]] = blocked[n.input[0]]
        elif n.op_type == "Gather" and _attr(n, "axis") == 0 and n.input[0] in blocked:
            b = blocked[n.input[0]]
            self._twin(helper.make_node("Gather", [b, n.input[1]], [""], axis=0), n.output[0], b)
        elif n.op_type == "ScatterND" and n.input[0] in blocked and n.input[2] in blocked:
            d, idx, u = n.input
            self._twin(helper.make_node("ScatterND", [blocked[d], idx, blocked[u]], [""]), n.output[0], blocked[d])
        elif n.op_type == "ReduceMean" and n.input[0] in blocked and _spatial(self.inits, n):
            b = blocked[n.input[0]]
            self.nodes += _pool_blocked_sliced(self.graph, n, b, self.channels[b])
            self.alive.add(n.output[0])
        elif n.op_type == "Add" and (fold := _routed_fold(n, self.made, self.users, blocked)) is not None:
            self.pending[n.output[0]] = fold
        elif n.op_type == "Relu" and n.input[0] in self.pending:
            self._fold(n)
        else:
            self._restore(n.input)
            self.nodes.append(n)
            self.alive.update(n.output)

    def _twin(self, node: Any, value: str, like: str) -> None:
        """``node`` makes the blocked twin of ``value``, with the channels of the blocked value ``like``."""
        node.output[0] = value + "_nchwc"
        self.nodes.append(node)
        self.blocked[value], self.channels[node.output[0]] = node.output[0], self.channels[like]

    def _fold(self, relu: Any) -> None:
        """``Relu(Add(ReorderOutput(conv), residual))`` -> ``conv`` with the blocked residual as its ``Sum`` input
        and a ``Relu`` activation, moved after the residual (a downsampling block gathers it after its
        convolutions)."""
        conv, residual = self.pending.pop(relu.input[0])
        conv.input.extend([""] * (3 - len(conv.input)) + [residual])
        conv.attribute.append(_make_attr("activation", "Relu"))
        self.nodes.remove(conv)
        self.nodes.append(conv)
        self.blocked[relu.output[0]], self.channels[conv.output[0]] = conv.output[0], self.channels[residual]

    def _restore(self, names: Any) -> None:
        """A reorder out of each of ``names`` that only a blocked value holds (for a plain reader)."""
        for i in names:
            if i in self.blocked and i not in self.alive:
                self.alive.add(i)
                self.nodes.append(_reorder_out(self.blocked[i], i, self.channels[self.blocked[i]]))

    def finish(self) -> list[Any]:
        """The rewritten nodes, with a plain copy of each graph output that only a blocked value holds."""
        if self.pending:
            raise ValueError("a residual Add without its ReLU")
        self._restore([o.name for o in self.graph.output])
        return self.nodes


def _pool_blocked_sliced(graph: Any, node: Any, value: str, channels: int) -> list[Any]:
    """:func:`_pool_blocked`, the pooled value cut to the ``channels`` real channels (a blocked value is padded to
    a whole number of blocks: 16 channels a block with AVX-512, so a network 8 channels wide pools 16)."""
    import numpy as np
    from onnx import helper

    nodes = _pool_blocked(node, value)
    out, padded = node.output[0], node.output[0] + "_padded"
    nodes[-1].output[0] = padded
    ends = _const(graph, f"pool_slice_{channels}", np.array([channels], np.int64))
    axis = _const(graph, "pool_slice_axis", np.array([1], np.int64))
    start = _const(graph, "pool_slice_start", np.array([0], np.int64))
    return [*nodes, helper.make_node("Slice", [padded, start, ends, axis], [out])]


def _routed_fold(add: Any, made: dict[str, Any], users: dict[str, list[Any]], blocked: dict[str, str]) -> Any:
    """``(conv, blocked residual)`` where ``add`` sums a plain NCHWc convolution's reordered output (read by
    nothing else) and a value with a blocked twin, and only a ``Relu`` reads the sum; else ``None``."""
    if len(users.get(add.output[0], [])) != 1 or users[add.output[0]][0].op_type != "Relu":
        return None
    for a, b in (add.input, tuple(reversed(add.input))):
        reorder = made.get(a)
        if reorder is None or reorder.domain != NCHWC or reorder.op_type != "ReorderOutput" or b not in blocked:
            continue
        conv = made.get(reorder.input[0])
        plain = conv is not None and conv.domain == NCHWC and conv.op_type == "Conv" and len(conv.input) <= 3
        alone = len(users[a]) == 1 and len(users[reorder.input[0]]) == 1
        if plain and alone and not any(x.name == "activation" for x in conv.attribute):
            return conv, blocked[b]
    return None


def _unique_branch_names(graph: Any) -> None:
    """Rename the values made inside ``If`` branches that a name of the outer graph, or of another branch, also
    makes: ONNX Runtime's optimiser numbers each (sub)graph's new values from one (``reorder_token_1``), and once
    values cross the branch boundary (:func:`blocked_layout`) the names must be unique across the model (SSA)."""
    taken = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    taken |= {t.name for t in graph.initializer}
    for n in graph.node:
        for sub in (a.g for a in n.attribute if a.type == a.GRAPH):
            ren = {}
            for m in sub.node:
                for k, o in enumerate(m.output):
                    if o and o in taken:
                        ren[o] = m.output[k] = f"{n.name}_{sub.name}_{o}"
                    taken.add(m.output[k])
            for m in sub.node:
                m.input[:] = [ren.get(i, i) for i in m.input]
            for out in sub.output:
                out.name = ren.get(out.name, out.name)


def lstm_gates(proto: Any) -> Any:
    """Rewrite the recurrent gate of a (batch-1, ONNX Runtime-optimised) conditional graph into one ONNX ``LSTM``
    node per block (issue 32): the ~10 nodes of the cell (matrix product on ``[mean(x), h]``, split, sigmoid,
    tanh, the products and sum) become ``Unsqueeze`` + ``LSTM`` + ``Reshape``; the output layer and the comparison
    stay. Same function up to float rounding (the input and recurrent products summed apart, ~1e-7). Finds the
    gates by the weights :class:`_Gates` writes (``gates.w<i>``, ``gates.b<i>``, ``gates.fc_w``); a graph without
    them is returned unchanged."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    made = {o: n for n in graph.node for o in n.output}
    users = _users(graph.node)
    new_nodes: dict[int, list[Any]] = {}
    state: tuple[str, str] | None = None
    k = 0
    while f"gates.w{k}" in inits:
        gemm = next(u for u in users[f"gates.w{k}"] if u.op_type == "Gemm")
        cat = made[gemm.input[0]]
        w = numpy_helper.to_array(inits[f"gates.w{k}"])
        b = numpy_helper.to_array(inits[f"gates.b{k}"])
        hd = w.shape[0] // 4
        order = np.r_[0:hd, 2 * hd : 3 * hd, hd : 2 * hd, 3 * hd : 4 * hd]  # (i, f, o, g) -> ONNX's (i, o, f, c)
        c = w.shape[1] - hd
        names = [f"lstm{k}_{x}" for x in ("W", "R", "B", "x", "Y_h", "Y_c", "h", "hshape")]
        graph.initializer.extend(
            [
                numpy_helper.from_array(w[order, :c][None].copy(), names[0]),
                numpy_helper.from_array(w[order, c:][None].copy(), names[1]),
                numpy_helper.from_array(np.concatenate([b[order], np.zeros_like(b)])[None], names[2]),
                numpy_helper.from_array(np.array([-1, hd], np.int64), names[7]),
            ]
        )
        fc = _lstm_fc(users, made, gemm)
        ins = [names[3], names[0], names[1], names[2]] + (["", state[0], state[1]] if state else [])
        src = made.get(cat.input[0])
        x_in = src.input[0] if src is not None and src.op_type in ("Reshape", "Identity") else cat.input[0]
        new_nodes[id(cat)] = [
            helper.make_node("Reshape", [x_in, _const(graph, f"lstm_x{c}", np.array([1, 1, c], np.int64))], [names[3]]),
            helper.make_node("LSTM", ins, ["", names[4], names[5]], hidden_size=hd),
            helper.make_node("Reshape", [names[4], names[7]], [names[6]]),
        ]
        fc.input[0] = names[6]
        state, k = (names[4], names[5]), k + 1
    if not k:
        return proto
    nodes = [m for n in graph.node for m in new_nodes.get(id(n), [n])]
    _direct_conditions(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    prune_graph(graph)
    return proto


def _users(nodes: Any) -> dict[str, list[Any]]:
    """The nodes of ``nodes`` (a graph's own, not its branches') that read each value."""
    users: dict[str, list[Any]] = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


def _direct_conditions(nodes: list[Any]) -> None:
    """An ``If`` takes any one-element condition: each ``If`` whose condition a ``Reshape`` makes (of the (1, 1)
    or (1, 1, 1, 1) comparison to a scalar) reads the comparison itself; the unused ``Reshape`` is pruned later.
    (A conditional graph runs one image: every comparison a gate makes has one element.)"""
    made = {o: n for n in nodes for o in n.output}
    for n in nodes:
        if n.op_type == "If" and made.get(n.input[0]) is not None and made[n.input[0]].op_type == "Reshape":
            n.input[0] = made[n.input[0]].input[0]


def prune_graph(graph: Any) -> None:
    """Drop nodes whose outputs nothing uses (graph outputs included), and unused initializers."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
            for attr in node.attribute:
                if attr.type == attr.GRAPH:
                    needed.update(i for n in attr.g.node for i in n.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _lstm_fc(users: dict[str, list[Any]], made: dict[str, Any], gemm: Any) -> Any:
    """The gate's output layer (the ``Gemm`` on ``gates.fc_w``) nearest its cell's matrix product (breadth first:
    the next gates' output layers are further on)."""
    from collections import deque

    seen, todo = set(), deque([gemm])
    while todo:
        n = todo.popleft()
        if n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] == "gates.fc_w":
            return n
        for o in n.output:
            for u in users.get(o, []):
                if id(u) not in seen and u.op_type not in ("Concat", "If"):
                    seen.add(id(u))
                    todo.append(u)
    raise ValueError("no gate output layer")


def _const(graph: Any, name: str, value: Any) -> str:
    from onnx import numpy_helper

    if not any(t.name == name for t in graph.initializer):
        graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _spatial(inits: dict[str, Any], node: Any) -> bool:
    """Whether a ``ReduceMean`` averages over the two spatial axes of a 4-d value (axes [2, 3] or [-2, -1])."""
    from onnx import numpy_helper

    if len(node.input) < 2 or node.input[1] not in inits:
        return False
    return sorted(int(a) % 4 for a in numpy_helper.to_array(inits[node.input[1]]).ravel()) == [2, 3]


def _make_attr(name: str, value: Any) -> Any:
    import onnx

    return onnx.helper.make_attribute(name, value)


LAYOUTS = ("nchw", "nchwc")


def onnx_session(
    model_bytes: bytes | str | os.PathLike,
    threads: int | None = 1,
    *,
    layout: str = "nchwc",
    level: str = "all",
    spinning: bool = True,
    workers: int = 1,
) -> Any:
    """An ONNX Runtime CPU session (sequential executor, ``threads`` intra-op threads, graph optimisations at
    ``level``). ``layout="nchwc"`` (the default; issue 32, measured in ``benchmarks/export_speed.py deploy``) runs
    a conditional graph rewritten by :func:`blocked_layout` and a routed one by :func:`blocked_routed` for this
    CPU, once the rewrite gives the graph's own outputs on probe images; any other graph, or one already in the
    blocked layout, runs as written (``"nchw"``), and so, with a warning, does a graph the rewrite does not apply to.
    ``spinning=False`` stops idle intra-op threads spinning. ``workers`` > 1 returns a :class:`ShardedSession` of
    that many such sessions (each with ``threads`` intra-op threads), which runs a batch's shards at once."""
    if isinstance(model_bytes, (str, os.PathLike)):  # a file, as ONNX Runtime's own InferenceSession takes
        if not os.path.isfile(model_bytes):
            raise SkipnetError(f"{os.fspath(model_bytes)} is not a file")
        with open(model_bytes, "rb") as f:
            model_bytes = f.read()
    if not isinstance(model_bytes, (bytes, bytearray)):
        raise SkipnetError(f"onnx_session takes an .onnx path or its bytes, not {type(model_bytes).__name__}")
    if layout not in LAYOUTS:
        raise SkipnetError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if workers < 1:
        raise SkipnetError(f"workers must be at least 1, not {workers}")
    payload, first = _chosen(model_bytes, threads, layout, level, spinning)
    if workers == 1:
        return first
    return ShardedSession([first] + [_session(payload, threads, level, spinning) for _ in range(workers - 1)])


def _chosen(model_bytes: bytes, threads: int | None, layout: str, level: str, spinning: bool) -> tuple[bytes, Any]:
    """The graph :func:`onnx_session` runs (the rewrite for this CPU where it applies and agrees, else the graph as
    written) and a session of it."""
    rewrite = _layout_rewrite(model_bytes) if layout == "nchwc" else None
    plain = _session(model_bytes, threads, level, spinning)
    if rewrite is None:
        return model_bytes, plain
    try:
        payload = rewrite(model_bytes)
        blocked = _session(payload, threads, level, spinning)
        _same_outputs(plain, blocked)
        return payload, blocked
    except Exception as exc:  # noqa: BLE001 - not a graph the rewrite knows here: run it as it is, and say so
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        warnings.warn(
            f"the blocked-layout rewrite does not apply to this graph ({reason}); running it as written: the same "
            "outputs, slower (in Python, layout='nchw' runs it so without this warning)",
            stacklevel=3,
        )
        return model_bytes, plain


def _session(model_bytes: bytes, threads: int | None, level: str, spinning: bool) -> Any:
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _LEVELS[level](ort)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


class ShardedSession:
    """Several ONNX Runtime sessions of one graph that run the shards of a batch at once, one Python thread each
    (ONNX Runtime releases the GIL while it runs). Throughput on several cores without splitting each operator
    across them: a routed graph's per-block gathers, scatters and sub-batch convolutions are serial work that
    intra-op threads do not share. A graph of free batch size gets ``len(sessions)`` contiguous shards (fewer
    for a smaller batch); one of fixed batch ``b`` gets the batch's ``b``-image slices, dealt out in turn. The
    outputs are each session's, concatenated in batch order: the same as one session's run of the whole batch."""

    def __init__(self, sessions: list[Any]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.sessions = list(sessions)
        size = self.sessions[0].get_inputs()[0].shape[0]
        self._fixed = size if isinstance(size, int) else None
        self._pool = ThreadPoolExecutor(len(self.sessions), thread_name_prefix="skipnet-ort")

    def get_inputs(self) -> Any:
        return self.sessions[0].get_inputs()

    def run(self, output_names: Any, feeds: dict[str, Any]) -> list[Any]:
        import numpy as np

        if len(feeds) != 1:
            raise ValueError(f"a sharded session takes one input, not {len(feeds)}")
        ((name, x),) = feeds.items()
        n, k = len(x), len(self.sessions)
        step = self._fixed or -(-n // k)
        shards = [x[i : i + step] for i in range(0, n, step)] if n > (self._fixed or 1) else [x]
        if len(shards) == 1:
            return self.sessions[0].run(output_names, {name: x})
        turns = [shards[w::k] for w in range(k)]

        def work(w: int) -> list[Any]:
            return [self.sessions[w].run(output_names, {name: s}) for s in turns[w]]

        done = list(self._pool.map(work, range(k)))
        ordered = [done[j % k][j // k] for j in range(len(shards))]
        return [np.concatenate([o[i] for o in ordered]) for i in range(len(ordered[0]))]


def _layout_rewrite(model_bytes: bytes) -> Any:
    """The blocked-layout rewrite for a graph: :func:`blocked_layout` for a conditional graph (``If`` nodes),
    :func:`blocked_routed` for a routed one (``ScatterND``, no ``If``); ``None`` for any other graph and for one
    already in the blocked layout (a rewrite's output, or ONNX Runtime's own NCHWc-optimised file, runs as it is).
    The functions are looked up in this module when called, so that a test can replace either."""
    if b"If" not in model_bytes and b"ScatterND" not in model_bytes:
        return None
    onnx, _ = require_onnx()
    nodes = onnx.load_from_string(model_bytes).graph.node
    ops = {n.op_type for n in nodes}
    if any(n.domain == NCHWC for n in nodes):
        return None
    if "If" in ops:
        return lambda b: blocked_layout(b)
    return (lambda b: blocked_routed(b)) if "ScatterND" in ops else None


def _same_outputs(reference: Any, rewritten: Any, probes: int = 2) -> None:
    """Raise ``ValueError`` unless ``rewritten`` gives ``reference``'s decisions and logits (within
    :data:`LOGIT_TOL`) on ``probes`` seeded random batches of its input shape (8 images where the batch is free:
    a routed graph's blocks then gather some of them)."""
    import numpy as np

    inp = reference.get_inputs()[0]
    shape = [d if isinstance(d, int) else 8 for d in inp.shape]
    gen = np.random.default_rng(0)
    for _ in range(probes):
        x = gen.random(shape, dtype=np.float32)
        a, b = reference.run(None, {inp.name: x}), rewritten.run(None, {inp.name: x})
        if (
            len(a) != len(b)
            or float(np.abs(a[0] - b[0]).max()) > LOGIT_TOL * max(1.0, float(np.abs(a[0]).max(initial=0.0)))
            or any(not np.array_equal(u, v) for u, v in zip(a[2:], b[2:]))
        ):
            raise ValueError("the rewritten graph computes other outputs")
