"""Export a SkipNet that still skips: ``torch.export`` programs (``.pt2``) and ONNX graphs (issue 18).

:class:`~skipnet.gated.GatedResNet.forward` decides on the host (a Python branch per block at batch 1, an index
list otherwise) and calls compiled C++ kernels; neither survives tracing. This module builds *export graphs*
instead: small ``nn.Module`` s that share the submodules of a :class:`GatedResNet` (stem, first block, gated
blocks, gate bank, head) and express the routing with graph operators only. The gates run their module path
(the recurrent gate's projection, LSTM cell and output layer as plain tensor ops); :mod:`skipnet.fastgate` is
never called.

Graphs (:data:`GRAPHS`):

- ``conditional`` (batch 1): every gated block is ``torch.cond(p_i >= t, F_i, S_i)`` on its gate's decision,
  an ONNX ``If`` node: the runtime runs a skipped block's shortcut only, never its convolutions.
- ``routed`` (any batch): each block gathers the rows that execute it (``nonzero`` + ``index_select``), runs on
  them and scatters the result back (``index_copy``): ONNX ``NonZero`` / ``Gather`` / ``ScatterND``, with a
  data-dependent batch inside each block.
- ``masked`` (any batch): every block for every row, mixed by the decision (``where``); the same values, but it
  saves no compute. Used when ``routed`` cannot be exported, with a warning.
- ``plain``: every block, no gate: the plain ResNet of the same backbone (what benchmarks compare against).

Every graph takes images as ``skipnet eval`` reads them before normalisation: float32 RGB in [0, 1], shape
(B, C, H, W); the data normalisation of the checkpoint (``(x - mean) / std``) and the threshold are constants of
the graph, and also written to its metadata. Gated graphs return ``(logits, probs, decisions)`` with probs and
decisions (B, N) float32 (decisions 0/1); ``plain`` returns ``logits`` only.

Running (issue 32): :func:`onnx_session` opens a conditional graph in ONNX Runtime with its blocked NCHWc layout
kept across the ``If`` nodes and the recurrent gate as one ``LSTM`` node (:func:`blocked_layout`, made for the CPU
it runs on and checked against the graph as written); the file itself stays standard, portable ONNX, with the
SHA-256 of its graph in its metadata (checked by :func:`read_onnx_meta`).

Nothing is written that does not reproduce the eager model: :func:`export_model` runs the exported program on
probe images and compares decisions and logits with the eager greedy model before writing (atomically).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.resnet import Bottleneck

from skipnet.blocks import residual_branch, run_block, shortcut_branch
from skipnet.errors import SkipnetError
from skipnet.gated import GatedResNet
from skipnet.gates import AIGGate, FeedForwardGates, RNNGate

GRAPHS = ("conditional", "routed", "masked", "plain")
FORMATS = ("safetensors", "pt2", "onnx")
SUFFIXES = {".safetensors": "safetensors", ".pt2": "pt2", ".onnx": "onnx"}
META_KEY = "skipnet"  # ONNX metadata_props key / pt2 extra file name holding the JSON metadata
ONNX_OPSET = 18
LOGIT_TOL = 1e-4  # max |exported - eager| logit difference accepted by the export's own check


def format_for(path: str | Path, fmt: str | None = None) -> str:
    """The export format: ``fmt`` if given, else from the file extension; a one-line error otherwise."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise SkipnetError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix
    if suffix not in SUFFIXES:
        raise SkipnetError(
            f"{path} must end in .safetensors, .pt2 or .onnx (the format is taken from the extension), or pass --format"
        )
    return SUFFIXES[suffix]


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


