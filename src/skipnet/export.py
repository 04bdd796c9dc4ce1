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

Running (issue 32) is :mod:`skipnet.ortgraph`'s: :func:`~skipnet.ortgraph.onnx_session` (also importable from
here) opens a graph in ONNX Runtime rewritten for the CPU it runs on; the file itself stays standard, portable
ONNX, with the SHA-256 of its graph in its metadata (checked by :func:`read_onnx_meta`).

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
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from skipnet.backbones import Bottleneck
from skipnet.blocks import residual_branch, run_block, shortcut_branch
from skipnet.checkpoint import checkpoint_stats, data_record
from skipnet.data import Normalize
from skipnet.errors import SkipnetError
from skipnet.gated import GatedResNet, GateMode
from skipnet.gates import AIGGate, FeedForwardGates, RNNGate
from skipnet.ortgraph import (  # noqa: F401 - the running side's public names, also skipnet.export's
    LAYOUTS,
    LOGIT_TOL,
    NCHWC,
    blocked_layout,
    blocked_routed,
    lstm_gates,
    onnx_session,
    ort_optimized,
    prune_graph,
    require_onnx,
)

log = logging.getLogger(__name__)

GRAPHS = ("conditional", "routed", "masked", "plain")
FORMATS = ("safetensors", "pt2", "onnx")
SUFFIXES = {".safetensors": "safetensors", ".pt2": "pt2", ".onnx": "onnx"}
META_KEY = "skipnet"  # ONNX metadata_props key / pt2 extra file name holding the JSON metadata
ONNX_OPSET = 18


def format_for(path: str | Path, fmt: str | None = None) -> str:
    """The export format: ``fmt`` if given, else from the file extension (any case); a one-line error otherwise,
    for a ``fmt`` that the extension contradicts (another format's, or a checkpoint's), and for a pt2 or onnx export
    under another extension: skipnet's readers know those two by their extension, so nothing would read it."""
    lower = Path(path).suffix.lower()
    from_extension = SUFFIXES.get(lower, "checkpoint" if lower in (".pt", ".pth", ".ckpt") else None)
    if fmt is None:
        if from_extension is None or from_extension == "checkpoint":
            raise SkipnetError(
                f"{path} must end in .safetensors, .pt2 or .onnx (the format is taken from the extension), or pass "
                "--format"
            )
        return from_extension
    if fmt not in FORMATS:
        raise SkipnetError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if from_extension is not None and from_extension != fmt:
        raise SkipnetError(f"{path}'s extension says {from_extension}, but --format is {fmt}; end it in .{fmt}")
    if from_extension is None and fmt in ("pt2", "onnx"):
        raise SkipnetError(f"{path}: skipnet reads {fmt} exports by their extension; end it in .{fmt}")
    return fmt


