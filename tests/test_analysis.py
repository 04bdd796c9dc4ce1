"""Analyses (paper §4.2), the compute-budget knob and the alpha sweep: pure numbers on hand-made records,
threshold sweeps on tiny random networks, and the analyze / calibrate / sweep commands end to end on digits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import train_tiny_sp
from skipnet import create_model
from skipnet.analysis import (
    ALL_SKIP_THRESHOLD,
    ScaledLoader,
    calibrate_threshold,
    easiest_hardest_class,
    easy_hard_indices,
    executed_blocks,
    forced_run,
    is_non_increasing,
    multiscale_deltas,
    per_class_stats,
    route_stats,
    skip_ratio_per_block,
    skip_ratio_per_stage,
    skipped_blocks,
    static_lesion,
    threshold_sweep,
    value_counts,
)
from skipnet.checkpoint import load_checkpoint, load_model
from skipnet.cli import main
from skipnet.cost import cost_model
from skipnet.errors import SkipnetError
from skipnet.fileio import atomic_save

FIGURES = (
    "tradeoff.png",
    "skip_ratio_per_block.png",
    "easy_hard.png",
    "per_class.png",
    "multiscale.png",
    "executed_blocks_hist.png",
)


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def sp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny RNN-gated network after a few SP steps on digits (with a 20% validation split)."""
    out = tmp_path_factory.mktemp("analysis") / "sp"
    return train_tiny_sp(out, iters=12, batch_size=64, lr=0.05, limit_train=384)


def _calibrated_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BN running statistics from ``x`` (all blocks on), so a random network's activations stay O(1)."""
    with torch.no_grad():
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average
        model(x, "all_on")
    return model.eval()


def _random_setup(name: str) -> tuple[nn.Module, list, object]:
    model = create_model(name)
    x = torch.randn(96, 3, 32, 32)
    _calibrated_bn(model, x)
    loader = [(x[i : i + 48], torch.randint(0, 10, (48,))) for i in (0, 48)]
    return model, loader, cost_model(model)


def _run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------- pure numbers
def test_skip_ratio_per_block_is_one_minus_mean_decisions() -> None:
    decisions = torch.bernoulli(torch.full((37, 7), 0.6))
    ratios = skip_ratio_per_block(decisions)
    assert ratios == pytest.approx((1 - decisions.double().mean(0)).tolist())
    stage = [0, 0, 1, 1, 1, 2, 2]
    per_stage = skip_ratio_per_stage(decisions, stage)
    assert per_stage == pytest.approx([sum(ratios[:2]) / 2, sum(ratios[2:5]) / 3, sum(ratios[5:]) / 2])
    assert executed_blocks(decisions).tolist() == (1 + decisions.sum(1)).long().tolist()
    assert (executed_blocks(decisions) + skipped_blocks(decisions) == 8).all()


def test_route_stats_by_hand() -> None:
    """Distinct decision patterns, the most common one's share, and the spread of executed blocks."""
    d = torch.tensor([[1, 0, 1], [1, 0, 1], [0, 0, 0], [1, 0, 1.0]])
    got = route_stats(d)
    assert got["distinct_routes"] == 2 and got["top_route_share"] == 0.75
    assert got["executed_std"] == pytest.approx(torch.tensor([3.0, 3, 1, 3]).std(unbiased=False).item())
    static = route_stats(torch.ones(5, 4))
    assert static == {"distinct_routes": 1, "top_route_share": 1.0, "executed_std": 0.0}
    assert route_stats(torch.ones(0, 4))["distinct_routes"] == 0


