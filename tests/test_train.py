"""Training pipeline: the REINFORCE estimator (Eq. 5-6), every stage from the CLI on real images,
checkpoints, resume, and the effect of alpha."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from skipnet.checkpoint import load_checkpoint, load_model
from skipnet.cli import main
from skipnet.losses import Baseline, SkipBudget, hybrid_returns, reinforce_loss
from skipnet.registry import create_model

COMMON = ["--limit-train", "256", "--limit-test", "128", "--batch-size", "32", "--threads", "1", "--val-split", "0.2"]


# ------------------------------------------------------------------------------------------- Eq. 5-6
def test_hybrid_returns_by_hand() -> None:
    ce = torch.tensor([0.5, 2.0])
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    alpha, beta, n = 0.3, 1.0, 3
    r = hybrid_returns(ce, d, alpha, beta)
    # sample 0 skips gates 2 and 3: future skip counts 2, 2, 1; sample 1 skips gate 1 only: 1, 0, 0
    expected = torch.tensor(
        [[-(0.5 - alpha / n * 2), -(0.5 - alpha / n * 2), -(0.5 - alpha / n * 1)], [-(2.0 - alpha / n), -2.0, -2.0]]
    )
    assert r.shape == (2, 3)
    torch.testing.assert_close(r, expected)
    # beta scales only the loss part
    r2 = hybrid_returns(ce, d, alpha, beta=0.1)
    torch.testing.assert_close(r2 - r, 0.9 * ce.view(-1, 1).expand(2, 3))


def test_skip_target_caps_the_reward_to_go() -> None:
    """--skip-target s: gate j earns the increment of min(running skip count, sN); its return sums those from j on."""
    torch.manual_seed(0)
    ce = torch.rand(64) * 2
    d = torch.bernoulli(torch.full((64, 6), 0.4))
    alpha, n = 0.9, 6
    for s in (0.2, 0.5, 0.55):
        got = hybrid_returns(ce, d, alpha, skip_target=s)
        for b in range(64):  # by hand, step by step
            count, earned = 0.0, []
            for j in range(n):
                new = count + (1 - d[b, j].item())
                earned.append(min(new, s * n) - min(count, s * n))
                count = new
            for i in range(n):
                expect = -(ce[b].item() - alpha / n * sum(earned[i:]))
                assert got[b, i].item() == pytest.approx(expect, abs=1e-6)
    torch.testing.assert_close(hybrid_returns(ce, d, alpha, skip_target=1.0), hybrid_returns(ce, d, alpha))
    # a sample above the target gains nothing from skipping one more block at the end
    over = torch.tensor([[0.0, 0.0, 0.0, 1.0]]), torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    r = [hybrid_returns(torch.zeros(1), g, 1.0, skip_target=0.5) for g in over]
    torch.testing.assert_close(r[0], r[1])


def test_skip_reward_correct_pays_right_predictions_only() -> None:
    """--skip-reward correct: a right sample's returns are Eq. 6's; a wrong one's are its loss alone."""
    torch.manual_seed(1)
    ce, d = torch.rand(32) * 2, torch.bernoulli(torch.full((32, 5), 0.5))
    right = torch.rand(32) > 0.5
    for cap in (None, 0.4):
        paper = hybrid_returns(ce, d, 1.3, 0.8, skip_target=cap)
        got = hybrid_returns(ce, d, 1.3, 0.8, skip_target=cap, correct=right)
        torch.testing.assert_close(got[right], paper[right])
        torch.testing.assert_close(got[~right], (-0.8 * ce[~right]).view(-1, 1).expand(-1, 5))
    assert not torch.equal(got, paper)  # some wrong sample skipped something


def test_skip_reward_correct_reaches_the_loss(runs, monkeypatch, tmp_path) -> None:
    """The trainer passes each sample's correctness (argmax == label) into the return, only when asked."""
    import skipnet.stages

    seen, real = [], skipnet.stages.hybrid_returns

    def spy(ce, decisions, alpha, beta, skip_target, correct):
        seen.append(correct)
        return real(ce, decisions, alpha, beta, skip_target, correct)

    monkeypatch.setattr(skipnet.stages, "hybrid_returns", spy)
    root, data = runs
    hrl = ["train", "tiny_rnn_gate_14", "--stage", "hrl", "--data", data, *COMMON, "--iters", "2"]
    hrl += ["--init", str(root / "sp" / "best.pt")]
    assert main([*hrl, "--skip-reward", "correct", "--out", str(tmp_path / "c")]) == 0
    assert seen and all(c is not None and c.dtype == torch.bool and c.shape == (32,) for c in seen)
    assert not all(bool(c.all()) for c in seen)  # a 2-step model gets some wrong: the mask is not all ones
    seen.clear()
    assert main([*hrl, "--out", str(tmp_path / "a")]) == 0
    assert seen and all(c is None for c in seen)