# ------------------------------------------------------------------------------------------- graph modules
class _Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the data loaders do (identity without statistics)."""

    def __init__(self, stats: tuple[tuple[float, ...], tuple[float, ...]] | None, channels: int) -> None:
        super().__init__()
        self.enabled = stats is not None
        mean, std = stats if stats is not None else ((0.0,) * channels, (1.0,) * channels)
        if len(mean) != channels or len(std) != channels:
            raise SkipnetError(f"normalisation has {len(mean)} channels but the network takes {channels}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std if self.enabled else x


def logit_threshold(threshold: float) -> float:
    """The smallest float32 logit ``z`` with ``sigmoid(z) >= threshold`` in float32 (as PyTorch computes it).

    Sigmoid is non-decreasing in float32, so ``z >= logit_threshold(t)`` takes exactly the decisions of
    ``sigmoid(z) >= t``; the graphs compare logits and need no sigmoid per gate. Found by bisection over the
    ordered float32 bit patterns.
    """
    t = torch.tensor(float(threshold), dtype=torch.float32)

    def ok(bits: int) -> bool:
        z = torch.tensor([bits], dtype=torch.int32).view(torch.float32)
        return bool(torch.sigmoid(z)[0] >= t)

    def to_bits(v: float) -> int:  # float32 -> an int whose order is the float order
        b = int(torch.tensor([v], dtype=torch.float32).view(torch.int32)[0])
        return b if b >= 0 else -(b & 0x7FFFFFFF)

    def from_bits(k: int) -> int:
        return k if k >= 0 else -k | -0x80000000

    lo, hi = to_bits(float("-inf")), to_bits(float("inf"))
    if ok(from_bits(lo)):
        return float("-inf")
    if not ok(from_bits(hi)):
        return float("inf")  # nothing reaches the threshold (t > 1): never execute
    while hi - lo > 1:  # invariant: not ok(lo), ok(hi)
        mid = (lo + hi) // 2
        if ok(from_bits(mid)):
            hi = mid
        else:
            lo = mid
    return float(torch.tensor([from_bits(hi)], dtype=torch.int32).view(torch.float32)[0])


class _Gates(nn.Module):
    """The gate bank as plain tensor ops: ``init(x)`` then ``logit(i, x_i, state) -> (z (B, 1), state)``.

    The recurrent gate runs the function of its module path (mean, projection, LSTM cell, output layer) with
    tensor ops only -- never the compiled kernel -- in the fewest graph operators (at batch 1 a CPU runtime's
    cost per operator, not the gate's few multiply-adds, is what a gate costs): the projection folded into the
    LSTM's input weights and the recurrent weights stacked beside them (one matrix product per step on
    ``[mean(x), h]``), the gate rows ordered (input, forget, output, cell) so one sigmoid covers three of them.
    Same function up to float rounding (~1e-7). The feed-forward gates run their modules' layers.
    """

    def __init__(self, bank: nn.Module) -> None:
        super().__init__()
        if not isinstance(bank, RNNGate | FeedForwardGates):
            raise SkipnetError(f"cannot export gates of type {type(bank).__name__}")
        self.bank = bank
        self.recurrent = isinstance(bank, RNNGate)
        if self.recurrent:
            with torch.no_grad():
                lstm, hd = bank.lstm, bank.hidden
                # torch's row order is (i, f, g, o): reorder to (i, f, o, g)
                order = torch.cat([torch.arange(0, 2 * hd), torch.arange(3 * hd, 4 * hd), torch.arange(2 * hd, 3 * hd)])
                w_ih, w_hh = lstm.weight_ih[order], lstm.weight_hh[order]
                bias = (lstm.bias_ih + lstm.bias_hh)[order]
                for i, proj in enumerate(bank.proj):
                    w = torch.cat([w_ih @ proj.weight, w_hh], 1)  # (4H, C + H) on [mean(x), h]
                    self.register_buffer(f"w{i}", w.contiguous())
                    self.register_buffer(f"b{i}", (w_ih @ proj.bias + bias).contiguous())
                self.register_buffer("fc_w", bank.fc.weight.detach().clone())
                self.register_buffer("fc_b", bank.fc.bias.detach().clone())
            self.hidden = hd

    def init(self, x: Tensor) -> Any:
        if not self.recurrent:
            return None
        h = x.new_zeros(x.shape[0], self.hidden)
        return h, h

    def logit(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        bank = self.bank
        if not self.recurrent:
            g = bank.gates[i]
            if isinstance(g, AIGGate):  # BatchNorm in eval mode: its running statistics, an affine map
                return F.linear(F.relu(g.bn(g.proj(x.mean(dim=(2, 3))))), g.fc.weight, g.fc.bias), None
            y = g.pool(x) if hasattr(g, "pool") else x
            if hasattr(g, "conv1"):
                y = F.relu(g.bn1(g.conv1(y)))
                y = F.relu(g.bn2(g.conv2(y)))
            else:
                y = F.relu(g.bn(g.conv(y)))
            return F.linear(y.mean(dim=(2, 3)), g.fc.weight, g.fc.bias), None
        h, c = state
        hd = self.hidden
        gates = F.linear(torch.cat([x.mean(dim=(2, 3)), h], 1), getattr(self, f"w{i}"), getattr(self, f"b{i}"))
        sig = torch.sigmoid(gates[:, : 3 * hd])
        i_g, f_g, o_g = sig.split(hd, 1)
        c = f_g * c + i_g * torch.tanh(gates[:, 3 * hd :])
        h = o_g * torch.tanh(c)
        return F.linear(h, self.fc_w, self.fc_b), (h, c)


def _bn(bn: nn.BatchNorm2d, x: Tensor) -> Tensor:
    """Eval-mode batch norm as the one ATen op it dispatches to (``F.batch_norm``'s own path asks whether the
    batch is empty, which a data-dependent batch cannot answer)."""
    return torch.ops.aten._native_batch_norm_legit_no_training.default(
        x, bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.0, bn.eps
    )[0]


def _routed_residual(block: nn.Module, x: Tensor) -> Tensor:
    """:func:`~skipnet.blocks.residual_branch` for a batch of data-dependent size (the same ops)."""
    out = F.relu(_bn(block.bn1, block.conv1(x)))
    out = _bn(block.bn2, block.conv2(out))
    if isinstance(block, Bottleneck):
        out = _bn(block.bn3, block.conv3(F.relu(out)))
    return out


class _RunBlock(nn.Module):
    """``F_i``: the whole residual block (the ``then`` branch)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        out = residual_branch(self.block, x) + shortcut_branch(self.block, x)
        return F.relu(out)


