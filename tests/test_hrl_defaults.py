"""Defaults that work (issue: the headline): gates start open for SP from scratch, BatchNorm frozen in HRL from a
trained network, best.pt of HRL chosen on what HRL maximises."""

from __future__ import annotations

import json

import pytest
import torch

from skipnet.checkpoint import load_model
from skipnet.cli import main
from skipnet.losses import distillation_loss, distilled_task_loss, hybrid_returns, mean_first_return
from skipnet.registry import create_model
from skipnet.runstate import selection_score
from skipnet.trainconfig import TrainConfig, resolve_defaults

COMMON = ["--limit-train", "256", "--limit-test", "64", "--batch-size", "32", "--threads", "1", "--val-split", "0.2"]


def test_mean_first_return_is_eq6_at_the_first_gate() -> None:
    ce = torch.rand(9) * 2
    d = (torch.rand(9, 5) > 0.4).float()
    expected = hybrid_returns(ce, d, alpha=1.5, beta=0.7)[:, 0].mean().item()
    got = mean_first_return(ce.mean().item(), (1 - d).mean().item(), alpha=1.5, beta=0.7)
    assert got == pytest.approx(expected, rel=1e-5)


def test_selection_rules() -> None:
    accurate = {"accuracy": 80.0, "loss": 0.60, "executed_blocks_mean": 6.0}  # all 5 gated blocks run
    cheap = {"accuracy": 78.0, "loss": 0.65, "executed_blocks_mean": 3.0}  # 3 of 5 skipped
    assert selection_score("accuracy", accurate, 1.0, 1.0, 5) > selection_score("accuracy", cheap, 1.0, 1.0, 5)
    # reward = -CE + alpha * skipped fraction: 0.6 skipped is worth 0.05 CE at any alpha above 1/12
    assert selection_score("reward", cheap, 1.0, 1.0, 5) == pytest.approx(-0.65 + 0.6)
    assert selection_score("reward", cheap, 1.0, 1.0, 5) > selection_score("reward", accurate, 1.0, 1.0, 5)
    assert selection_score("reward", cheap, 0.0, 1.0, 5) < selection_score("reward", accurate, 0.0, 1.0, 5)
    assert selection_score("last", cheap, 1.0, 1.0, 5) == float("inf")
    # --skip-target: skipping beyond the target earns nothing; at 0.02 the 0.05 of CE is no longer repaid
    assert selection_score("reward", cheap, 1.0, 1.0, 5, 0.2) == pytest.approx(-0.65 + 0.2)
    assert selection_score("reward", accurate, 1.0, 1.0, 5, 0.02) > selection_score("reward", cheap, 1.0, 1.0, 5, 0.02)
    # --skip-budget: a constraint; those meeting it rank by accuracy, above every one that does not (by its skips)
    better = cheap | {"accuracy": 79.0, "executed_blocks_mean": 3.2}  # 0.56 skipped: within 0.02 of the budget
    score = lambda v, budget=0.58: selection_score("reward", v, 9.0, 1.0, 5, skip_budget=budget)  # noqa: E731
    assert score(cheap) == 78.0 and score(better) == 79.0 and score(accurate) == pytest.approx(-100.0)
    assert score(better, 0.6) == pytest.approx(-44.0) and score(better, 0.6) > score(accurate, 0.6)
    # --skip-reward correct: only right predictions earn the skip reward, estimated as skipped x accuracy
    correct = selection_score("reward", cheap, 1.0, 1.0, 5, skip_reward="correct")
    assert correct == pytest.approx(-0.65 + 0.6 * 0.78)


@pytest.fixture(scope="module")
def sp_run(tmp_path_factory, cifar_mini):
    """SP from scratch with nothing but the schedule set: its defaults open the gates."""
    out = tmp_path_factory.mktemp("defaults") / "sp"
    args = ["train", "tiny_rnn_gate_14", "--stage", "sp", "--data", cifar_mini, *COMMON, "--iters", "8"]
    assert main([*args, "--lr", "0.05", "--out", str(out)]) == 0
    return out, cifar_mini


def test_sp_from_scratch_starts_with_open_gates(sp_run, tmp_path) -> None:
    out, data = sp_run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["gate_bias"] == 2.0 and cfg["bn"] == "update" and cfg["select"] == "accuracy"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_cp"] > 50.0  # gates open: most blocks run (the paper's init closes them)
    paper = tmp_path / "paper"
    args = ["train", "tiny_rnn_gate_14", "--stage", "sp", "--data", data, *COMMON, "--iters", "1", "--lr", "1e-9"]
    assert main([*args, "--paper-gate-init", "--out", str(paper)]) == 0
    assert json.loads((paper / "config.json").read_text())["gate_bias"] is None
    model, _ = load_model(paper / "last.pt")
    assert abs(model.gates.fc.bias.item()) < 1.0  # the module's own initialisation, not the open bias


def _logits(path, x):
    model, _ = load_model(path)
    with torch.no_grad():
        out = model.eval()(x, "greedy")
    return out.logits, out.trace.decisions


