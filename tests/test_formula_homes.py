"""Every equation has one home: the skip ratio (:mod:`skipnet.routes`), the MACs floor and reduction
(:class:`skipnet.cost.CostModel`) and whether a pass spends its gates' MACs (:func:`skipnet.evaluate.gates_spent`),
checked by hand and against the callers that used to compute them themselves."""

from __future__ import annotations

import math

import pytest
import torch

from skipnet import create_model
from skipnet.cost import CostModel, cost_model, macs_at_reduction, macs_reduction
from skipnet.evaluate import EvalRecord, eval_mode_for, gates_spent, run_eval, summarize
from skipnet.gated import GateMode
from skipnet.routes import executed_blocks, skip_ratio, skip_ratio_per_block
from skipnet.runstate import selection_score, validation_row

HAND = CostModel("hand", 32, 0, fixed_macs=100, block_macs=[10, 20, 30], gate_macs=[1, 2, 3])


# ----------------------------------------------------------------------------------------------- MACs
def test_floor_and_reduction_by_hand() -> None:
    """All on: 100 + 10 + 20 + 30 = 160; the floor: 100 + 1 + 2 + 3 = 106, i.e. 100 (1 - 106/160) = 33.75% fewer."""
    assert HAND.gate_macs_total == 6.0 and HAND.min_macs == 106.0
    assert HAND.reduction(160) == 0.0 and HAND.reduction(106.0) == 33.75 and HAND.reduction(80) == 50.0
    assert HAND.reduction(200) == -25.0  # more than the plain ResNet: a negative reduction
    assert HAND.macs_for_reduction(50.0) == 80.0 and HAND.macs_for_reduction(33.75) == 106.0
    assert macs_reduction(106.0, 160) == 33.75 and macs_at_reduction(33.75, 160) == 106.0
    # the floor is what every block skipped costs with the gates computed
    assert HAND.macs_per_image(torch.zeros(1, 3)).item() == HAND.min_macs


def test_floor_and_reduction_of_a_real_model() -> None:
    cm = cost_model(create_model("tiny_rnn_gate_14"))
    assert cm.min_macs == cm.fixed_macs + sum(cm.gate_macs) and cm.gate_macs_total == sum(cm.gate_macs) > 0
    d = torch.bernoulli(torch.full((8, cm.num_gates), 0.5))
    macs = cm.macs_per_image(d)
    by_hand = [cm.fixed_macs + sum(b for b, k in zip(cm.block_macs, row) if k) + sum(cm.gate_macs) for row in d]
    assert macs.tolist() == by_hand
    all_on = cm.fixed_macs + sum(cm.block_macs)
    for m in macs.tolist():
        assert cm.reduction(m) == 100.0 * (1.0 - m / all_on)  # bit for bit the formula the callers had
        assert cm.macs_for_reduction(cm.reduction(m)) == pytest.approx(m, rel=1e-12)
    arr = torch.tensor([all_on / 2, all_on], dtype=torch.float64).numpy()  # arrays too: a plot's secondary axis
    assert cm.reduction(arr).tolist() == [50.0, 0.0]


# ------------------------------------------------------------------------------------------ skip ratio
def test_skip_ratio_per_block_and_overall() -> None:
    d = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 1.0]])
    assert skip_ratio_per_block(d) == [0.5, 0.75, 0.0]
    executed_mean = executed_blocks(d).double().mean().item()  # (3 + 2 + 4 + 2) / 4
    assert executed_mean == 2.75 and skip_ratio(executed_mean, 3) == pytest.approx(sum([0.5, 0.75, 0.0]) / 3)
    for _ in range(5):
        d = torch.bernoulli(torch.full((37, 7), 0.4))
        mean = executed_blocks(d).double().mean().item()
        assert skip_ratio(mean, 7) == pytest.approx(sum(skip_ratio_per_block(d)) / 7, abs=1e-12)
    empty = skip_ratio_per_block(torch.zeros(0, 4))
    assert len(empty) == 4 and all(math.isnan(r) for r in empty)  # no image: nothing was decided
    assert math.isnan(skip_ratio(math.nan, 4)) and skip_ratio(1.0, 0) == 0.0  # no gated block: nothing skipped


def _record(decisions: torch.Tensor, spent: bool) -> EvalRecord:
    m = decisions.shape[0]
    labels = torch.arange(m) % 3
    return EvalRecord(
        labels=labels,
        preds=labels,
        correct5=torch.ones(m, dtype=torch.bool),
        decisions=decisions,
        probs=decisions.clone(),
        macs=HAND.macs_per_image(decisions, include_gates=spent),
        ce=torch.zeros(m),
        gates_spent=spent,
    )


def test_summarize_and_the_run_records_use_the_homes() -> None:
    d = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1.0]])
    s = summarize(_record(d, True), HAND, 10)
    assert s["skip_ratio_per_block"] == [round(r, 6) for r in skip_ratio_per_block(d)] == [0.333333, 0.666667, 0.0]
    assert s["executed_blocks_mean"] == executed_blocks(d).double().mean().item() == 3.0
    assert s["macs_reduction"] == HAND.reduction(s["macs_mean"]) and s["gate_macs_mean"] == 6.0
    assert summarize(_record(d, False), HAND, 10)["gate_macs_mean"] == 0.0
    row = validation_row(s | {"loss": 0.5}, 3)
    assert row["val_skip_ratio"] == pytest.approx(sum(skip_ratio_per_block(d)) / 3)
    assert row["val_skip_ratio_per_block"] == s["skip_ratio_per_block"]  # as reported, not rounded again
    val = s | {"loss": 0.5}
    assert selection_score("reward", val, 1.0, 1.0, 3) == pytest.approx(-0.5 + row["val_skip_ratio"])


