"""Evaluation: accuracy, MACs actually spent per image, computation percentage, skip ratio per block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from skipnet.checkpoint import checkpoint_stats, data_record, fingerprint_subsets, recorded_val_split
from skipnet.cost import CostModel, computation_percentage
from skipnet.data import DataBundle, load_data
from skipnet.errors import SkipnetError
from skipnet.gated import GatedResNet, GateMode
from skipnet.routes import executed_blocks, route_summary, skip_ratio_per_block
from skipnet.rundir import data_fingerprint, describe_difference, val_split_difference

SKIP_RATIO_DIGITS = 6  # the skip ratio per block as summarize reports it (eval --json, summary.json, metrics.jsonl)


@dataclass
class EvalRecord:
    """Per-image results of an evaluation pass (all on CPU)."""

    labels: Tensor  # (M,)
    preds: Tensor  # (M,)
    correct5: Tensor  # (M,) bool
    decisions: Tensor  # (M, N)
    probs: Tensor  # (M, N)
    macs: Tensor  # (M,) float64
    ce: Tensor  # (M,) cross-entropy of each image
    gates_spent: bool  # whether ``macs`` count the gates' MACs: :func:`gates_spent` of the pass


def gates_spent(model: nn.Module, mode: GateMode | str) -> bool:
    """Whether running ``model`` in ``mode`` spends its gates' MACs: it has gates and the mode computes them
    (greedy, hard, soft, sample; not all_on or random, which decide without them). The one rule for every count of
    MACs: :func:`run_eval` records it in :attr:`EvalRecord.gates_spent`."""
    net = getattr(model, "module", model)
    return net.gates is not None and GateMode(mode).computes_gates


def eval_mode_for(model: GatedResNet) -> GateMode:
    """How a model decides at inference: as it was trained and validated.

    ``all_on`` and ``random`` (SDV) are kept as stored: a gated architecture trained in stage ``base`` records
    ``all_on`` and its gates were never trained, so it runs every block. A training mode (``hard``, ``soft``,
    ``sample``) is validated greedily, as is any gated model; a model without gates runs every block."""
    mode = GateMode(model.mode)
    if not mode.computes_gates:  # all_on, random: kept as stored
        return mode
    return GateMode.GREEDY if model.gates is not None else GateMode.ALL_ON


def require_learned_gates(model: GatedResNet, source: str, what: str, stage: str | None = None) -> None:
    """Refuse, in one line, to choose or study gate thresholds of a model whose gates do not decide when it runs
    as it was trained and validated: no gates, ``random`` (SDV) or ``all_on`` (a gated architecture trained in
    stage ``base``, named by ``stage`` where known: its gates were never trained)."""
    mode = eval_mode_for(model)
    if model.gates is None:
        raise SkipnetError(f"{what} needs a checkpoint with learned gates; {source} ({model.config.name}) has none")
    if mode == GateMode.RANDOM:
        raise SkipnetError(
            f"{what} needs learned gates, but {source} decides at random (mode random, stochastic depth)"
        )
    if mode == GateMode.ALL_ON:
        how = f", as it was trained in stage {stage}" if stage else ""
        raise SkipnetError(
            f"{source} runs every block (mode all_on{how}): its gates were never trained, so {what} has no "
            "thresholds to work on; give a checkpoint of stage sp or hrl"
        )


def describe_mode(mode: GateMode | str) -> str:
    """A few words naming how a mode decides, for reports (:attr:`GateMode.description`)."""
    return GateMode(mode).description


@torch.no_grad()
def run_eval(
    model: nn.Module,
    loader,
    cost: CostModel,
    *,
    mode: GateMode | str | None = None,
    threshold: float | None = None,
    keep: float | None = None,
    seed: int = 0,
    max_batches: int | None = None,
    memory_format: torch.memory_format = torch.preserve_format,
) -> EvalRecord:
    """Run ``model`` over ``loader`` and collect per-image predictions, decisions and MACs; the images reach it in
    ``memory_format`` (the loaders' channels_last by default; training's ``--no-channels-last`` passes NCHW)."""
    net: GatedResNet = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    mode = GateMode(mode or eval_mode_for(net))
    device = next(net.parameters()).device
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)  # random (SDV) decisions are reproducible
    labels, preds, c5, decs, probs, ces = [], [], [], [], [], []
    try:
        for b, (x, y) in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            out = net(x, mode, threshold=threshold, keep=keep)
            logits = out.logits.float().cpu()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            labels.append(y)
            ces.append(F.cross_entropy(logits, y.long(), reduction="none"))
            preds.append(top[:, 0])
            c5.append((top == y.view(-1, 1)).any(1))
            decs.append(out.trace.decisions.float().cpu())
            probs.append(out.trace.probs.float().cpu())
    finally:
        torch.set_rng_state(gen_state)
        net.train(was_training)
    decisions = torch.cat(decs) if decs else torch.zeros(0, net.num_gates)
    if mode == GateMode.SOFT:  # soft gating (Sec. 3.2): every block runs for every image, its output scaled by p
        decisions = torch.ones_like(decisions)
    spent = gates_spent(net, mode)
    return EvalRecord(
        labels=torch.cat(labels),
        preds=torch.cat(preds),
        correct5=torch.cat(c5),
        decisions=decisions,
        probs=torch.cat(probs) if probs else decisions.clone(),
        macs=cost.macs_per_image(decisions, include_gates=spent),
        ce=torch.cat(ces) if ces else torch.zeros(0),
        gates_spent=spent,
    )


def summarize(record: EvalRecord, cost: CostModel, num_classes: int) -> dict[str, Any]:
    """The numbers ``skipnet eval --json`` reports, from an :class:`EvalRecord`; the gates' MACs count where the
    record says they were spent (:attr:`EvalRecord.gates_spent`)."""
    n = len(record.labels)
    correct = (record.preds == record.labels).float()
    macs_mean = record.macs.mean().item() if n else float("nan")
    out: dict[str, Any] = {
        "images": n,
        "accuracy": 100.0 * correct.mean().item() if n else float("nan"),
        "loss": record.ce.mean().item() if n else float("nan"),
        "macs_mean": macs_mean,
        "macs_all_on": cost.total_macs_all_on,
        "macs_reduction": cost.reduction(macs_mean),
        "computation_percentage": computation_percentage(record.decisions) if n else 100.0,
        "skip_ratio_per_block": [round(r, SKIP_RATIO_DIGITS) for r in skip_ratio_per_block(record.decisions)],
        "executed_blocks_mean": executed_blocks(record.decisions).double().mean().item() if n else float("nan"),
        "gate_macs_mean": cost.gate_macs_total if record.gates_spent else 0.0,
        "routes": route_summary(record.decisions, record.labels, record.preds),
    }
    if num_classes >= 20:
        out["top5"] = 100.0 * record.correct5.float().mean().item() if n else float("nan")
    return out


def evaluate(model: nn.Module, loader, cost: CostModel, **kwargs: Any) -> dict[str, Any]:
    """Evaluate and summarise in one call (see :func:`run_eval` for the keyword arguments)."""
    net = getattr(model, "module", model)
    return summarize(run_eval(model, loader, cost, **kwargs), cost, net.config.num_classes)


# ------------------------------------------------------------------- data as a checkpoint saw it
def required_stats(ckpt: dict[str, Any], source: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation a checkpoint was trained with, for what feeds it images itself (``skipnet predict``, an
    exported graph); a one-line error where it records none: the images would reach the network unnormalised, and
    every prediction would be wrong without an error."""
    stats = checkpoint_stats(ckpt)
    if stats is None:
        raise SkipnetError(
            f"{source} records no input normalisation (its data record has no mean and std), so images fed to it "
            "would be wrong; save it with its record: save_pretrained(model, DIR, data={'mean': [...], 'std': [...], "
            "'classes': [...]}) or save_checkpoint(PATH, model, data=...)"
        )
    return stats