class _SkipBlock(nn.Module):
    """``S_i``: the shortcut (the ``else`` branch); a copy for the identity (a branch may not alias its input)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block.downsample(x) if self.block.downsample is not None else x.clone()


class ExportGraph(nn.Module):
    """Base of the export graphs: normalisation, stem, first block and head of ``model`` (shared modules)."""

    graph = ""

    def __init__(self, model: GatedResNet, stats: Any = None, threshold: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.norm = _Normalize(stats, model.config.in_channels)
        self.threshold = float(model.threshold if threshold is None else threshold)
        self.z_threshold = logit_threshold(self.threshold)
        self.blocks = nn.ModuleList(model.gated_blocks)
        self.gates = _Gates(model.gates) if model.gates is not None else None

    def prologue(self, images: Tensor) -> Tensor:
        return self.model.first_block(self.model.stem(self.norm(images)))

    def head(self, x: Tensor) -> Tensor:
        b = self.model.backbone
        return b.fc(torch.flatten(b.avgpool(x), 1))

    def decide(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Tensor, Any]:
        """Gate ``i``: ``(logit (B, 1), decision (B, 1) bool, state)``; the decision is ``sigmoid(z) >= threshold``
        in float32, taken as ``z >= logit_threshold(threshold)`` (the same decisions, one operator)."""
        z, state = self.gates.logit(i, x, state)
        return z, z >= self.z_threshold, state

    def finish(self, x: Tensor, logits: list[Tensor], decisions: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        probs = torch.sigmoid(torch.cat(logits, 1))
        return self.head(x), probs, torch.cat(decisions, 1).to(torch.float32)


class GatedGraph(ExportGraph):
    """The gated graphs: one loop over the gated blocks; each graph says how a block runs on its decisions."""

    def step(self, i: int, x: Tensor, d: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.prologue(images)
        state = self.gates.init(x)
        probs, decisions = [], []
        for i in range(len(self.blocks)):
            p, d, state = self.decide(i, x, state)
            probs.append(p)
            decisions.append(d)
            x = self.step(i, x, d)
        return self.finish(x, probs, decisions)


class ConditionalGraph(GatedGraph):
    """Batch 1: each gated block is ``torch.cond`` on its gate's decision (ONNX ``If``)."""

    graph = "conditional"

    def __init__(self, model: GatedResNet, stats: Any = None, threshold: float | None = None) -> None:
        super().__init__(model, stats, threshold)
        self.run = nn.ModuleList(_RunBlock(b) for b in model.gated_blocks)
        self.skip = nn.ModuleList(_SkipBlock(b) for b in model.gated_blocks)

    def step(self, i: int, x: Tensor, d: Tensor) -> Tensor:
        return torch.cond(d.reshape(()), self.run[i], self.skip[i], (x,))