@pytest.mark.parametrize("bn", ["frozen", "update"])
def test_hrl_at_a_tiny_lr_leaves_greedy_inference_alone(sp_run, tmp_path, bn) -> None:
    """HRL steps that cannot move the weights (lr 1e-12) must not change what greedy inference computes. With
    the running statistics updated from sampled, routed executions they do (the drift this default prevents)."""
    sp, data = sp_run
    out = tmp_path / bn
    args = ["train", "tiny_rnn_gate_14", "--stage", "hrl", "--data", data, *COMMON, "--iters", "6", "--lr", "1e-12"]
    extra = [] if bn == "frozen" else ["--bn", "update"]  # frozen is the default from --init
    assert main([*args, "--init", str(sp / "best.pt"), *extra, "--alpha", "1", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["bn"] == bn and cfg["select"] == "reward"
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before, d0 = _logits(sp / "best.pt", x)
    after, d1 = _logits(out / "last.pt", x)
    if bn == "frozen":
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        assert torch.equal(d0, d1)
    else:
        assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("stage", "init", "lr", "bn"),
    [
        ("hrl", "sp.pt", None, "frozen"),  # the paper's fine-tuning lr, 1e-4
        ("hrl", "sp.pt", 1e-3, "frozen"),
        ("hrl", "sp.pt", 3e-3, "update"),  # the weights move too: updated statistics measured better
        ("rl", "sp.pt", 1e-4, "frozen"),
        ("hrl", None, None, "update"),  # from scratch nothing is there to keep
        ("sp", "base.pt", 1e-4, "update"),
    ],
)
def test_bn_default_follows_stage_start_and_lr(stage, init, lr, bn) -> None:
    cfg = TrainConfig(arch="cifar10_rnn_gate_38", stage=stage, data="x", out="y", init=init, lr=lr)
    assert resolve_defaults(cfg, "cifar", "cifar10", num_gates=17, steps_per_epoch=352).bn == bn
    explicit = TrainConfig(arch="cifar10_rnn_gate_38", stage=stage, data="x", out="y", init=init, lr=lr, bn="update")
    assert resolve_defaults(explicit, "cifar", "cifar10", num_gates=17, steps_per_epoch=352).bn == "update"


def test_distillation_loss_is_t2_kl() -> None:
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    kd = distillation_loss(s, t, temperature=3.0)
    p_t = torch.softmax(t / 3, 1)
    expected = 9.0 * (p_t * (p_t.log() - torch.log_softmax(s / 3, 1))).sum(1)
    torch.testing.assert_close(kd, expected)
    assert distillation_loss(t, t, 3.0).abs().max() < 1e-6  # matching the teacher costs nothing
    ce = torch.rand(6)
    torch.testing.assert_close(distilled_task_loss(ce, kd, 0.25), 0.75 * ce + 0.25 * kd)


def test_hrl_distills_from_a_teacher(sp_run, tmp_path, capsys) -> None:
    """--distill changes the loss HRL trains on (a KD term is logged) and refuses a teacher of other classes."""
    sp, data = sp_run
    args = ["train", "tiny_rnn_gate_14", "--stage", "hrl", "--data", data, *COMMON, "--iters", "4", "--lr", "0.01"]
    args += ["--init", str(sp / "best.pt"), "--alpha", "1", "--seed", "3"]
    assert main([*args, "--distill", str(sp / "best.pt"), "--out", str(tmp_path / "kd")]) == 0
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    kd_rows = (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()
    row = json.loads(kd_rows[-1])
    assert row["train_kd"] >= 0.0 and json.loads((tmp_path / "kd" / "config.json").read_text())["distill"]
    a, _ = load_model(tmp_path / "kd" / "last.pt")
    b, _ = load_model(tmp_path / "plain" / "last.pt")
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    other = tmp_path / "seven.pt"
    _, ckpt = load_model(sp / "best.pt")
    ckpt["arch"]["num_classes"] = 7
    if "num_classes" in ckpt.get("data", {}):  # a consistent checkpoint of 7 classes, not a malformed one
        ckpt["data"]["num_classes"] = 7
        ckpt["data"]["classes"] = ckpt["data"].get("classes", [])[:7] or None
    ckpt["state_dict"] = create_model("tiny_rnn_gate_14", num_classes=7).state_dict()
    torch.save(ckpt, other)
    capsys.readouterr()
    assert main([*args, "--distill", str(other), "--out", str(tmp_path / "bad")]) == 2
    assert "predicts 7 classes; the data has 10" in capsys.readouterr().err


def test_distillation_trains_the_backbone_but_the_return_keeps_the_ce() -> None:
    """With --distill the supervised term is the distilled loss, while the HRL return (Eq. 6) is computed from the
    cross-entropy alone: the REINFORCE term and the reward are those of the same step without a teacher."""
    from skipnet.gated import GateTrace
    from skipnet.stages import STAGES

    torch.manual_seed(0)
    ce, task = torch.rand(8), torch.rand(8) * 5
    decisions = (torch.rand(8, 4) > 0.5).float()
    log_probs = torch.randn(8, 4)
    trace = GateTrace(probs=torch.rand(8, 4), decisions=decisions, log_probs=log_probs, logits=torch.zeros(8, 4))
    kw = dict(alpha=2.0, beta=1.0, rl_weight=1.0, baseline=None)
    plain, s0 = STAGES["hrl"].loss(ce, trace, **kw)
    distilled, s1 = STAGES["hrl"].loss(ce, trace, **kw, task=task)
    assert torch.equal(s0["rl"], s1["rl"]) and torch.equal(s0["reward"], s1["reward"])
    torch.testing.assert_close(distilled - plain, task.mean() - ce.mean())