VAL_GUARD = "val_guard"  # DataBundle.info key: data_for_checkpoint's check of the validation split, run on use
VAL_ADVICE = "give the data it was trained on, or use --split test (another test set is fine)"


def data_for_checkpoint(
    ckpt: dict[str, Any],
    model: GatedResNet,
    spec: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    batch_size: int = 256,
    limit: int | None = None,
    limit_train: int | None = None,
) -> DataBundle:
    """Load ``spec`` as the checkpoint saw it: its normalisation, its validation split, its image size and the way
    its images were made that size.

    ``limit`` keeps a seeded subset of the test and validation splits (as ``skipnet eval --limit``). Where the
    checkpoint records the fingerprint of its data (``data_fingerprint``), its validation split is checked when
    it is used (:func:`eval_loader` of ``"val"``, see :func:`check_val_split`).
    """
    kwargs: dict[str, Any] = {
        "data_dir": data_dir,
        "download": download,
        "batch_size": batch_size,
        "eval_batch_size": batch_size,
        "val_split": recorded_val_split(ckpt),
        "image_size": model.config.image_size,
        "stats": checkpoint_stats(ckpt),
        "prepare": data_record(ckpt).get("prepare"),  # as its images were made S x S (predict does the same)
    }
    data = load_data(spec, limit_train=limit_train, limit_test=limit, **kwargs)
    if isinstance(ckpt.get("data_fingerprint"), dict) and data.val is not None:
        subsets = (limit_train, limit)

        def guard(advice: str, source: str) -> None:
            check_val_split(ckpt, data, spec, source, advice, subsets, kwargs)

        data.info[VAL_GUARD] = guard
    return data


