"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same RNG state, so random inits and inputs are reproducible."""
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _fast_gate_kernel() -> None:
    """Build the compiled gate kernel (skipnet.fastgate) once, up front, instead of inside the first test that
    runs CPU inference (on a fresh machine the build takes ~25 s; later processes load the cached build)."""
    from skipnet import fastgate

    fastgate.load()


REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_jpeg() -> str:
    """The bundled CIFAR-10 JPEG tarball (real images); CI places ../shared beside the checkout."""
    if not CIFAR_TAR.is_file():
        pytest.fail(f"{CIFAR_TAR} is missing: the test data must sit beside the repository (../shared/data)")
    return str(CIFAR_TAR)