# --------------------------------------------------------------------------------------- gates spent
def test_gates_spent_is_one_rule() -> None:
    gated, plain = create_model("tiny_rnn_gate_14"), create_model("tiny_resnet_14")
    for mode in GateMode:
        assert gates_spent(gated, mode) == (mode not in (GateMode.ALL_ON, GateMode.RANDOM))
        assert not gates_spent(plain, mode)
    assert gates_spent(gated, "greedy") and not gates_spent(gated, "random")
    # predict's own rule (gates and greedy, in the mode the model was validated in) is this one at eval_mode_for
    for model in (gated, plain):
        for stored in ("greedy", "all_on", "random", "hard"):
            model.mode = GateMode(stored)
            mode = eval_mode_for(model)
            assert gates_spent(model, mode) == (model.gates is not None and mode == GateMode.GREEDY)


def test_run_eval_records_whether_gates_were_spent() -> None:
    model = create_model("tiny_rnn_gate_14")
    cost = cost_model(model)
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))]
    for mode in (GateMode.GREEDY, GateMode.ALL_ON, GateMode.SOFT):
        rec = run_eval(model, batches, cost, mode=mode)
        assert rec.gates_spent == gates_spent(model, mode)
        assert torch.equal(rec.macs, cost.macs_per_image(rec.decisions, include_gates=rec.gates_spent))
        gate_macs = summarize(rec, cost, 10)["gate_macs_mean"]
        assert gate_macs == (cost.gate_macs_total if rec.gates_spent else 0.0)


def test_the_stage_groups_of_the_options_are_the_stages_own_properties() -> None:
    from skipnet.stages import STAGES
    from skipnet.trainconfig import GATED_STAGES, RL_STAGES

    assert set(RL_STAGES) == {name for name, stage in STAGES.items() if stage.uses_rl}
    assert set(GATED_STAGES) == {name for name, stage in STAGES.items() if stage.needs_gates}


def test_a_checkpoints_data_record_is_read_in_one_place() -> None:
    """``checkpoint.data_record`` is the one reader of a checkpoint's ``data`` record (a missing or non-mapping
    record reads as empty; the loader refuses a malformed one before this), ``recorded_val_split`` the one reader
    of its validation share; no other module reads ``ckpt["data"]`` itself."""
    import re
    from pathlib import Path

    from skipnet.checkpoint import data_record, recorded_val_split

    assert data_record({}) == {} and data_record({"data": None}) == {} and data_record({"data": [1]}) == {}
    assert data_record({"data": {"classes": ["a"]}}) == {"classes": ["a"]}
    assert recorded_val_split({}) == 0.0 and recorded_val_split({"data": {"val_split": None}}) == 0.0
    assert recorded_val_split({"data": {"val_split": 0.1}}) == 0.1
    package = Path(__file__).resolve().parents[1] / "src" / "skipnet"
    readers = re.compile(r"""(ckpt|saved|record)\w*\)?\.get\(\s*["']data["']|\[["']data["']\]""")
    found = sorted(
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name not in ("checkpoint.py", "rundir.py") and readers.search(p.read_text())
    )
    assert found == [], found


def test_the_run_directory_names_its_files_once() -> None:
    """A run directory's file names are spelled in ``rundir`` only: every other module joins the constants."""
    from pathlib import Path

    from skipnet import rundir

    assert {rundir.LAST, rundir.BEST, rundir.CONFIG, rundir.METRICS, rundir.SUMMARY} <= set(rundir.RUN_FILES)
    package = Path(__file__).resolve().parents[1] / "src" / "skipnet"
    spelled = {
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p.name != "rundir.py"
        for name in ("last.pt", "best.pt", "metrics.jsonl", "summary.json")
        if f'/ "{name}"' in p.read_text() or f'("{name}"' in p.read_text() or f', "{name}"' in p.read_text()
    }
    assert spelled == set(), spelled


def test_the_built_in_data_sets_are_described_once() -> None:
    """``data.BUILTINS`` holds the built-in data sets' facts; the registry's architecture names agree with it
    (classes, 32 px), the training options read the image side from it, and the loaders its augmentation."""
    import pytest

    from skipnet.data import BUILTIN, BUILTINS, load_data
    from skipnet.errors import SkipnetError
    from skipnet.registry import SMALL_DATASETS, get_config
    from skipnet.trainconfig import TrainConfig

    assert tuple(BUILTINS) == BUILTIN
    for name, classes in SMALL_DATASETS.items():
        config = get_config(f"{name}_resnet_20")
        assert (config.num_classes, config.image_size) == (BUILTINS[name].classes, BUILTINS[name].size) == (classes, 32)
    with pytest.raises(SkipnetError, match="has 8x8 images"):
        TrainConfig(stage="base", out="unused", arch="tiny_resnet_8", data="digits", image_size=16).validate()
    bundle = load_data("digits", batch_size=8)
    assert (bundle.train.pad, bundle.train.flip) == (BUILTINS["digits"].pad, BUILTINS["digits"].flip) == (1, False)
    assert len(bundle.classes) == BUILTINS["digits"].classes