def check_val_split(
    ckpt: dict[str, Any],
    data: DataBundle,
    spec: str,
    source: str,
    advice: str,
    subsets: tuple[int | None, int | None],
    kwargs: dict[str, Any],
) -> None:
    """Refuse, in one line, the validation split of ``data`` (``spec`` loaded with ``subsets``, its
    ``(limit_train, limit_test)``, and ``kwargs``) for the checkpoint ``ckpt`` where it is not the split the
    checkpoint was validated on: the split is carved from the training images by their count with a fixed seed,
    so data with other training images (a few added, say) carves another one, which may hold images the
    checkpoint trained on. The current data's fingerprint (:func:`skipnet.rundir.data_fingerprint`, under the
    subsets the run used: :func:`skipnet.checkpoint.fingerprint_subsets`) is compared with the recorded one
    (:func:`skipnet.rundir.val_split_difference`); the test split may differ."""
    trained = fingerprint_subsets(ckpt)
    same = (
        data
        if trained == tuple(_subset(v) for v in subsets)
        else load_data(spec, **dict(kwargs, limit_train=trained[0], limit_test=trained[1]))
    )
    diff = val_split_difference(ckpt["data_fingerprint"], data_fingerprint(same))
    if diff is None:
        return
    trained_on = data_record(ckpt).get("spec")
    where = f" ({trained_on})" if isinstance(trained_on, str) and trained_on != spec else ""
    raise SkipnetError(
        f"--data {spec} is not the data {source} was trained on{where}: {describe_difference(*diff)}, so the "
        f"validation split carved from its training images may include images the checkpoint trained on; {advice}"
    )


def _subset(value: int | None) -> int | None:
    """A ``limit_train`` / ``limit_test`` as :func:`skipnet.checkpoint.fingerprint_subsets` gives it (0: all)."""
    return value if value else None


def eval_loader(data: DataBundle, split: str, *, source: str = "the checkpoint", advice: str = VAL_ADVICE):
    """The loader of ``split``, without augmentation (also for ``train``). The validation split of data loaded for a
    checkpoint (:func:`data_for_checkpoint`) is first checked to be the one it was validated on
    (:func:`check_val_split`; its error names the checkpoint ``source`` and ends with ``advice``)."""
    loader = data.split(split)
    guard = data.info.get(VAL_GUARD) if split == "val" else None
    if guard is not None:
        guard(advice, source)
        data.info.pop(VAL_GUARD, None)  # checked once
    if split == "train" and getattr(loader, "evaluation", None) is not None:  # a large-image folder
        return loader.evaluation
    if split == "train" and hasattr(loader, "train"):
        loader.train = False
    return loader
