"""Routed execution (issue 4): same values, gradients and BatchNorm statistics as masking, and the bench CLI.

Routed execution runs each gated block on the samples that execute it only; masked execution runs every block
for every sample and mixes with the 0/1 decision (Eq. 1). They must agree exactly in what they compute.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from skipnet import create_model
from skipnet.bench import calibrate_bn, random_decisions, time_interleaved
from skipnet.blocks import run_block, shortcut_branch
from skipnet.cli import main
from skipnet.errors import SkipnetError
from skipnet.executors import masked_block, put_rows_, route_indices, routed_block, take_rows
from skipnet.gated import GatedResNet
from skipnet.losses import hybrid_returns, reinforce_loss

ARCHS = ["tiny_rnn_gate_14", "tiny_feedforward_14"]


def calibrated(arch: str, dtype: torch.dtype = torch.float32) -> GatedResNet:
    """An untrained model whose BN running statistics keep eval-mode activations O(1)."""
    model = create_model(arch).to(dtype)
    calibrate_bn(model, model.config.image_size, batches=2, batch_size=8)
    return model.eval()


def images(batch: int, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(batch, 3, 32, 32, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def assert_same(a, b, atol: float = 1e-5) -> None:
    assert torch.equal(a.trace.decisions, b.trace.decisions)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=atol)
    torch.testing.assert_close(a.trace.log_probs, b.trace.log_probs, rtol=0, atol=atol)
    torch.testing.assert_close(a.trace.probs, b.trace.probs, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------------ inference


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_routed_equals_masked_forced(arch: str, batch: int, channels_last: bool) -> None:
    model = calibrated(arch)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    x = images(batch, channels_last=channels_last)
    d = random_decisions(batch, model.num_gates, 0.5, seed=3)
    with torch.inference_mode():
        masked = model(x, "greedy", decisions=d, execution="masked")
        routed = model(x, "greedy", decisions=d, execution="routed")
    assert_same(routed, masked)
    assert torch.equal(routed.trace.decisions, d)


@pytest.mark.parametrize("arch", ARCHS)
def test_block_that_nobody_or_everybody_executes(arch: str) -> None:
    model = calibrated(arch)
    x = images(4)
    d = random_decisions(4, model.num_gates, 0.5, seed=1)
    d[:, 0] = 0.0  # no sample executes block 1 ...
    d[:, 1] = 1.0  # ... every sample executes block 2
    d[:, 2] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # a single sample executes block 3 (a batch of one inside)
    with torch.no_grad():
        assert_same(
            model(x, "greedy", decisions=d, execution="routed"), model(x, "greedy", decisions=d, execution="masked")
        )
        for value in (0.0, 1.0):  # a batch where nobody / everybody executes every block
            full = torch.full_like(d, value)
            routed = model(x, "greedy", decisions=full, execution="routed")
            assert_same(routed, model(x, "greedy", decisions=full, execution="masked"))
        # every block on: the plain ResNet
        torch.testing.assert_close(routed.logits, model(x, "all_on").logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_greedy_routed_equals_greedy_masked(arch: str, batch: int) -> None:
    model = calibrated(arch, torch.float64)
    x = images(batch, torch.float64)
    for threshold in (0.3, 0.5, 0.7):
        with torch.no_grad():
            routed = model(x, "greedy", threshold=threshold, execution="routed")
            masked = model(x, "greedy", threshold=threshold, execution="masked")
        assert_same(routed, masked, atol=1e-10)


def test_greedy_routed_batch_one_reads_the_decision_like_the_trace() -> None:
    """At batch 1 routed greedy reads ``p`` on the host; the decision is still exactly ``p >= t`` as torch compares
    it (in p's dtype), also for a threshold between p and the next float."""
    model = calibrated("tiny_rnn_gate_14")
    x = images(1)
    with torch.no_grad():
        p0 = float(model(x, "greedy", execution="masked").trace.probs[0, 0])  # gate 0 sees the same input always
        for t in (p0, math.nextafter(p0, 1.0), math.nextafter(p0, 0.0), 0.7, 0.3):
            routed = model(x, "greedy", threshold=t, execution="routed")
            masked = model(x, "greedy", threshold=t, execution="masked")
            assert_same(routed, masked, atol=0)
            assert torch.equal(routed.trace.decisions, (routed.trace.probs >= t).to(torch.float32))
        # float32(p0 + half an ulp) is p0 itself: executed, whatever the double comparison says
        assert model(x, "greedy", threshold=math.nextafter(p0, 1.0), execution="routed").trace.decisions[0, 0] == 1


def test_sample_and_random_modes_route_like_masking() -> None:
    model = calibrated("tiny_rnn_gate_14", torch.float64)
    x = images(6, torch.float64)
    with torch.no_grad():
        for mode, kw in (("sample", {}), ("random", {"keep": 0.4})):
            torch.manual_seed(11)
            routed = model(x, mode, execution="routed", **kw)
            torch.manual_seed(11)
            masked = model(x, mode, execution="masked", **kw)
            assert_same(routed, masked, atol=1e-10)


def test_routed_block_keeps_input_and_channels_last() -> None:
    model = calibrated("tiny_rnn_gate_14")
    model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        x = model.first_block(model.stem(images(5, channels_last=True)))
    for block in model.gated_blocks[:3]:  # identity shortcuts and (block 3 of tiny-14) a projection
        decision = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
        before = x.clone()
        with torch.inference_mode():
            out = routed_block(block, x, decision)
            expect = torch.where(decision.view(-1, 1, 1, 1) > 0.5, run_block(block, x), shortcut_branch(block, x))
        assert torch.equal(x, before), "routed_block must not modify its input"
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, expect, rtol=0, atol=1e-6)
        # in place (inference, the caller owns x): same values, written into x or into the projection
        with torch.inference_mode():
            inplace = route_indices(block, x.clone(), torch.tensor([0, 2]), inplace=True)
        torch.testing.assert_close(inplace, expect, rtol=0, atol=1e-6)
        assert inplace.is_contiguous(memory_format=torch.channels_last)
        x = out


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(7, 3, 5, 5), (7, 16, 32, 32)])  # 300 B and 64 KiB per sample
def test_take_rows_and_put_rows_equal_indexing(shape: tuple[int, ...], channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape).contiguous(memory_format=fmt)
    for rows in ([0, 1, 2, 4, 6], [3], [1, 2], [0, 1, 2, 3, 4, 5, 6]):
        idx = torch.tensor(rows)
        taken = take_rows(x, idx)
        assert torch.equal(taken, x[idx]) and taken.is_contiguous(memory_format=fmt)
        src = torch.randn(taken.shape).contiguous(memory_format=fmt)
        put = put_rows_(x.clone(), idx, src)
        assert torch.equal(put, x.clone().index_copy_(0, idx, src)) and put.is_contiguous(memory_format=fmt)
    assert torch.equal(take_rows(x[:, :, ::2], torch.tensor([1, 3])), x[:, :, ::2][[1, 3]])  # not dense: indexing