class RoutedGraph(GatedGraph):
    """Any batch: gather the executing rows, run the block on them, scatter back (data-dependent shapes)."""

    graph = "routed"

    def step(self, i: int, x: Tensor, d: Tensor) -> Tensor:
        block = self.blocks[i]
        idx = torch.nonzero(d.flatten()).flatten()
        xs = x.index_select(0, idx)
        if block.downsample is not None:
            shortcut = block.downsample(x)
            out = F.relu(_routed_residual(block, xs) + shortcut.index_select(0, idx))
            return shortcut.index_copy(0, idx, out)
        return x.index_copy(0, idx, F.relu(_routed_residual(block, xs) + xs))


class MaskedGraph(GatedGraph):
    """Any batch: every block for every row, mixed by the decision. Same values as routed; saves no compute."""

    graph = "masked"

    def step(self, i: int, x: Tensor, d: Tensor) -> Tensor:
        block = self.blocks[i]
        return torch.where(d.view(-1, 1, 1, 1), run_block(block, x), shortcut_branch(block, x))


class PlainGraph(ExportGraph):
    """Every block, no gate: the plain ResNet of the same backbone; returns logits only."""

    graph = "plain"

    def forward(self, images: Tensor) -> Tensor:
        x = self.prologue(images)
        for block in self.blocks:
            x = F.relu(residual_branch(block, x) + shortcut_branch(block, x))
        return self.head(x)


_GRAPH_CLASSES = {"conditional": ConditionalGraph, "routed": RoutedGraph, "masked": MaskedGraph, "plain": PlainGraph}


def build_graph(model: GatedResNet, graph: str, stats: Any = None, threshold: float | None = None) -> ExportGraph:
    """The export graph ``graph`` (see :data:`GRAPHS`) over ``model``'s modules, in eval mode."""
    if graph not in _GRAPH_CLASSES:
        raise SkipnetError(f"unknown graph {graph!r}; expected one of {', '.join(GRAPHS)}")
    if graph != "plain" and model.gates is None:
        raise SkipnetError(f"{model.config.name} has no gates: only --graph plain applies to it")
    return _GRAPH_CLASSES[graph](model, stats, threshold).eval()


