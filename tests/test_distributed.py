"""Data-parallel training under ``torchrun`` (gloo on CPU): sharded runs stay in sync and match one process.

The multi-process checks run ``torchrun --standalone --nproc_per_node=2`` in a subprocess with a timeout, so a
hang (a collective that one rank never joins) fails the test instead of blocking CI. The numeric checks
live in ``tests/dist_worker.py``.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import CIFAR_TAR, torchrun
from skipnet import SkipnetError, create_model
from skipnet.distributed import (
    DistContext,
    GlobalBaseline,
    check_amp,
    find_unused_parameters,
    pick_device,
    setup,
    torchrun_env,
    unsharded,
)
from skipnet.losses import Baseline
from skipnet.stages import STAGES
from skipnet.train import TrainConfig, Trainer

TESTS = Path(__file__).resolve().parent
BUNDLED = CIFAR_TAR  # the test data beside the repository (a missing file fails the tests that read it)
WORKER = TESTS / "dist_worker.py"


def cifar_subset(dest: Path, train_per_class: int, test_per_class: int) -> Path:
    """An ImageFolder (train/, test/) with the first images of each class of the bundled CIFAR-10 JPEGs."""
    quota = {"train": train_per_class, "test": test_per_class}
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(BUNDLED) as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10-jpeg/<split>/<class>/<file>.jpg
            if not member.isfile() or len(parts) != 4 or parts[1] not in quota:
                continue
            key = (parts[1], parts[2])
            if taken.get(key, 0) >= quota[parts[1]]:
                if len(taken) == 20 and all(taken[k] >= quota[k[0]] for k in taken):
                    break
                continue
            taken[key] = taken.get(key, 0) + 1
            out = dest / parts[1] / parts[2] / parts[3]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
    return dest


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory, cifar_jpeg: str) -> Path:
    return cifar_subset(tmp_path_factory.mktemp("cifar") / "cifar10-sub", 30, 8)


def json_objects(text: str) -> list[dict]:
    """The JSON objects found in ``text`` (each starting with ``{"``)."""
    decoder, out, i = json.JSONDecoder(), [], text.find('{"')
    while i >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            end = i + 1
        else:
            out.append(obj)
        i = text.find('{"', end)
    return out


def _sp_args(data: Path, out: Path) -> list[str]:
    return [
        "tiny_rnn_gate_14",
        "--stage",
        "sp",
        "--data",
        str(data),
        "--limit-train",
        "256",
        "--limit-test",
        "64",
        "--iters",
        "4",
        "--eval-every",
        "2",
        "--batch-size",
        "32",
        "--schedule",
        "constant",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


# --------------------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_torchrun_cli_trains_sp_then_routed_hrl_in_sync(cifar_dir: Path, tmp_path: Path) -> None:
    """``torchrun -m skipnet train``: rank-0-only files, full-split evaluation, identical weights on every rank."""
    sp = tmp_path / "sp"
    proc = torchrun(["-m", "skipnet", "train", *_sp_args(cifar_dir, sp), "--json"], tmp_path)
    summaries = json_objects(proc.stdout)
    assert len(summaries) == 1  # rank 0 alone prints the summary
    summary = summaries[0]
    assert summary["steps"] == 4
    assert summary["test"]["images"] == 64  # rank 0 evaluates the whole test split, not its shard
    assert {"last.pt", "best.pt", "summary.json", "config.json", "metrics.jsonl"} <= {p.name for p in sp.iterdir()}
    rows = [json.loads(line) for line in (sp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # one line per evaluation: only rank 0 writes
    config = json.loads((sp / "config.json").read_text())
    assert config["batch_size"] == 32  # the global batch, 16 per rank

    # SP and routed HRL (from the SP checkpoint) again, inside the worker: after each run the parameters of
    # the two ranks are compared exactly.
    runs = [
        _sp_args(cifar_dir, tmp_path / "sp2"),
        [
            *_sp_args(cifar_dir, tmp_path / "hrl")[:2],
            "hrl",
            *_sp_args(cifar_dir, tmp_path / "hrl")[3:],
            "--init",
            str(sp / "best.pt"),
            "--baseline",
            "ema",
            "--lr",
            "0.01",
        ],
    ]
    report_path = tmp_path / "train_report.json"
    torchrun([str(WORKER), "train", str(report_path), json.dumps(runs)], tmp_path)
    report = json.loads(report_path.read_text())
    assert [r["world"] for r in report] == [2, 2]
    for r in report:
        assert r["ddp"] == "DistributedDataParallel"
        assert r["steps"] == [4, 4]
        assert r["spread"] == 0.0, r  # every rank holds identical weights
        assert r["test_images"] == 64
    assert report[0]["find_unused"] is False  # SP: masked, every parameter used
    assert report[1]["find_unused"] is True  # HRL: routed, idle blocks on a rank
    hrl = torch.load(tmp_path / "hrl" / "last.pt", weights_only=True)
    assert hrl["train_config"]["stage"] == "hrl" and hrl["step"] == 4
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in hrl["state_dict"])


@pytest.mark.slow
def test_two_processes_match_one_process_and_routing_does_not_hang(tmp_path: Path) -> None:
    """2 processes x batch b == 1 process x batch 2b (loss and gradient), SP and HRL; no hang on idle blocks."""
    report_path = tmp_path / "kinv.json"
    torchrun([str(WORKER), "kinv", str(report_path)], tmp_path)
    report = json.loads(report_path.read_text())
    assert report["world"] == 2
    for key in ("sp/none/none", "hrl/none/sampled", "hrl/batch/sampled", "hrl/ema/forced"):
        r = report[key]
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-10, abs=1e-12), key
        assert r["grad_rel_err"] < 1e-10, key  # float64: equal up to summation order
        assert r["grad_none_mismatch"] == [], key
        assert r["grad_rank_spread"] == 0.0, key  # gradients synchronised
    assert report["sp/none/none"]["find_unused"] is False
    assert report["hrl/none/sampled"]["find_unused"] is True
    # The forced pattern: one rank executes blocks 1 and 3 and the other does not; block 2 runs nowhere.
    forced = report["hrl/ema/forced"]
    assert forced["idle_block_grad_none"] is True
    assert forced["baseline_after"] < 1e-12  # the moving average follows the global batch mean
    for stage, r in report["stages"].items():
        assert r["spread"] == 0.0, stage
    assert report["stages"]["rl"]["find_unused"] is True  # rl leaves the classifier out of the loss
    # SyncBatchNorm needs the same BN calls in the same order on every rank: routing breaks that, the
    # masked execution used under --sync-bn keeps it.
    assert report["bn_call_order_equal"] == {"auto": False, "masked": True}


# --------------------------------------------------------------------------------------------- in-process
def test_torchrun_env_and_single_process_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert torchrun_env() is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert torchrun_env() == (0, 1, 0)
    ctx = setup(SimpleNamespace(device="cpu", amp="none", sync_bn=False))
    assert (ctx.rank, ctx.world, ctx.device) == (0, 1, torch.device("cpu"))
    assert ctx.mean_stats({"a": torch.tensor(1.5), "b": torch.tensor(2)}) == {"a": 1.5, "b": 2.0}
    assert ctx.on_main(lambda: 7) == 7
    assert ctx.train_execution == "auto"
    assert type(ctx.baseline("batch")) is Baseline
    model = create_model("tiny_rnn_gate_14")
    assert ctx.wrap(model, SimpleNamespace(stage="hrl", compile=False, sync_bn=False)) is model
    assert pick_device("cpu") == torch.device("cpu")


def test_setup_refuses_what_cannot_work_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SkipnetError, match="sync-bn needs CUDA"):
        setup(SimpleNamespace(device="cpu", amp="none", sync_bn=True))
    with pytest.raises(SkipnetError, match="fp16 needs a CUDA"):
        setup(SimpleNamespace(device="cpu", amp="fp16", sync_bn=False))
    with pytest.raises(SkipnetError, match="--amp must be"):
        check_amp("fp8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(SkipnetError, match="CUDA is not available"):
            pick_device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing to synchronise, refused rather than ignored
    with pytest.raises(SkipnetError, match="this run is one process; drop it"):
        setup(SimpleNamespace(device="cpu", amp="none", sync_bn=True))


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("xpu", "runs on cpu, cuda or (where available) mps"),
        ("meta", "runs on cpu, cuda or (where available) mps"),
        ("cpu:1", "the CPU takes no index"),
        ("warp9", "unknown device 'warp9'"),
    ],
)
def test_pick_device_refuses_devices_skipnet_cannot_run_on(name: str, needle: str) -> None:
    with pytest.raises(SkipnetError, match=re.escape(needle)):
        pick_device(name)
    assert pick_device("cpu") == torch.device("cpu") and pick_device("cpu:0").type == "cpu"


def test_find_unused_parameters_per_stage() -> None:
    gated, plain = create_model("tiny_rnn_gate_14"), create_model("tiny_resnet_14")
    assert not find_unused_parameters(gated, "hard")  # sp
    assert not find_unused_parameters(gated, "soft")
    assert find_unused_parameters(gated, "sample")  # hrl, rl: routed
    assert find_unused_parameters(gated, "random") and find_unused_parameters(plain, "random")  # sdv
    assert find_unused_parameters(gated, "all_on")  # base on a gated net: gates unused
    assert not find_unused_parameters(plain, "all_on")


def test_sync_bn_trains_with_masked_execution() -> None:
    assert DistContext(world=2, sync_bn=True).train_execution == "masked"
    assert DistContext(world=2).train_execution == "auto"


def test_global_baseline_single_rank_equals_baseline() -> None:
    returns = torch.randn(6, 5)
    for kind in ("batch", "ema"):
        a, b = Baseline(kind), GlobalBaseline(kind, DistContext())
        for _ in range(2):
            torch.testing.assert_close(a(returns), b(returns))
    assert GlobalBaseline("none", DistContext())(returns) is None


def test_unsharded_eval_loader_covers_the_split() -> None:
    from skipnet.data import TensorLoader

    images, labels = torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.arange(10)
    shard = TensorLoader(images, labels, 4, (0.0,) * 3, (1.0,) * 3, rank=1, world=2)
    assert sorted(torch.cat([y for _, y in shard]).tolist()) == [1, 3, 5, 7, 9]
    full = unsharded(shard)
    assert torch.cat([y for _, y in full]).tolist() == list(range(10))
    assert shard.world == 2  # the rank's own loader is left as it was
    ctx = DistContext(rank=1, world=2)
    assert ctx.full_split(shard) is ctx.full_split(shard)


@pytest.mark.slow
def test_bf16_autocast_trains_routed_hrl_on_cpu(cifar_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """``--amp bf16`` on CPU: SP (masked) and HRL (routed) steps run under autocast and give finite losses."""
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    cfg = TrainConfig(
        arch="tiny_rnn_gate_14",
        stage="hrl",
        data=str(cifar_dir),
        out=str(tmp_path / "hrl"),
        iters=2,
        batch_size=16,
        limit_train=64,
        limit_test=16,
        val_split=0.0,
        amp="bf16",
        threads=1,
        device="cpu",
    )
    trainer = Trainer(cfg)
    x, y = next(iter(trainer.data.train))
    with trainer.amp, torch.no_grad():
        assert trainer.model(x, "sample").logits.dtype == torch.bfloat16
    for stage in ("hrl", "sp"):
        trainer.stage = STAGES[stage]
        stats = trainer.train_step(x, y)
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights
    with pytest.raises(SkipnetError, match="fp16"):
        Trainer(TrainConfig(**(cfg.to_dict() | {"amp": "fp16", "out": str(tmp_path / "x")})))


def test_compile_wraps_the_training_module_and_checkpoints_stay_bare() -> None:
    from skipnet.checkpoint import make_checkpoint, unwrap

    model = create_model("tiny_rnn_gate_14")
    wrapped = DistContext().wrap(model, SimpleNamespace(stage="sp", compile=True, sync_bn=False))
    assert wrapped is not model and unwrap(wrapped) is model  # torch.compile is lazy: nothing compiled here
    assert set(make_checkpoint(wrapped)["state_dict"]) == set(model.state_dict())


@pytest.mark.slow
def test_compile_captures_sp_and_routed_hrl_steps() -> None:
    """What ``--compile`` wraps traces (graph capture only, ``backend="eager"``) for SP and routed HRL."""
    import torch.nn.functional as F

    from skipnet.distributed import compile_model

    for stage in ("sp", "hrl"):
        model = create_model("tiny_rnn_gate_14").to(memory_format=torch.channels_last)
        compiled = compile_model(model, backend="eager")
        for _ in range(2):
            x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
            out = compiled(x, STAGES[stage].train_mode)
            ce = F.cross_entropy(out.logits, torch.randint(0, 10, (8,)), reduction="none")
            loss, _ = STAGES[stage].loss(ce, out.trace, alpha=0.1, beta=1.0, rl_weight=1.0, baseline=None)
            loss.backward()
            assert torch.isfinite(loss)


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch) -> None:
    """oneDNN emulates bfloat16 on CPUs without AVX-512 BF16 / AMX (80x slower than float32 measured on an AVX2
    machine): --amp bf16 says so instead of silently running a training many times slower."""
    from skipnet import distributed

    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bfloat16"):
        distributed.check_amp("bf16", torch.device("cpu"))
    monkeypatch.setattr(distributed, "cpu_has_native_bf16", lambda: True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distributed.check_amp("bf16", torch.device("cpu"))
