"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker gets its share of the cores: N workers with every core each would
    oversubscribe the machine (torch's intra-op threads spin while they wait for each other)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so random inits and inputs are reproducible."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _threads():
    """Every test leaves torch's intra-op thread count as it found it: a command run in-process with
    ``--threads N`` sets it for the process, and the tests after it on that worker (which ones depends on the
    run) would otherwise compute with N threads, in another summation order and beside the other worker."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _fast_gate_kernel() -> None:
    """Build the compiled gate kernel (skipnet.fastgate) once, up front, instead of inside the first test that
    runs CPU inference (on a fresh machine the build takes ~25 s; later processes load the cached build)."""
    from skipnet import fastgate

    fastgate.load()


def one_line_error(capsys, command: str) -> str:
    """The one line a command's user error printed (``skipnet COMMAND: error: ...``): nothing else on stderr."""
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"skipnet {command}: error: "), err
    return err[0]


def patience(seconds: float) -> float:
    """A hang guard's wall-clock limit: ``seconds`` on an idle machine, stretched by how busy the machine is now
    (the load per core, doubled), so that a test waiting on a subprocess fails for a hang, not for a CPU hog
    beside the suite (issue 33: a run of the suite beside two training jobs, load 7 on 2 cores, timed out)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return seconds * max(1.0, 2.0 * load / (os.cpu_count() or 1))


def torchrun(args: list[str], cwd: Path, nproc: int = 2, limit: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc ARGS`` (one thread a process, its own data cache under
    ``cwd``), asserted to exit 0; a launch still running after ``patience(limit)`` s fails the test as a hang."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "SKIPNET_CACHE": str(cwd / "cache"), "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=patience(limit))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish in {patience(limit):.0f}s (a hang?): {' '.join(args)}\n{exc.stderr}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_jpeg() -> str:
    """The bundled CIFAR-10 JPEG tarball (real images); CI places ../shared beside the checkout."""
    if not CIFAR_TAR.is_file():
        pytest.fail(f"{CIFAR_TAR} is missing: the test data must sit beside the repository (../shared/data)")
    return str(CIFAR_TAR)


@pytest.fixture(scope="session")
def cifar_mini(cifar_jpeg, tmp_path_factory) -> str:
    """Real CIFAR-10 images, few: the bundled archive's first 48 training and 16 test images of each class, in
    its layout (a .tar.gz). Reading the whole archive takes 3-5 s, which the training tests would pay every run."""
    import tarfile
    from collections import Counter

    out = tmp_path_factory.mktemp("cifar_mini") / "cifar10-jpeg.tar.gz"
    keep, taken = {"train": 48, "test": 16}, Counter()
    with tarfile.open(cifar_jpeg) as src, tarfile.open(out, "w:gz") as dst:
        for member in src:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and parts[1] in keep:
                if taken[parts[1], parts[2]] >= keep[parts[1]]:
                    continue
                taken[parts[1], parts[2]] += 1
                dst.addfile(member, src.extractfile(member))
            elif member.isdir():
                dst.addfile(member)
    return str(out)


def trained_like(name: str, seed: int = 1) -> torch.nn.Module:
    """A model whose gates decide differently per sample, in eval mode: gate weights spread so that the gate
    probabilities straddle 0.5, BatchNorm statistics moved off their initial values (as training leaves them)."""
    from skipnet import create_model

    torch.manual_seed(seed)
    model = create_model(name).eval()
    with torch.no_grad():
        for p in model.gates.parameters():
            p.normal_(0, 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


# a tiny HRL training on the built-in digits (seconds a run), the shared base of the fault and resume tests;
# each adds its --iters, --eval-every and --baseline
TINY_HRL = ["tiny_rnn_gate_14", "--stage", "hrl", "--data", "digits", "--batch-size", "16", "--threads", "1"]
TINY_HRL += ["--val-split", "0.2", "--lr", "0.05", "--schedule", "constant", "--limit-train", "160"]
TINY_HRL += ["--limit-test", "64", "--log-every", "100"]


def train_tiny_sp(out: Path, **options) -> Path:
    """Train a tiny RNN-gated network by SP on digits (20% validation split, one thread) into ``out``; ``options``
    are TrainConfig fields (iters, batch_size, ...). Returns ``out``."""
    from skipnet.train import TrainConfig, train

    fields = {"arch": "tiny_rnn_gate_14", "stage": "sp", "data": "digits", "val_split": 0.2, "threads": 1}
    train(TrainConfig(out=str(out), log_every=1000, **(fields | options)))
    return out