# -------------------------------------------------------------------------------------------- references
def eager_reference(model: GatedResNet, graph: ExportGraph, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """What ``graph`` must reproduce: the eager model on the normalised images, greedy at the graph's threshold
    (``all_on`` for ``plain``). Returns ``(logits, decisions or None)``."""
    with torch.inference_mode():
        x = graph.norm(images)
        if graph.graph == "plain":
            return model(x, "all_on").logits, None
        out = model(x, "greedy", threshold=graph.threshold)
        return out.logits, out.trace.decisions


def compare(
    ref_logits: Tensor, ref_dec: Tensor | None, logits: Tensor, dec: Tensor | None, tol: float = LOGIT_TOL
) -> dict[str, Any]:
    """Agreement of an exported run with the eager one: decisions, predicted classes, max logit difference."""
    logits, ref_logits = torch.as_tensor(logits).float(), ref_logits.float()
    res = {
        "images": int(ref_logits.shape[0]),
        "max_abs_logit_diff": float((logits - ref_logits).abs().max()) if logits.numel() else 0.0,
        "same_classes": bool(torch.equal(logits.argmax(1), ref_logits.argmax(1))),
    }
    if ref_dec is not None:
        dec = torch.as_tensor(dec).float()
        res["decision_mismatches"] = int((dec != ref_dec.float()).sum())
        res["executed_fraction"] = float(ref_dec.float().mean()) if ref_dec.numel() else 1.0
        res["same_decisions"] = res["decision_mismatches"] == 0
    res["ok"] = bool(res["same_classes"] and res.get("same_decisions", True) and res["max_abs_logit_diff"] <= tol)
    return res


# ------------------------------------------------------------------------------------------------ export
@dataclass
class Exported:
    """The result of an export: the serialized bytes and what was checked."""

    fmt: str
    graph: str
    payload: bytes
    meta: dict[str, Any]
    check: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def backbone_fingerprint(model: GatedResNet) -> str:
    """SHA-256 of the backbone's weights and BatchNorm statistics (names, dtypes, shapes and values): the same for
    every graph exported from one checkpoint, so that a plain graph can be matched with its SkipNet."""
    h = hashlib.sha256()
    for name, t in sorted(model.backbone.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def metadata(model: GatedResNet, graph: ExportGraph, ckpt: dict[str, Any] | None, batch: int | None) -> dict:
    """The JSON metadata stored with an export: what the graph takes, returns and decides with."""
    stats = graph.norm
    data = (ckpt or {}).get("data") or {}
    return {
        "format": "skipnet-export",
        "version": 1,
        "graph": graph.graph,
        "arch": model.config.to_dict(),
        "threshold": graph.threshold,
        "mode": "all_on" if graph.graph == "plain" else "greedy",  # how the graph decides: every block, or the gates
        "batch": batch,  # None: any batch size
        "image_size": model.config.image_size,
        "input": "float32 RGB images in [0, 1], (B, C, H, W); the normalisation below is applied inside the graph",
        "normalize": {"mean": stats.mean.flatten().tolist(), "std": stats.std.flatten().tolist()}
        if stats.enabled
        else None,
        "outputs": ["logits"] if graph.graph == "plain" else ["logits", "probs", "decisions"],
        "classes": data.get("classes"),
        "saves_compute": graph.graph in ("conditional", "routed"),
        "backbone_sha256": backbone_fingerprint(model),
    }


def probe_images(model: GatedResNet, n: int, batch: int, seed: int = 0, size: int | None = None) -> list[Tensor]:
    """``n`` seeded batches of uniform [0, 1] images (B, C, S, S)."""
    gen = torch.Generator().manual_seed(seed)
    s = size or model.config.image_size
    return [torch.rand(batch, model.config.in_channels, s, s, generator=gen) for _ in range(n)]


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the exporters' progress prints and info logs (they are not errors)."""
    sink = io.StringIO()
    names = ("torch.onnx", "onnxscript", "torch.export", "torch._export", "torch.fx._symbolic_trace", "torch.fx")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield sink
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _dynamic(graph: ExportGraph, batch: int | None) -> Any:
    if batch is not None:
        return None
    return {"images": {0: torch.export.Dim("batch", min=1, max=1 << 16)}}


def _torch_export(graph: ExportGraph, example: Tensor, batch: int | None) -> torch.export.ExportedProgram:
    with torch.no_grad(), _quiet():
        return torch.export.export(graph, (example,), dynamic_shapes=_dynamic(graph, batch), strict=False)


def _onnx_program(graph: ExportGraph, example: Tensor, batch: int | None) -> Any:
    require_onnx()
    names = ["logits"] if graph.graph == "plain" else ["logits", "probs", "decisions"]
    with torch.no_grad(), _quiet():
        return torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=names,
            dynamic_shapes=_dynamic(graph, batch),
            opset_version=ONNX_OPSET,
            optimize=True,
            verbose=False,
        )


def localize_branch_weights(proto: Any) -> Any:
    """Copy every weight an ``If`` branch uses into that branch's own initializers (and drop it from the main
    graph when nothing else there uses it). Same function; but ONNX Runtime's layout optimiser (NCHWc
    convolutions, ~1.7x faster on a CPU) only rewrites a convolution whose weight is an initializer *of its own
    graph*: left in the main graph, every convolution of a conditional block would run the slower NCHW kernel."""
    import onnx

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    used_in_main = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    moved: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            if attr.type != onnx.AttributeProto.GRAPH:
                continue
            sub = attr.g
            wanted = {i for n in sub.node for i in n.input} | {o.name for o in sub.output}
            own = {t.name for t in sub.initializer}
            for name in sorted((wanted & inits.keys()) - own):
                sub.initializer.append(inits[name])
                moved.add(name)
    keep = [t for t in graph.initializer if t.name not in moved or t.name in used_in_main]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return proto


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


def blocked_layout(model_bytes: bytes, fuse_gates: bool = True) -> bytes:
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
    ``fuse_gates`` also rewrites the recurrent gates into one ``LSTM`` node each (:func:`lstm_gates`)."""
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
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
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
    made = {o: n for n in nodes for o in n.output}
    users = {}
    for n in nodes:
        for i in n.input:
            users.setdefault(i, []).append(n)
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
    ren = {gather.output[0]: gather.input[0]}
    whole = []
    for m in seg[1:-1]:  # the block on the whole batch: its convolutions read the block input itself
        c = onnx.NodeProto()
        c.CopyFrom(m)
        c.input[:] = [ren.get(i, i) for i in c.input]
        for q, o in enumerate(c.output):
            ren[o] = c.output[q] = o + tag
        whole.append(c)
    some = [onnx.NodeProto() for _ in seg]
    for c, m in zip(some, seg):
        c.CopyFrom(m)
    some[-1].output[0] = scatter.output[0] + tag

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
            [scatter.output[0]],
            then_branch=branch("whole", whole, ren[scatter.input[2]]),
            else_branch=branch("some", some, some[-1].output[0]),
        ),
    ]


class _RoutedLayout:
    """:func:`blocked_routed`'s walk over the optimised routed graph, node by node (:meth:`take`): which plain
    values have a blocked twin, and the nodes of the rewritten graph."""

    def __init__(self, graph: Any) -> None:
        self.graph, self.inits, self.users = graph, {t.name: t for t in graph.initializer}, _users(graph)
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
    users = _users(graph)
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


def _users(graph: Any) -> dict[str, list[Any]]:
    """The nodes that read each value of ``graph`` (its own nodes, not its branches')."""
    users: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


def _direct_conditions(nodes: list[Any]) -> None:
    """An ``If`` takes any one-element condition: each ``If`` whose condition a ``Reshape`` makes (of the (1, 1)
    or (1, 1, 1, 1) comparison to a scalar) reads the comparison itself; the unused ``Reshape`` is pruned later."""
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
    model_bytes: bytes, threads: int | None = 1, *, layout: str = "nchwc", level: str = "all", spinning: bool = True
) -> Any:
    """An ONNX Runtime CPU session (sequential executor, ``threads`` intra-op threads, graph optimisations at
    ``level``). ``layout="nchwc"`` (the default; issue 32, measured in ``benchmarks/export_speed.py deploy``) runs
    a conditional graph rewritten by :func:`blocked_layout` and a routed one by :func:`blocked_routed` for this
    CPU, once the rewrite gives the graph's own outputs on probe images; any other graph, or one already in the
    blocked layout, runs as written (``"nchw"``), and so, with a warning, does a graph the rewrite does not apply to.
    ``spinning=False`` stops idle intra-op threads spinning."""
    _, ort = require_onnx()
    if layout not in LAYOUTS:
        raise SkipnetError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    rewrite = _layout_rewrite(model_bytes) if layout == "nchwc" else None
    if rewrite is not None:
        plain = onnx_session(model_bytes, threads, layout="nchw", level=level, spinning=spinning)
        try:
            blocked = onnx_session(rewrite(model_bytes), threads, layout="nchw", level=level, spinning=spinning)
            _same_outputs(plain, blocked)
            return blocked
        except Exception as exc:  # noqa: BLE001 - not a graph the rewrite knows here: run it as it is, and say so
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
            warnings.warn(
                f"the blocked-layout rewrite does not apply to this graph ({reason}); running it as written, "
                "with the same outputs but slower (layout='nchw' runs it so without this warning)",
                stacklevel=2,
            )
            return plain
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _LEVELS[level](ort)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


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
            or float(np.abs(a[0] - b[0]).max()) > LOGIT_TOL
            or any(not np.array_equal(u, v) for u, v in zip(a[2:], b[2:]))
        ):
            raise ValueError("the rewritten graph computes other outputs")