def test_skip_budget_is_dual_ascent_on_alpha() -> None:
    """--skip-budget S: alpha <- max(0, alpha + eta (S - skipped)); rises while the policy skips too little, falls
    while it skips too much, never below 0, and stays where the budget is met."""
    b = SkipBudget(0.4, alpha=1.0, lr=0.5)
    assert b.update(0.2) == pytest.approx(1.1)  # skipped 20% of a 40% budget: skipping pays more
    assert b.update(0.8) == pytest.approx(0.9)
    assert b.update(0.4) == pytest.approx(0.9)  # the budget met: the multiplier stays
    assert SkipBudget(0.3, alpha=0.1, lr=1.0).update(1.0) == 0.0  # floored at 0
    again = SkipBudget(0.4, alpha=5.0, lr=0.5)
    again.load_state_dict(b.state_dict())
    assert again.alpha == b.alpha
    with pytest.raises(ValueError):
        SkipBudget(1.0, alpha=1.0, lr=0.1)


def test_reinforce_gradient_is_per_sample_per_gate() -> None:
    """d/dz of the surrogate equals -(g - sigmoid(z)) * r / B for every (sample, gate): no (B, B) broadcast."""
    torch.manual_seed(1)
    b, n = 5, 4
    z = torch.randn(b, n, requires_grad=True)
    g = torch.bernoulli(torch.full((b, n), 0.5))
    ce = torch.rand(b) * 3  # known per-sample losses
    log_pi = g * F.logsigmoid(z) + (1 - g) * F.logsigmoid(-z)
    returns = hybrid_returns(ce, g, alpha=0.7, beta=1.0)
    reinforce_loss(log_pi, returns).backward()
    expected = -(g - torch.sigmoid(z.detach())) * returns / b
    torch.testing.assert_close(z.grad, expected)
    # each sample's gradient depends on its own return only: changing sample 0's loss changes row 0 only
    z.grad = None
    ce2 = ce.clone()
    ce2[0] += 10.0
    log_pi = g * F.logsigmoid(z) + (1 - g) * F.logsigmoid(-z)
    reinforce_loss(log_pi, hybrid_returns(ce2, g, alpha=0.7)).backward()
    diff = (z.grad - expected).abs().sum(1)
    assert diff[0] > 1e-3 and torch.all(diff[1:] < 1e-6)


def test_reinforce_rejects_broadcasting_shapes() -> None:
    with pytest.raises(ValueError):
        reinforce_loss(torch.zeros(4), torch.zeros(4, 1))
    with pytest.raises(ValueError):
        hybrid_returns(torch.zeros(4, 1), torch.zeros(4, 3), 0.1)


def test_baselines() -> None:
    r = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert Baseline("none")(r) is None
    torch.testing.assert_close(Baseline("batch")(r), torch.tensor([2.0, 3.0]))
    ema = Baseline("ema", momentum=0.5)
    torch.testing.assert_close(ema(r), torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(ema(r + 2), torch.tensor([2.0, 3.0]))  # previous value is used, then updated
    torch.testing.assert_close(ema.value, torch.tensor([3.0, 4.0]))


def test_hrl_gate_gradient_comes_from_reinforce_only() -> None:
    """In sample mode the gates get no cross-entropy gradient (decisions are sampled, not relaxed)."""
    model = create_model("tiny_rnn_gate_14").train()
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    out = model(x, "sample")
    F.cross_entropy(out.logits, y).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.gates.parameters())


