"""The benchmark helpers of :mod:`skipnet.bench` that the export benchmarks share: BatchNorm calibration on given
batches (and ``calibrate_bn``, its random-input user), the gate-bias bisection, real images as pixels, and the record
of the machine."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import skipnet
from skipnet.bench import bisect_gate_bias, calibrate_batchnorm, calibrate_bn, environment, split_pixels
from skipnet.errors import SkipnetError


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bns(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def _batch_statistics(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[list, list]]:
    """Each BatchNorm's per-batch input mean and unbiased variance over train-mode ``all_on`` passes, read by hand
    with hooks on a copy (in train mode a BN normalises with the batch's statistics, so its inputs do not depend on
    its running ones)."""
    twin = copy.deepcopy(model).train()
    seen: dict[str, tuple[list, list]] = {}

    def record(name: str):
        def hook(_module, inputs) -> None:
            x = inputs[0].double()
            means, variances = seen.setdefault(name, ([], []))
            means.append(x.mean(dim=(0, 2, 3)))
            variances.append(x.var(dim=(0, 2, 3), unbiased=True))

        return hook

    for name, bn in _bns(twin).items():
        bn.register_forward_pre_hook(record(name))
    with torch.no_grad():
        for x in batches:
            twin(x, "all_on")
    return seen


@pytest.mark.parametrize("arch", ["tiny_rnn_gate_14", "tiny_feedforward_14"])
def test_calibrate_batchnorm_sets_the_cumulative_average_over_the_batches(arch: str) -> None:
    torch.manual_seed(0)
    model = skipnet.create_model(arch)
    gen = torch.Generator().manual_seed(3)
    # batches of different spreads and offsets: an exponential average (momentum 0.1) would be far from the mean
    batches = [s * torch.randn(6, 3, 32, 32, generator=gen) + o for s, o in ((1.0, 0.0), (3.0, 1.0), (0.5, -2.0))]
    bns = _bns(model)
    for k, bn in enumerate(bns.values()):
        bn.momentum = 0.05 + 0.01 * k  # not the default: each must be restored as it was
        bn.running_mean.fill_(7.0)  # and the old statistics must not count
    momenta = {n: bn.momentum for n, bn in bns.items()}
    expected = _batch_statistics(model, batches)
    assert expected and len(expected) <= len(bns)

    calibrate_batchnorm(model, (x for x in batches))  # any iterable, a generator too

    assert not model.training
    for name, bn in bns.items():
        assert bn.momentum == momenta[name], name
        if name not in expected:  # not visited by all_on (a feed-forward gate's BN): reset, no passes counted
            assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)), name
            assert torch.equal(bn.running_var, torch.ones_like(bn.running_var)), name
            continue
        means, variances = expected[name]
        assert int(bn.num_batches_tracked) == len(batches), name
        torch.testing.assert_close(bn.running_mean.double(), torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), torch.stack(variances).mean(0), rtol=1e-4, atol=1e-5)


def test_calibrate_batchnorm_of_a_static_route_sees_that_route() -> None:
    """With ``keep``, the passes run that route: every block before the first skipped one gets the statistics of
    ``all_on`` passes, the skipped block none (reset), and a later block those of its own, changed, input."""
    torch.manual_seed(0)
    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    full = skipnet.create_model("tiny_rnn_gate_14")
    routed = skipnet.create_model("tiny_rnn_gate_14")
    routed.load_state_dict(full.state_dict())
    skipped = 2
    keep = torch.ones(1, full.num_gates)
    keep[0, skipped] = 0
    calibrate_batchnorm(full, batches)
    calibrate_batchnorm(routed, batches, keep=keep)
    with torch.no_grad():
        (b_full, b_routed) = (m.gated_blocks for m in (full, routed))
        assert torch.equal(b_routed[0].bn1.running_mean, b_full[0].bn1.running_mean)
        assert torch.equal(b_routed[skipped].bn1.running_mean, torch.zeros_like(b_full[skipped].bn1.running_mean))
        assert not torch.allclose(b_routed[skipped + 1].bn1.running_mean, b_full[skipped + 1].bn1.running_mean)
        same = skipnet.create_model("tiny_rnn_gate_14")
        same.load_state_dict(full.state_dict())
        calibrate_batchnorm(same, batches, keep=torch.ones(1, full.num_gates))  # every block: all_on's statistics
        for a, b in zip(_bns(same).values(), _bns(full).values()):
            torch.testing.assert_close(a.running_mean, b.running_mean)


def test_calibrate_batchnorm_leaves_eval_mode_and_momenta_when_a_pass_fails() -> None:
    model = skipnet.create_model("tiny_rnn_gate_14")
    momenta = [bn.momentum for bn in _bns(model).values()]

    def batches():
        yield torch.randn(2, 3, 32, 32)
        raise RuntimeError("a bad batch")

    with pytest.raises(RuntimeError, match="a bad batch"):
        calibrate_batchnorm(model, batches())
    assert not model.training
    assert [bn.momentum for bn in _bns(model).values()] == momenta


@torch.no_grad()
def _old_calibrate_bn(model, image_size: int, batches: int = 4, batch_size: int = 16, seed: int = 0) -> None:
    """``skipnet.bench.calibrate_bn`` as it was before it used ``calibrate_batchnorm`` (with ``random_images``)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    dtype = next(model.parameters()).dtype
    try:
        for b in range(batches):
            gen = torch.Generator().manual_seed(seed + 1000 + b)
            x = torch.randn(batch_size, model.config.in_channels, image_size, image_size, generator=gen)
            model(x.contiguous(memory_format=torch.channels_last).to(dtype), "all_on")
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [("tiny_rnn_gate_14", {}), ("tiny_feedforward_14", {"batches": 3, "batch_size": 5, "seed": 11})],
)
def test_calibrate_bn_gives_the_statistics_it_gave_before(arch: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    old = skipnet.create_model(arch)
    new = copy.deepcopy(old)
    _old_calibrate_bn(old, 32, **kwargs)
    calibrate_bn(new, 32, **kwargs)
    assert not new.training
    before, after = old.state_dict(), new.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert [m.momentum for m in _bns(old).values()] == [m.momentum for m in _bns(new).values()]


@pytest.mark.parametrize(("arch", "keep"), [("tiny_rnn_gate_14", 0.5), ("tiny_aig_gate_14", 0.3)])
def test_bisect_gate_bias_reaches_the_asked_keep_fraction(arch: str, keep: float) -> None:
    torch.manual_seed(0)
    model = skipnet.create_model(arch)
    calibrate_bn(model, 32)
    images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    head = model.gates.heads()[0].weight.clone()

    reached = bisect_gate_bias(model, images, keep)

    assert abs(reached - keep) < 0.01
    assert not model.training
    torch.testing.assert_close(model.gates.heads()[0].weight, 20.0 * head)  # the heads scaled, once
    with torch.no_grad():
        decisions = model(images, "greedy").trace.decisions
    assert reached == float(decisions.mean())  # the fraction the model now executes on those images
    assert float(decisions.float().mean(1).std()) > 0  # decisions vary from image to image
    biases = {float(b) for fc in model.gates.heads() for b in fc.bias.detach()}
    assert len(biases) == 1 and -200.0 < biases.pop() < 200.0  # one shared bias, inside the bracket


def test_bisect_gate_bias_returns_the_fraction_reached_when_the_steps_run_out() -> None:
    torch.manual_seed(0)
    model = skipnet.create_model("tiny_rnn_gate_14")
    calibrate_bn(model, 32)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    reached = bisect_gate_bias(model, images, 0.5, steps=1)  # one step: the bias is 0, wherever that lands
    assert {float(b) for fc in model.gates.heads() for b in fc.bias.detach()} == {0.0}
    with torch.no_grad():
        assert reached == float(model(images, "greedy").trace.decisions.mean())


def test_bisect_gate_bias_refuses_what_it_cannot_do() -> None:
    with pytest.raises(SkipnetError, match="no gates"):
        bisect_gate_bias(skipnet.create_model("tiny_resnet_14"), torch.randn(2, 3, 32, 32), 0.5)
    with pytest.raises(SkipnetError, match=r"keep must be in \[0, 1\]"):
        bisect_gate_bias(skipnet.create_model("tiny_rnn_gate_14"), torch.randn(2, 3, 32, 32), 1.5)


class _Loader:
    """A split's loader: normalised batches, and the ``train`` flag that ``split_pixels`` turns off."""

    def __init__(self, batches: list) -> None:
        self.batches, self.train, self.served = batches, True, 0

    def __iter__(self):
        for b in self.batches:
            self.served += 1
            yield b


def test_split_pixels_undoes_the_normalisation_of_the_first_images() -> None:
    mean, std = (0.5, 0.25, 0.0), (0.2, 0.5, 1.0)
    pixels = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    m, s = (torch.tensor(v).view(1, -1, 1, 1) for v in (mean, std))
    batches = [(((pixels - m) / s)[i : i + 4], None) for i in range(0, 10, 4)]
    loaders = {"test": _Loader(batches)}
    data = SimpleNamespace(mean=mean, std=std, split=lambda name: loaders[name])
    torch.testing.assert_close(split_pixels(data, "test", 6), pixels[:6])
    torch.testing.assert_close(split_pixels(data, "test"), pixels)
    loaders["test"] = _Loader(batches)
    split_pixels(data, "test", 1)
    assert loaders["test"].train is False and loaders["test"].served == 1  # no batch read past the first n images


def test_environment_records_the_packages_asked_for() -> None:
    env = environment("torch")
    assert list(env) == ["date", "torch", "python", "machine", "cpus", "command"]
    assert env["torch"] == torch.__version__


def test_spread_batches_gives_every_class_of_a_sorted_split_its_share() -> None:
    """A split stored class by class (an ImageFolder's order): the first images are one class, the spread ones
    every class alike; batches of the asked size, no more images than asked, all when the split has fewer."""
    from types import SimpleNamespace

    from skipnet.results import spread_batches

    labels = torch.arange(10).repeat_interleave(100)  # 1,000 images, 100 per class, in class order
    images = torch.arange(1000, dtype=torch.float32).view(-1, 1, 1, 1)
    loader = [(images[i : i + 64], labels[i : i + 64]) for i in range(0, 1000, 64)]  # batches across classes
    bundle = SimpleNamespace(info={"val_images": 1000}, split=lambda name: loader)
    picked = spread_batches(bundle, "val", 200, batch_size=30)
    y = torch.cat([b[1] for b in picked])
    assert [len(b[1]) for b in picked] == [30] * 6 + [20]
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10
    x = torch.cat([b[0] for b in picked]).flatten()
    assert torch.equal(labels[x.long()], y)  # each image with its own label
    assert len(torch.cat([b[1] for b in spread_batches(bundle, "val", 5000)])) == 1000