def run_onnx(session: Any, images: Tensor) -> tuple[Tensor, ...]:
    outs = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    return tuple(torch.from_numpy(o) for o in outs)


def _split(outs: Any, graph: str) -> tuple[Tensor, Tensor | None]:
    if graph == "plain":
        return (outs[0] if isinstance(outs, tuple | list) else outs), None
    return outs[0], outs[2]


def check_program(
    fn: Callable[[Tensor], Any], model: GatedResNet, graph: ExportGraph, probes: list[Tensor]
) -> dict[str, Any]:
    """Run ``fn`` (an exported program) on ``probes`` and compare with the eager model; totals over all probes."""
    total: dict[str, Any] = {"images": 0, "max_abs_logit_diff": 0.0, "same_classes": True, "ok": True}
    decisions = []
    for x in probes:
        ref_logits, ref_dec = eager_reference(model, graph, x)
        logits, dec = _split(fn(x), graph.graph)
        r = compare(ref_logits, ref_dec, logits, dec)
        total["images"] += r["images"]
        total["max_abs_logit_diff"] = max(total["max_abs_logit_diff"], r["max_abs_logit_diff"])
        total["same_classes"] &= r["same_classes"]
        total["ok"] &= r["ok"]
        if ref_dec is not None:
            total["decision_mismatches"] = total.get("decision_mismatches", 0) + r["decision_mismatches"]
            decisions.append(ref_dec)
    if decisions:
        total["executed_fraction"] = float(torch.cat(decisions).mean())
    return total