# ------------------------------------------------------------------------------------------- graph modules
# ``(x - mean) / std`` per channel (identity without statistics), as the data loaders normalise: their own module
_Normalize = Normalize


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
    # tol is absolute up to logits of magnitude 1 and relative beyond: float32 rounds large logits by more
    scale = max(1.0, float(ref_logits.abs().max())) if ref_logits.numel() else 1.0
    res["ok"] = bool(
        res["same_classes"] and res.get("same_decisions", True) and res["max_abs_logit_diff"] <= tol * scale
    )
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
    data = data_record(ckpt or {})
    return {
        "format": "skipnet-export",
        "version": 1,
        "graph": graph.graph,
        "arch": model.config.to_dict(),
        "threshold": graph.threshold,
        "mode": "all_on" if graph.graph == "plain" else "greedy",  # how the graph decides: every block, or the gates
        "batch": batch,  # None: any batch size
        "image_size": model.config.image_size,
        "input": f"float32 {'RGB' if model.config.in_channels == 3 else f'{model.config.in_channels}-channel'} "
        "images in [0, 1], (B, C, H, W); the normalisation below is applied inside the graph",
        "normalize": {"mean": stats.mean.flatten().tolist(), "std": stats.std.flatten().tolist()}
        if stats.enabled
        else None,
        "outputs": ["logits"] if graph.graph == "plain" else ["logits", "probs", "decisions"],
        "classes": data.get("classes"),
        "prepare": data.get("prepare"),  # how the training images were made S x S (skipnet predict does the same)
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


# why an exported graph refuses calibrate's all-skip threshold, and what to do instead
ALL_SKIP_REFUSAL = (
    ": it is calibrate's all-skip point (no threshold in [0, 1] met the budget, so every gated block is skipped), "
    "which no exported graph holds (--graph plain would run every block instead); calibrate again to a larger "
    "budget, or export with --threshold T <= 1 (at 1 a block runs only where its gate is certain)"
)


def graph_for(model: GatedResNet, graph: str | None, source: str) -> str:
    """The graph to export: as the checkpoint was trained and validated. A SkipNet (greedy gates) defaults to
    ``conditional``; a network that runs every block (no gates, or a gated one trained in stage ``base``: mode
    ``all_on``) to ``plain`` and refuses a gated graph, whose untrained gates would decide; a stochastic-depth
    network (mode ``random``) has no deterministic graph and needs ``--graph plain`` explicitly."""
    from skipnet.evaluate import eval_mode_for

    mode = eval_mode_for(model)
    if mode == GateMode.RANDOM and graph != "plain":
        raise SkipnetError(
            f"{source} decides at random (mode random, stochastic depth), which no exported graph does; pass "
            "--graph plain (graph='plain') to export it with every block on"
        )
    if mode == GateMode.ALL_ON and model.gates is not None and graph not in (None, "plain"):
        raise SkipnetError(
            f"{source} runs every block (mode all_on: its gates were never trained, e.g. stage base), so a "
            f"{graph} graph would let untrained gates decide; export it with --graph plain (graph='plain', the "
            "default for it)"
        )
    if graph is not None:
        return graph
    return "conditional" if mode == GateMode.GREEDY else "plain"


def _as_recorded(model: GatedResNet, fmt: str, graph: str | None, stats: Any, ckpt: Any, threshold: Any) -> tuple:
    """``export_model``'s arguments checked, and its graph, normalisation and record where not given: the model's
    own (:func:`graph_for`, its ``data_record``)."""
    if fmt not in ("pt2", "onnx"):
        raise SkipnetError(f"export_model writes pt2 or onnx, not {fmt!r}")
    decides_at = float(model.threshold if threshold is None else threshold)
    if not 0.0 <= decides_at <= 1.0:  # every reader refuses such a file: never write one
        why = ALL_SKIP_REFUSAL if decides_at > 1 else ""
        raise SkipnetError(f"the threshold {decides_at} must lie in [0, 1] for an exported graph{why}")
    acts = ((n, m) for n, m in model.named_modules() if n.split(".")[-1] == "relu")
    odd = next(((n, m) for n, m in acts if type(m) is not nn.ReLU), None)
    if odd is not None:  # the graphs write every activation as a ReLU (the network's own)
        raise SkipnetError(
            f"exported graphs apply ReLU activations, and {odd[0]} is a {type(odd[1]).__name__}: export a model with "
            "the network's own nn.ReLU activations"
        )
    own = {"data": dict(getattr(model, "data_record", None) or {})}
    ckpt = ckpt if ckpt is not None else own
    stats = stats if stats is not None else checkpoint_stats(ckpt) or checkpoint_stats(own)  # a ckpt without them
    return graph_for(model, graph, model.config.name), stats, ckpt


def export_model(
    model: GatedResNet,
    fmt: str,
    *,
    graph: str | None = None,
    stats: Any = None,
    threshold: float | None = None,
    ckpt: dict[str, Any] | None = None,
    probes: int = 4,
    fallback: bool = True,
) -> Exported:
    """Export ``model`` as ``fmt`` (``pt2`` or ``onnx``) with graph ``graph``, checked against the eager model.

    ``graph`` defaults to the one the model is validated in (:func:`graph_for`: ``conditional`` for a SkipNet,
    ``plain`` for a network that runs every block, which refuses a gated graph). ``stats`` (the normalisation the
    graph applies) and ``ckpt`` (the record of classes and preparation the file carries) default to the model's own
    record (``model.data_record``, set when it is loaded or created pretrained). ``conditional`` is exported for
    batch 1; ``routed``, ``masked`` and ``plain`` for any batch. When ``routed`` does not export (the exporter
    cannot express the data-dependent shapes) and ``fallback`` is set, the ``masked`` graph is exported instead with
    a warning that it saves no compute. The exported program is run on ``probes`` seeded batches of random images
    (and the ONNX file in ONNX Runtime); any decision, class or logit (by > 1e-4, relative above 1) that differs
    from the eager greedy model is an error and nothing is returned.
    """
    graph, stats, ckpt = _as_recorded(model, fmt, graph, stats, ckpt, threshold)
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
    meta["sha256"] = file_digest(meta["graph_sha256"], meta)
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
    with zipfile.ZipFile(buf, "a") as z:  # torch's reader checks nothing: the digest of every other member
        z.writestr(_digest_member(z), pt2_digest(z))
    return buf.getvalue(), check


# The member of a .pt2 archive (in its top folder, as torch's reader requires) that holds the SHA-256 of all the
# others (program, weights, skipnet metadata).
PT2_DIGEST = "skipnet_sha256"


def _digest_member(z: zipfile.ZipFile) -> str:
    names = z.namelist()
    return f"{names[0].split('/')[0]}/{PT2_DIGEST}" if names else PT2_DIGEST


def pt2_digest(z: zipfile.ZipFile) -> str:
    """SHA-256 over every member of a ``.pt2`` archive but :data:`PT2_DIGEST`, by name: an edit of a weight, of
    the program or of the skipnet metadata (class list, threshold) changes it. Reading a member checks its CRC."""
    h = hashlib.sha256()
    own = _digest_member(z)
    for name in sorted(n for n in z.namelist() if n != own):
        h.update(name.encode() + b"\0" + hashlib.sha256(z.read(name)).digest())
    return h.hexdigest()


def check_pt2_digest(path: Path) -> None:
    """Refuse a ``.pt2`` file whose members changed since :func:`export_model` wrote it (one line); warn for one
    written before skipnet recorded the digest."""
    try:
        with zipfile.ZipFile(path) as z:
            own = _digest_member(z)
            recorded = z.read(own).decode() if own in z.namelist() else None
            digest = pt2_digest(z) if recorded is not None else None
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, EOFError) as exc:
        raise SkipnetError(f"{path} is damaged or not a torch.export program ({type(exc).__name__})") from None
    if recorded is None:
        log.warning("%s was written before skipnet checksummed .pt2 files: it is not verified; export it again", path)
    elif recorded != digest:
        raise SkipnetError(
            f"{path} was altered after export: its members no longer have the SHA-256 it records; export it again"
        )