def test_per_class_stats_hand_made() -> None:
    # N = 4 gated blocks. class 0: skipped 4, 2, 1 -> median 2; 2 of 3 right. class 1: skipped 0, 3 -> median
    # 1.5; 0 of 2 right. class 2: no image.
    labels = torch.tensor([0, 0, 0, 1, 1])
    preds = torch.tensor([0, 0, 1, 0, 2])
    decisions = torch.tensor(
        [[0, 0, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.float32
    )
    stats = per_class_stats(labels, preds, decisions, ["cat", "dog", "ship"])
    assert [s["images"] for s in stats] == [3, 2, 0]
    assert stats[0]["accuracy"] == pytest.approx(200 / 3)
    assert stats[1]["accuracy"] == 0.0
    assert stats[0]["median_skipped"] == 2.0
    assert stats[1]["median_skipped"] == 1.5
    assert stats[0]["mean_executed"] == pytest.approx((1 + 3 + 4) / 3)
    assert easiest_hardest_class(stats) == (0, 1)  # the empty class is ignored
    tied = [dict(st, accuracy=50.0) for st in stats]  # equally accurate: the first listed, whatever they skip
    assert easiest_hardest_class(tied) == (0, 0)
    assert easiest_hardest_class(tied[::-1]) == (1, 1)  # class 1 ("dog", skipping less) is now listed first

    easy, hard = easy_hard_indices(decisions, 2)
    assert easy == [0, 4] and hard == [3, 2]
    assert value_counts(executed_blocks(decisions), 1, 5) == [1, 1, 1, 1, 1]
    scaled = torch.ones_like(decisions)
    assert multiscale_deltas(decisions, scaled).tolist() == [4, 2, 1, 0, 3]


def test_easy_hard_ties_broken_by_gate_probabilities() -> None:
    decisions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    probs = torch.tensor([[0.9, 0.2], [0.1, 0.6], [0.9, 0.9]])
    easy, hard = easy_hard_indices(decisions, 3, probs)
    assert easy == [1, 0, 2] and hard == [2, 0, 1]


# --------------------------------------------------------------------------------------------- sweeps
def first_change_executes_lower(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(M,) bool: per image, whether the first gate that differs between thresholds ``low < high`` executes at
    ``low`` (or no gate differs). Always true for a deterministic gated network."""
    diff = low.round() != high.round()
    first = diff.float().argmax(1)
    rows = torch.arange(low.shape[0])
    return ~diff.any(1) | (low[rows, first] > high[rows, first])


def test_threshold_sweep_feedforward_monotone_and_endpoints() -> None:
    model, loader, cost = _random_setup("tiny_feedforward_14")
    thresholds = [0.0, *[0.3 + 0.01 * i for i in range(41)], ALL_SKIP_THRESHOLD]
    points, records = threshold_sweep(model, loader, cost, thresholds)
    macs = [p["macs_mean"] for p in points]
    gates = float(sum(cost.gate_macs))
    assert macs[0] == pytest.approx(cost.total_macs_all_on + gates)  # threshold 0: every block runs
    assert macs[-1] == pytest.approx(cost.fixed_macs + gates)  # threshold > 1: no gated block runs
    assert len(set(macs)) > 3  # the grid crosses the gates' probabilities
    # Not guaranteed in general (a decision changes later gates' inputs), but holds for this network ...
    assert is_non_increasing(macs)
    # ... while this holds always: per image, the first differing gate executes at the lower threshold.
    ts = sorted(records)
    for lo, hi in zip(ts, ts[1:]):
        assert first_change_executes_lower(records[lo].decisions, records[hi].decisions).all()


def test_threshold_sweep_recurrent_first_change_and_scaled_loader() -> None:
    model, loader, cost = _random_setup("tiny_rnn_gate_14")
    points, records = threshold_sweep(model, loader, cost, [0.4 + 0.01 * i for i in range(21)])
    ts = sorted(records)
    assert [p["threshold"] for p in points] == ts
    for lo, hi in zip(ts, ts[1:]):
        assert first_change_executes_lower(records[lo].decisions, records[hi].decisions).all()
    x, _ = next(iter(ScaledLoader(loader, 0.75)))
    assert tuple(x.shape) == (48, 3, 24, 24) and x.is_contiguous(memory_format=torch.channels_last)


def test_static_lesion_removes_a_dead_block_first_and_nests() -> None:
    model, loader, cost = _random_setup("tiny_resnet_14")
    dead = 2  # a block whose residual branch is exactly zero: removing it changes nothing
    bn = model.gated_blocks[dead].bn2
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()
    labels = model(loader[0][0], "all_on").logits.argmax(1)  # labels the intact network gets right
    select = [(loader[0][0], labels)]
    points = static_lesion(model, select, cost, max_drop=3, evaluate_on=select)
    assert len(points) == 4 and points[0]["dropped"] == []
    assert points[0]["select_accuracy"] == points[0]["accuracy"] == 100.0
    assert points[1]["dropped"] == [dead]
    assert points[1]["select_loss"] == pytest.approx(points[0]["select_loss"], abs=1e-6)
    assert points[1]["macs_reduction"] == pytest.approx(100 * cost.block_macs[dead] / cost.total_macs_all_on)
    for a, b in zip(points, points[1:]):  # one more block each step, the earlier ones kept out
        assert set(a["dropped"]) < set(b["dropped"]) and len(b["dropped"]) == len(a["dropped"]) + 1
        assert b["macs_reduction"] > a["macs_reduction"]
    # the greedy choice is the best single removal: no other block costs less on ``select``
    for i in range(model.num_gates):
        if i != dead:
            keep = torch.ones(1, model.num_gates)
            keep[0, i] = 0
            logits = model(select[0][0], "random", decisions=keep.expand(48, -1)).logits
            assert torch.nn.functional.cross_entropy(logits, labels).item() >= points[1]["select_loss"] - 1e-6
    with pytest.raises(SkipnetError, match="max_drop"):
        static_lesion(model, select, cost, max_drop=model.num_gates + 1)
    assert model.training is False  # left as it was


def test_forced_run_is_one_static_route_for_every_image() -> None:
    """``forced_run``'s loss and accuracy are the network's with the blocks of ``keep`` executed for every image,
    summed over the batches (not averaged per batch)."""
    model, loader, _ = _random_setup("tiny_resnet_14")
    model.eval()
    x, _ = loader[0]
    labels = torch.arange(48) % 10
    batches = [(x[:40], labels[:40]), (x[40:], labels[40:])]  # unequal batches
    keep = torch.ones(1, model.num_gates)
    keep[0, [1, 3]] = 0
    with torch.no_grad():
        logits = model(x, "random", decisions=keep.expand(48, -1)).logits
    loss, acc = forced_run(model, batches, keep)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert acc == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())
    with torch.no_grad():
        all_on = model(x, "all_on").logits
    assert forced_run(model, batches, torch.ones(1, model.num_gates))[0] == pytest.approx(
        torch.nn.functional.cross_entropy(all_on, labels).item(), rel=1e-5
    )


def test_calibrate_threshold_meets_target_and_refuses_impossible() -> None:
    model, loader, cost = _random_setup("tiny_feedforward_14")
    gates = float(sum(cost.gate_macs))
    target = cost.fixed_macs + gates + 0.6 * sum(cost.block_macs)
    result = calibrate_threshold(model, loader, cost, target, grid=[0.0, 0.25, 0.5, 0.75, 1.0], refine=3)
    assert result.macs_mean <= target
    feasible = [p for p in result.points if p["macs_mean"] <= target]
    assert result.accuracy == max(p["accuracy"] for p in feasible)
    assert len(result.points) > 5  # bisection added points
    with pytest.raises(Exception, match="below the least"):
        calibrate_threshold(model, loader, cost, cost.fixed_macs + gates - 1)


# --------------------------------------------------------------------------------------------- commands
def test_calibrate_command_writes_checkpoint_that_eval_uses(
    sp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = sp_run / "best.pt"
    new = tmp_path / "calibrated.pt"
    args = ["calibrate", str(ckpt), "--data", "digits", "--target-reduction", "40", "--out", str(new), "--json"]
    code, out, err = _run_cli(capsys, *args)
    assert code == 0, err
    res = json.loads(out)
    assert res["split"] == "val" and res["margin"] == 1.0
    all_on = res["target_macs"] / 0.6
    assert res["effective_target_macs"] == pytest.approx(all_on * (1 - 0.41))
    assert res["macs_mean"] <= res["effective_target_macs"] <= res["target_macs"]

    model, data = load_model(new)
    assert model.threshold == pytest.approx(res["threshold"])
    assert data["calibration"]["split"] == "val" and data["calibration"]["threshold"] == res["threshold"]
    src = load_checkpoint(ckpt)
    assert all(torch.equal(v, src["state_dict"][k]) for k, v in data["state_dict"].items())

    code, out, err = _run_cli(capsys, "eval", str(new), "--data", "digits", "--split", "val", "--json")
    assert code == 0, err
    ev = json.loads(out)
    assert ev["threshold"] == pytest.approx(res["threshold"])
    assert ev["macs_mean"] == pytest.approx(res["macs_mean"]) and ev["accuracy"] == pytest.approx(res["accuracy"])


def test_calibrate_without_val_split_needs_explicit_train(
    sp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt = load_checkpoint(sp_run / "best.pt")
    ckpt["data"] = dict(ckpt["data"], val_split=0.0)
    no_val = tmp_path / "noval.pt"
    atomic_save(ckpt, no_val)
    base = ["calibrate", str(no_val), "--data", "digits", "--target-reduction", "30", "--out", str(tmp_path / "c.pt")]
    code, _, err = _run_cli(capsys, *base)
    assert code == 2 and "--split train" in err and len(err.strip().splitlines()) == 1
    code, out, err = _run_cli(capsys, *base, "--split", "train", "--grid", "0", "0.5", "1", "--refine", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["split"] == "train"


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", "missing.pt", "--data", "digits", "--out", "x"],
        ["calibrate", "missing.pt", "--data", "digits", "--target-macs", "1e5", "--out", "x.pt"],
        ["calibrate", "{ckpt}", "--data", "digits", "--out", "x.pt"],
        ["calibrate", "{ckpt}", "--data", "digits", "--target-macs", "1e5", "--target-reduction", "10", "--out", "x"],
        ["calibrate", "{ckpt}", "--data", "digits", "--target-macs", "10", "--out", "{tmp}/x.pt"],
        ["sweep", "--init", "missing.pt", "--data", "digits", "--alphas", "0.1", "--out", "x"],
    ],
)
def test_bad_input_is_a_one_line_error(
    argv: list[str], sp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [a.format(ckpt=sp_run / "best.pt", tmp=tmp_path) for a in argv]
    code, _, err = _run_cli(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "error:" in err


def test_analyze_command_writes_figures_and_report(sp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    ckpt = str(sp_run / "best.pt")
    argv = ["analyze", ckpt, "--data", "digits", "--out", str(out), "--limit", "120", "--images", "4"]
    argv += ["--thresholds", "0.2", "0.5", "0.8", "--base", ckpt, "--compare", str(sp_run / "last.pt"), "--json"]
    code, stdout, err = _run_cli(capsys, *argv)
    assert code == 0, err
    assert json.loads(stdout)["images"] == 120
    report = (out / "report.md").read_text()
    for name in FIGURES:
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert f"]({name})" in report
    numbers = json.loads((out / "analysis.json").read_text())
    assert [p["threshold"] for p in numbers["threshold_sweep"]] == [0.2, 0.5, 0.8]
    assert len(numbers["skip_ratio_per_block"]) == 5
    # the default scales 0.5 and 0.75 make the 8-px digits 4 and 6 px, under the network's 8: skipped, said on stderr
    assert [m["scale"] for m in numbers["multiscale"]] == [1.25, 1.5] and err.count("warning: --scales") == 2
    assert "--scales 0.5 skipped: 8-px images would be 4 px, under the 8 px" in err
    assert numbers["base"]["macs_reduction"] == pytest.approx(0.0)  # every block on, no gate
    assert sum(numbers["executed_blocks_counts"].values()) == 120
    assert 1 <= numbers["routes"]["distinct_routes"] <= 120 and "distinct routes" in report
    assert "accuracy" in report and "computation percentage" in report


@pytest.mark.slow
def test_sweep_two_alphas_and_rerun_skips(sp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", "--init", str(sp_run / "best.pt"), "--data", "digits", "--alphas", "0.5", "0.1"]
    argv += ["--out", str(out), "--iters", "2", "--batch-size", "64", "--limit-train", "128", "--limit-test", "100"]
    argv += ["--threads", "1", "--json"]
    code, stdout, err = _run_cli(capsys, *argv)
    assert code == 0, err
    result = json.loads(stdout)
    assert [r["alpha"] for r in result["rows"]] == [None, 0.1, 0.5]
    assert json.loads((out / "sweep.json").read_text()) == result
    assert (out / "sweep.md").exists() and (out / "tradeoff.png").exists()
    for a in ("0.1", "0.5"):
        run = out / f"alpha_{a}"
        assert (run / "best.pt").exists() and (run / "summary.json").exists()
        assert load_checkpoint(run / "best.pt")["train_config"]["alpha"] == float(a)
    before = (out / "alpha_0.1" / "metrics.jsonl").read_text()
    code, stdout, err = _run_cli(capsys, *argv)
    assert code == 0, err
    assert (out / "alpha_0.1" / "metrics.jsonl").read_text() == before  # finished runs are not retrained
    assert json.loads(stdout)["rows"] == result["rows"]
    for changed in (["--lr", "0.5"], ["--iters", "3"]):  # reused as it was, they were reported as the new options'
        code, stdout, err = _run_cli(capsys, *argv, *changed)
        assert code == 2 and "choose another --out" in err and len(err.strip().splitlines()) == 1, err
    assert (out / "alpha_0.1" / "metrics.jsonl").read_text() == before