def export_model(
    model: GatedResNet,
    fmt: str,
    *,
    graph: str = "conditional",
    stats: Any = None,
    threshold: float | None = None,
    ckpt: dict[str, Any] | None = None,
    probes: int = 4,
    fallback: bool = True,
) -> Exported:
    """Export ``model`` as ``fmt`` (``pt2`` or ``onnx``) with graph ``graph``, checked against the eager model.

    ``conditional`` is exported for batch 1; ``routed``, ``masked`` and ``plain`` for any batch. When ``routed``
    does not export (the exporter cannot express the data-dependent shapes) and ``fallback`` is set, the
    ``masked`` graph is exported instead with a warning that it saves no compute. The exported program is run
    on ``probes`` seeded batches of random images (and the ONNX file in ONNX Runtime); any decision, class or
    logit (> 1e-4) that differs from the eager greedy model is an error and nothing is returned.
    """
    if fmt not in ("pt2", "onnx"):
        raise SkipnetError(f"export_model writes pt2 or onnx, not {fmt!r}")
    model.eval()
    batch = 1 if graph == "conditional" else None
    notes: list[str] = []
    g = build_graph(model, graph, stats, threshold)
    example = probe_images(model, 1, 1 if batch == 1 else 2, seed=1234)[0]
    try:
        program = _onnx_program(g, example, batch) if fmt == "onnx" else _torch_export(g, example, batch)
    except SkipnetError:
        raise
    except Exception as exc:  # noqa: BLE001 - the exporters raise many types; report them in one line
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        if graph == "routed" and fallback:
            note = (
                f"the routed graph does not export to {fmt} ({reason}); wrote the MASKED graph instead: it computes "
                "every block for every image and saves no compute (use --graph conditional at batch 1 to skip)"
            )
            warnings.warn(note, stacklevel=2)
            ex = export_model(model, fmt, graph="masked", stats=stats, threshold=threshold, ckpt=ckpt, probes=probes)
            ex.warnings.insert(0, note)
            return ex
        raise SkipnetError(f"cannot export the {graph} graph of {model.config.name} to {fmt}: {reason}") from None

    meta = metadata(model, g, ckpt, batch)
    pbatch = 1 if batch == 1 else 3
    images = probe_images(model, probes if batch == 1 else max(1, probes // 2), pbatch, seed=99)
    pack = _onnx_payload if fmt == "onnx" else _pt2_payload
    payload, check = pack(program, model, g, meta, images)
    if not check["ok"]:
        raise SkipnetError(
            f"the exported {graph} {fmt} graph disagrees with the eager model on probe images "
            f"({check.get('decision_mismatches', 0)} decisions differ, max logit difference "
            f"{check['max_abs_logit_diff']:.2e}, same classes: {check['same_classes']}); nothing was written"
        )
    return Exported(fmt, g.graph, payload, meta, check, notes)


def _onnx_payload(
    program: Any, model: GatedResNet, g: ExportGraph, meta: dict, images: list[Tensor]
) -> tuple[bytes, dict[str, Any]]:
    """The ONNX file's bytes (metadata and graph digest inside, ONNX's model check passed) and its check in ONNX
    Runtime against the eager model on ``images``."""
    import onnx

    proto = localize_branch_weights(program.model_proto)
    proto.producer_name = "skipnet"
    proto.graph.name = f"skipnet_{g.graph}_{model.config.name}"
    meta["graph_sha256"] = graph_digest(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    payload = proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(payload))  # structural check
    session = onnx_session(payload, layout="nchw")  # the graph as written, as any ONNX Runtime user runs it
    check = check_program(lambda x: run_onnx(session, x), model, g, images)
    check["runtime"] = "onnxruntime " + _ort_version()
    return payload, check


def _pt2_payload(
    program: Any, model: GatedResNet, g: ExportGraph, meta: dict, images: list[Tensor]
) -> tuple[bytes, dict[str, Any]]:
    """The ``.pt2`` file's bytes (metadata as an extra file) and the program's check against the eager model."""
    module = program.module()
    with torch.no_grad():
        check = check_program(lambda x: module(x), model, g, images)
    check["runtime"] = "torch.export " + torch.__version__
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={META_KEY: json.dumps(meta)})
    return buf.getvalue(), check


def _ort_version() -> str:
    _, ort = require_onnx()
    return ort.__version__


def write_export(ex: Exported, out: str | Path) -> None:
    """Write an export's bytes to ``out`` atomically (see :func:`skipnet.checkpoint.atomic_write`)."""
    from skipnet.checkpoint import atomic_write

    atomic_write(out, lambda f: f.write(ex.payload))


# ---------------------------------------------------------------------------------------------- loading
def graph_digest(proto: Any) -> str:
    """SHA-256 of an ONNX model's serialised graph (nodes, ``If`` branches, weights, inputs, outputs): the
    metadata entry that records it lies outside the graph, so the digest does not cover itself."""
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def read_onnx_meta(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """``(onnx ModelProto, skipnet metadata)`` of an ONNX file written by :func:`export_model`."""
    onnx, _ = require_onnx()
    path = Path(path)
    if not path.is_file():
        raise SkipnetError(f"{path} does not exist")
    try:
        proto = onnx.load(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors have many types
        raise SkipnetError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise SkipnetError(f"{path} is an ONNX file without skipnet metadata; write it with 'skipnet export'")
    try:
        meta = json.loads(props[META_KEY])
    except ValueError:
        raise SkipnetError(f"{path} has malformed skipnet metadata") from None
    if not isinstance(meta, dict):
        raise SkipnetError(f"{path} has malformed skipnet metadata")
    _check_interface(path, proto, meta)
    recorded = meta.get("graph_sha256")
    if recorded is not None and recorded != graph_digest(proto):
        raise SkipnetError(
            f"{path} was altered after export: its graph (nodes or weights) no longer has the SHA-256 its skipnet "
            "metadata records; export it again"
        )
    return proto, meta


def _check_interface(path: Path, proto: Any, meta: dict[str, Any]) -> None:
    """The inputs and outputs :func:`export_model` writes: ``images`` in; ``logits`` (a plain graph) or
    ``logits, probs, decisions`` out. A file edited since is refused before anything runs it."""
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in weights]
    outputs = [o.name for o in proto.graph.output]
    want = ["logits"] if meta.get("graph") == "plain" else ["logits", "probs", "decisions"]
    if inputs != ["images"] or outputs != want:
        raise SkipnetError(
            f"{path} takes {inputs} and returns {outputs}; a graph written by 'skipnet export' takes ['images'] "
            f"and returns {want}"
        )


def load_pt2(path: str | Path) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """``(ExportedProgram, skipnet metadata)`` of a ``.pt2`` file written by :func:`export_model`."""
    path = Path(path)
    extra = {META_KEY: ""}
    try:
        with _quiet():
            program = torch.export.load(os.fspath(path), extra_files=extra)
    except Exception as exc:  # noqa: BLE001
        raise SkipnetError(f"{path} is not a readable torch.export program ({type(exc).__name__})") from None
    if not extra[META_KEY]:
        raise SkipnetError(f"{path} has no skipnet metadata; write it with 'skipnet export'")
    return program, json.loads(extra[META_KEY])