def test_routed_block_with_large_samples_equals_masking() -> None:
    """CIFAR stage-1 samples (64 KiB) take the slice-copy write-back; values and gradients still match."""
    model = create_model("cifar10_rnn_gate_38").double().eval()  # eval BN: no batch statistics of the subset
    block = model.gated_blocks[0]
    x = torch.randn(6, 16, 32, 32, dtype=torch.float64).requires_grad_()
    d = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    routed = route_indices(block, x, torch.nonzero(d).flatten())
    masked = masked_block(block, x, d)
    torch.testing.assert_close(routed, masked, rtol=0, atol=1e-12)
    up = torch.randn_like(routed)
    (g_routed,) = torch.autograd.grad(routed, x, up)
    (g_masked,) = torch.autograd.grad(masked, x, up)
    torch.testing.assert_close(g_routed, g_masked, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        inplace = route_indices(block, x.detach().clone(), torch.nonzero(d).flatten(), inplace=True)
    torch.testing.assert_close(inplace, masked.detach(), rtol=0, atol=1e-12)


def test_forward_in_inference_mode_leaves_caller_input_alone() -> None:
    model = calibrated("tiny_rnn_gate_14")
    x = images(4)
    before = x.clone()
    d = random_decisions(4, model.num_gates, 0.5, seed=2)
    with torch.inference_mode():
        a = model(x, "greedy", decisions=d).logits
        b = model(x, "greedy", decisions=d).logits
    assert torch.equal(x, before)
    assert torch.equal(a, b)


def test_forced_decisions_shape_is_checked() -> None:
    model = calibrated("tiny_rnn_gate_14")
    with pytest.raises(SkipnetError):
        model(images(2), "greedy", decisions=torch.ones(2, model.num_gates + 1))


# ------------------------------------------------------------------------------------------------- gradients


def hrl_loss(out, y: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(out.logits, y, reduction="none")
    returns = hybrid_returns(ce, out.trace.decisions, alpha=0.1)
    return ce.mean() + reinforce_loss(out.trace.log_probs, returns)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch", [1, 3, 6])
def test_hrl_gradients_routed_equal_masked(arch: str, batch: int) -> None:
    """Sample (HRL) mode with forced decisions: every parameter gets the same gradient routed or masked.

    Eval-mode BN (so that batch statistics do not differ between the subset and the full batch), float64.
    A block no sample executes gets no gradient when routed and an exactly-zero one when masked.
    """
    model = calibrated(arch, torch.float64)
    x = images(batch, torch.float64)
    y = torch.randint(0, 10, (batch,))
    d = random_decisions(batch, model.num_gates, 0.5, seed=5)
    if batch > 1:
        d[:, 0] = 0.0
        d[0, 1], d[1, 1] = 1.0, 0.0
    grads = {}
    for execution in ("routed", "masked"):
        net = copy.deepcopy(model)
        out = net(x, "sample", decisions=d, execution=execution)
        hrl_loss(out, y).backward()
        grads[execution] = {
            n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in net.named_parameters()
        }
    for name, g in grads["masked"].items():
        torch.testing.assert_close(grads["routed"][name], g, rtol=1e-9, atol=1e-12, msg=name)
    gate_grads = [g for n, g in grads["routed"].items() if n.startswith("gates.")]
    assert any(g.abs().sum() > 0 for g in gate_grads), "the REINFORCE term must reach the gates"


def test_routed_training_step_runs_and_skipped_blocks_get_no_gradient() -> None:
    model = create_model("tiny_rnn_gate_14").train()
    x, y = images(4), torch.randint(0, 10, (4,))
    d = torch.ones(4, model.num_gates)
    d[:, 2] = 0.0
    out = model(x, "sample", decisions=d)  # auto -> routed
    hrl_loss(out, y).backward()
    skipped = model.gated_blocks[2]
    assert all(p.grad is None for p in skipped.conv1.parameters())
    assert model.gated_blocks[1].conv1.weight.grad is not None


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_mix_gradient_equals_eq1_by_autograd(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-written backward of the masked mix (STE in hard mode, p in soft mode) is Eq. 1's gradient."""
    import skipnet.executors as executors

    model = create_model("tiny_rnn_gate_14").to(torch.float64).train()
    model.to(memory_format=torch.channels_last)
    x = images(5, torch.float64, channels_last=True)
    y = torch.randint(0, 10, (5,))

    def grads(net: GatedResNet) -> dict[str, torch.Tensor]:
        out = net(x, mode, execution="masked")
        (F.cross_entropy(out.logits, y) + out.trace.probs.sum()).backward()
        return {n: p.grad for n, p in net.named_parameters() if p.grad is not None}

    ours = grads(copy.deepcopy(model))

    def eq1(g: torch.Tensor, residual: torch.Tensor, shortcut: torch.Tensor, *_: object) -> torch.Tensor:
        g = g.view(-1, 1, 1, 1)
        return g * F.relu(residual + shortcut) + (1.0 - g) * shortcut

    monkeypatch.setattr(executors, "_masked_tail", eq1)
    ref = grads(copy.deepcopy(model))
    assert ours.keys() == ref.keys()
    for name, g in ref.items():
        torch.testing.assert_close(ours[name], g, rtol=1e-8, atol=1e-12, msg=name)


def test_backward_keeps_channels_last() -> None:
    """Routing, the mix and the head hand channels_last gradients back (the built-in backwards do not)."""
    model = create_model("tiny_rnn_gate_14").train()
    model.to(memory_format=torch.channels_last)
    block = model.gated_blocks[0]
    x = torch.randn(4, 8, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    upstream = torch.randn(4, 8, 32, 32).contiguous(memory_format=torch.channels_last)
    cl = torch.channels_last
    out = route_indices(block, x, torch.tensor([0, 2]))
    out.backward(upstream)
    assert x.grad.is_contiguous(memory_format=cl)
    x.grad = None
    g = torch.rand(4, requires_grad=True)
    gated_out = masked_block(block, x, g)
    gated_out.backward(upstream)
    assert x.grad.is_contiguous(memory_format=cl) and g.grad is not None
    x.grad = None
    h = torch.randn(4, 32, 8, 8).contiguous(memory_format=cl).requires_grad_()
    model.head(h).sum().backward()
    assert h.grad.is_contiguous(memory_format=cl)


# ------------------------------------------------------------------------------------------------ BatchNorm


def test_routed_bn_statistics_come_from_executed_samples_only() -> None:
    model = create_model("tiny_rnn_gate_14")
    model.train()
    x = images(6)
    subset = torch.tensor([1, 4])
    d = torch.ones(6, model.num_gates)
    d[:, 0] = 0.0
    d[subset, 0] = 1.0  # gated block 1 runs on samples 1 and 4 only
    d[:, 1] = 0.0  # gated block 2 runs on nobody
    ref = copy.deepcopy(model)
    block, unused = model.gated_blocks[0], model.gated_blocks[1]
    count_before = int(unused.bn1.num_batches_tracked)
    mean_before = unused.bn1.running_mean.clone()

    with torch.no_grad():
        model(x, "sample", decisions=d, execution="routed")
        # the input of gated block 1 is the first block's output on the whole batch
        h = ref.first_block(ref.stem(x))
        pre_bn = ref.gated_blocks[0].conv1(h[subset])
        pre_bn_all = ref.gated_blocks[0].conv1(h)
    m = block.bn1.momentum
    expect_mean = m * pre_bn.mean(dim=(0, 2, 3))
    expect_var = (1 - m) * torch.ones_like(expect_mean) + m * pre_bn.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(block.bn1.running_mean, expect_mean, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(block.bn1.running_var, expect_var, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(block.bn1.running_mean, m * pre_bn_all.mean(dim=(0, 2, 3)), atol=1e-6)
    # a block nobody executed saw no batch at all
    assert int(unused.bn1.num_batches_tracked) == count_before
    assert torch.equal(unused.bn1.running_mean, mean_before)


def test_masked_bn_statistics_include_skipped_samples() -> None:
    """The authors' fault (reference notes §5) that routing fixes: masking feeds skipped samples to BN."""
    model = create_model("tiny_rnn_gate_14").train()
    x = images(6)
    d = torch.zeros(6, model.num_gates)
    d[1, 0] = 1.0
    ref = copy.deepcopy(model)
    with torch.no_grad():
        model(x, "sample", decisions=d, execution="masked")
        h = ref.first_block(ref.stem(x))
        all_mean = ref.gated_blocks[0].bn1.momentum * ref.gated_blocks[0].conv1(h).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.gated_blocks[0].bn1.running_mean, all_mean, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bench


def test_time_interleaved_rotates_and_counts() -> None:
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    cpu: dict[str, list[float]] = {}
    times = time_interleaved(fns, repeats=3, warmup=1, cpu=cpu)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert {k: len(v) for k, v in cpu.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls[:6] == ["a", "b", "c", "b", "c", "a"]


def test_bench_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "tiny_rnn_gate_14", "--keep", "0.5", "--batch-size", "4", "--repeats", "2", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    for key in (
        "batch_size",
        "keep",
        "latency_ms_plain",
        "latency_ms_masked",
        "latency_ms_routed",
        "speedup",
        "ideal_speedup",
        "efficiency",
        "max_abs_diff",
    ):
        assert key in res, key
    assert res["batch_size"] == 4
    assert 0.0 <= res["keep"] <= 1.0
    assert res["max_abs_diff"] <= 1e-4
    assert res["decisions_match"]
    assert res["ideal_speedup"] > 1.0
    assert res["efficiency"] == pytest.approx(res["speedup"] / res["ideal_speedup"])
    assert res["speedup"] == pytest.approx(res["latency_ms_plain"] / res["latency_ms_routed"])


def test_bench_cli_table_and_threads(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        rc = main(
            ["bench", "tiny_resnet_14", "--keep", "0.25", "--batch-size", "3", "--repeats", "1", "--threads", "1"]
        )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    for word in ("plain", "masked", "routed", "ideal speedup", "CPU ms"):
        assert word in out


def test_bench_cli_checkpoint_uses_learned_gates(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from skipnet.checkpoint import save_checkpoint

    model = calibrated("tiny_rnn_gate_14")
    model.threshold = 0.4
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    assert main(["bench", str(path), "--batch-size", "3", "--repeats", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["source"] == "checkpoint"
    assert res["keep_requested"] is None
    assert res["threshold"] == pytest.approx(0.4)
    assert res["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "no_such_arch"],
        ["bench", "tiny_rnn_gate_14", "--keep", "1.5"],
        ["bench", "tiny_rnn_gate_14", "--batch-size", "0"],
        ["bench", "tiny_rnn_gate_14", "--repeats", "0"],
        ["bench", "missing.pt"],
        ["bench", "tiny_rnn_gate_14", "--device", "bogus"],
        *([] if torch.cuda.is_available() else [["bench", "tiny_rnn_gate_14", "--device", "cuda"]]),
    ],
)
def test_bench_cli_user_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.slow  # reads the CIFAR archive; no fast path of its own (not rerun at the lesser ISAs)
def test_bench_cli_data_times_real_images(tmp_path, cifar_mini, capsys: pytest.CaptureFixture[str]) -> None:
    """``--data``: the learned gates decide on real test images (as the checkpoint saw them), not on noise."""
    from skipnet.checkpoint import save_checkpoint
    from skipnet.commands.bench import real_images

    model = calibrated("tiny_rnn_gate_14")
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    argv = ["bench", str(path), "--batch-size", "5", "--repeats", "1", "--threads", "1", "--json"]
    assert main([*argv, "--data", cifar_mini]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["inputs"].endswith("(seeded sample)") and res["image_size"] == 32  # the command's account
    x = real_images(str(path), model, cifar_mini, None, 5)
    assert x.shape == (5, 3, 32, 32) and x.std() > 0.1
    # the sample --limit draws, spread over the classes (the first five test images are all of one class)
    from skipnet.checkpoint import load_checkpoint
    from skipnet.evaluate import data_for_checkpoint

    ckpt = load_checkpoint(path)
    xs, ys = next(iter(data_for_checkpoint(ckpt, model, cifar_mini, batch_size=5, limit=5).test))
    assert torch.equal(x, xs) and len(set(ys.tolist())) > 1, ys
    first = data_for_checkpoint(ckpt, model, cifar_mini, batch_size=5).test
    assert len(set(next(iter(first))[1].tolist())) == 1
    with torch.no_grad():
        expected = model.eval()(x, "greedy").trace.decisions.float().mean().item()
    assert res["keep"] == pytest.approx(expected)
    assert main(argv) == 0  # without --data: random inputs
    assert json.loads(capsys.readouterr().out)["inputs"] == "random N(0, 1)"
    assert main(["bench", "tiny_rnn_gate_14", "--data", "digits"]) == 2
    assert main([*argv, "--data", "digits"]) == 2  # 1-channel 8x8 digits for a 3-channel network
    assert "channel" in capsys.readouterr().err