# ------------------------------------------------------------------------------------------- CLI runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_mini):
    root = tmp_path_factory.mktemp("runs")
    data = ["--data", cifar_mini]
    assert (
        main(
            [
                "train",
                "tiny_resnet_14",
                "--stage",
                "base",
                *data,
                *COMMON,
                "--iters",
                "8",
                "--lr",
                "0.05",
                "--eval-every",
                "4",
                "--out",
                str(root / "base"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "tiny_rnn_gate_14",
                "--stage",
                "sp",
                *data,
                *COMMON,
                "--iters",
                "6",
                "--init",
                str(root / "base" / "best.pt"),
                "--out",
                str(root / "sp"),
            ]
        )
        == 0
    )
    return root, cifar_mini


@pytest.mark.parametrize("stage", ["hrl", "soft", "rl", "sdv", "hrl_scratch"])
def test_stage_trains_from_cli(runs, stage) -> None:
    root, data = runs
    arch = "tiny_resnet_14" if stage == "sdv" else "tiny_rnn_gate_14"
    extra = ["--init", str(root / "sp" / "best.pt")] if stage == "hrl" else []
    name = "hrl" if stage == "hrl_scratch" else stage
    out = root / stage
    assert (
        main(["train", arch, "--stage", name, "--data", data, *COMMON, "--iters", "4", *extra, "--out", str(out)]) == 0
    )
    for f in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (out / f).is_file(), f
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and "val_accuracy" in rows[-1] and "train_loss" in rows[-1]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["format_version"] == 1 and ckpt["train_config"]["stage"] == name
    if stage == "hrl":
        assert ckpt["train_config"]["lr"] == 1e-4 and ckpt["train_config"]["alpha"] == 0.1  # paper defaults
        assert "train_reward" in rows[-1]
    if stage == "sdv":
        model, _ = load_model(out / "best.pt")
        assert model.mode.value == "random" and model.keep_ratio == 0.5


def test_init_options_reach_the_trained_model(runs, tmp_path, caplog) -> None:
    """--gate-bias opens the gates of an SP run from scratch; --zero-init-residual starts the branches at zero
    (one step at a tiny lr barely moves either); with a gated --init, whose tensors would replace both, they are
    refused."""
    root, data = runs
    args = ["train", "tiny_rnn_gate_14", "--stage", "sp", "--data", data, *COMMON, "--iters", "1", "--lr", "1e-6"]
    out = tmp_path / "open"
    assert main([*args, "--gate-bias", "6", "--zero-init-residual", "--out", str(out)]) == 0
    model, _ = load_model(out / "last.pt")
    assert model.gates.fc.bias.item() == pytest.approx(6.0, abs=1e-3)
    assert all(b.bn2.weight.abs().max().item() < 1e-3 for b in model._blocks)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["val_cp"] == 100.0  # p ~ 0.998
    assert "--zero-init-residual with gates that may start closed" not in caplog.text
    out = tmp_path / "closed"
    assert main([*args, "--zero-init-residual", "--paper-gate-init", "--out", str(out)]) == 0
    assert "--zero-init-residual with gates that may start closed" in caplog.text  # the SP deadlock warning
    out = tmp_path / "init"  # the checkpoint's tensors would replace both: refused, not ignored
    assert main([*args, "--zero-init-residual", "--init", str(root / "sp" / "best.pt"), "--out", str(out)]) == 2
    assert main([*args, "--gate-bias", "6", "--init", str(root / "sp" / "best.pt"), "--out", str(out)]) == 2
    assert not out.exists()


def test_eval_json_keys(runs, capsys) -> None:
    root, data = runs
    assert main(["eval", str(root / "sp" / "best.pt"), "--data", data, "--limit", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "accuracy",
        "images",
        "macs_mean",
        "macs_all_on",
        "macs_reduction",
        "computation_percentage",
        "skip_ratio_per_block",
        "gate_macs_mean",
    ):
        assert key in out
    assert out["images"] == 64 and len(out["skip_ratio_per_block"]) == 5
    assert 0 <= out["macs_reduction"] < 100 and out["macs_mean"] <= out["macs_all_on"] + out["gate_macs_mean"]
    # threshold 0 executes everything: computation percentage 100
    assert (
        main(["eval", str(root / "sp" / "best.pt"), "--data", data, "--limit", "64", "--json", "--threshold", "0"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["computation_percentage"] == 100.0


def test_sp_from_base_copies_backbone(runs) -> None:
    root, _ = runs
    base = load_checkpoint(root / "base" / "best.pt")
    sp_model = create_model("tiny_rnn_gate_14")
    from skipnet.checkpoint import load_weights_into

    left = load_weights_into(sp_model, base)
    assert left and all(k.startswith("gates.") for k in left)
    torch.testing.assert_close(
        sp_model.state_dict()["backbone.conv1.weight"], base["state_dict"]["backbone.conv1.weight"]
    )


@pytest.mark.parametrize("budget", [[], ["--skip-budget", "0.5", "--alpha", "1", "--alpha-lr", "0.5"]])
def test_resume_equals_uninterrupted(tmp_path, cifar_mini, budget) -> None:
    """Bit-identical weights after a resume; with --skip-budget its alpha (moved every step) resumes too."""
    args = [
        "train",
        "tiny_rnn_gate_14",
        "--stage",
        "hrl",
        "--data",
        cifar_mini,
        *COMMON,
        "--lr",
        "0.01",
        "--schedule",
        "constant",
        "--eval-every",
        "2",
        *budget,
    ]
    assert main([*args, "--iters", "4", "--out", str(tmp_path / "straight")]) == 0
    assert main([*args, "--iters", "2", "--out", str(tmp_path / "split")]) == 0
    assert main([*args, "--iters", "4", "--out", str(tmp_path / "split"), "--resume"]) == 0
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "split" / "last.pt")["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)
    if budget:
        alphas = [json.loads(r)["train_alpha"] for r in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
        assert len(set(alphas)) == 2 and load_checkpoint(tmp_path / "split" / "last.pt")["skip_budget"]["alpha"] != 1
    # a resumed run may be extended and given another thread count, which its checkpoint then records
    assert main([*args, "--iters", "5", "--threads", "2", "--out", str(tmp_path / "split"), "--resume"]) == 0
    extended = load_checkpoint(tmp_path / "split" / "last.pt")
    assert extended["step"] == 5 and extended["train_config"]["threads"] == 2


def test_user_errors_exit_2(tmp_path, runs, capsys) -> None:
    root, data = runs
    assert (
        main(
            [
                "train",
                "tiny_rnn_gate_14",
                "--stage",
                "sp",
                "--data",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "train",
                "tiny_rnn_gate_14",
                "--stage",
                "sp",
                "--data",
                data,
                *COMMON,
                "--iters",
                "1",
                "--init",
                str(root / "base" / "nope.pt"),
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "train",
                "cifar10_rnn_gate_38",
                "--stage",
                "sp",
                "--data",
                data,
                *COMMON,
                "--iters",
                "1",
                "--init",
                str(root / "base" / "best.pt"),
                "--out",
                str(tmp_path / "z"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "train",
                "tiny_resnet_14",
                "--stage",
                "hrl",
                "--data",
                data,
                *COMMON,
                "--iters",
                "1",
                "--out",
                str(tmp_path / "w"),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "train",
                "tiny_rnn_gate_14",
                "--stage",
                "sp",
                "--data",
                data,
                *COMMON,
                "--iters",
                "1",
                "--out",
                str(root / "sp"),
            ]
        )
        == 2
    )  # an existing run without --resume
    assert main(["eval", str(tmp_path / "missing.pt"), "--data", data]) == 2
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    assert main(["eval", str(tmp_path / "junk.pt"), "--data", data]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 7


def test_large_alpha_skips_more(runs) -> None:
    """From the same SP start, HRL with a large alpha executes clearly fewer blocks than alpha = 0."""
    root, data = runs
    ratios = {}
    for alpha in (0.0, 5.0):
        out = root / f"alpha_{alpha}"
        assert (
            main(
                [
                    "train",
                    "tiny_rnn_gate_14",
                    "--stage",
                    "hrl",
                    "--data",
                    data,
                    *COMMON,
                    "--iters",
                    "24",
                    "--lr",
                    "0.05",
                    "--alpha",
                    str(alpha),
                    "--baseline",
                    "ema",
                    "--init",
                    str(root / "sp" / "best.pt"),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        ratios[alpha] = rows[-1]["train_exec"]
    assert ratios[5.0] < ratios[0.0] - 0.2, ratios


def test_checkpoint_written_atomically(tmp_path) -> None:
    from skipnet.checkpoint import save_checkpoint

    model = create_model("tiny_rnn_gate_14")
    save_checkpoint(tmp_path / "a.pt", model, step=3)
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left behind
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["arch"]["name"] == "tiny_rnn_gate_14"
    Path(tmp_path / "a.pt").unlink()