def _ort_version() -> str:
    _, ort = require_onnx()
    return ort.__version__


def write_export(ex: Exported, out: str | Path, *, replace: bool = True) -> None:
    """Write an export's bytes to ``out`` atomically (see :func:`skipnet.fileio.atomic_write`); with
    ``replace=False`` a file at ``out``, even one another process wrote meanwhile, is an error and stays."""
    from skipnet.fileio import atomic_write

    try:
        atomic_write(out, lambda f: f.write(ex.payload), replace=replace)
    except FileExistsError:
        raise SkipnetError(f"{out} was written by another process meanwhile; kept (pass --force to replace)") from None


# ---------------------------------------------------------------------------------------------- loading
def graph_digest(proto: Any) -> str:
    """SHA-256 of an ONNX model's serialised graph (nodes, ``If`` branches, weights, inputs, outputs): the
    metadata entry that records it lies outside the graph, so the digest does not cover itself."""
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def file_digest(graph_sha256: str, meta: dict[str, Any]) -> str:
    """SHA-256 of the graph's digest (:func:`graph_digest`) and of the skipnet metadata (canonical JSON) but its
    own ``sha256`` entry: an edit of either (a weight, the class list, the threshold) changes it."""
    rest = json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode()
    return hashlib.sha256(graph_sha256.encode() + b"\0" + rest).hexdigest()


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
    if META_KEY not in props and not proto.graph.node:
        raise SkipnetError(f"{path} is empty or not an ONNX model (no graph); write it with 'skipnet export'")
    if META_KEY not in props:
        raise SkipnetError(f"{path} is an ONNX file without skipnet metadata; write it with 'skipnet export'")
    try:
        meta = json.loads(props[META_KEY])
    except ValueError:
        raise SkipnetError(f"{path} has malformed skipnet metadata") from None
    if not isinstance(meta, dict):
        raise SkipnetError(f"{path} has malformed skipnet metadata")
    _check_interface(path, proto, meta)
    recorded, whole = meta.get("graph_sha256"), meta.get("sha256")  # files of older exports: the graph's only
    if recorded is None and whole is None:
        log.warning("%s was written before skipnet checksummed ONNX exports: it is not verified; export it again", path)
    elif whole is None:  # an older export, or one whose metadata was edited and its digest removed
        log.warning(
            "%s records no SHA-256 of its skipnet metadata: its class names and threshold are not verified (the "
            "graph is); export it again",
            path,
        )
    digest = graph_digest(proto) if recorded is not None or whole is not None else None
    graph_changed = recorded is not None and recorded != digest
    if graph_changed or (whole is not None and whole != file_digest(digest, meta)):
        what = "graph (nodes or weights)" if graph_changed else "skipnet metadata"
        raise SkipnetError(
            f"{path} was altered after export: its {what} no longer has the SHA-256 its skipnet metadata records; "
            "export it again"
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
    check_pt2_digest(path)
    extra = {META_KEY: ""}
    try:
        with _quiet():
            program = torch.export.load(os.fspath(path), extra_files=extra)
    except Exception as exc:  # noqa: BLE001
        raise SkipnetError(f"{path} is not a readable torch.export program ({type(exc).__name__})") from None
    if not extra[META_KEY]:
        raise SkipnetError(f"{path} has no skipnet metadata; write it with 'skipnet export'")
    return program, json.loads(extra[META_KEY])
