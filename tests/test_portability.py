"""The suite runs on the machine it is given, but users have other CPUs (AVX2-only Intel and AMD, older x86-64).

The compiled kernels are tested in every variant in-process (tests/test_fastgate.py). What an in-process test
cannot change is the *reference* side: torch picks its own vectorised kernels (ATen's CPU capability, oneDNN's
and MKL's instruction sets) once, at start-up, from the CPU it finds. On an AVX2 machine torch's eager formulas
round differently (ATen's AVX2 ``lerp`` fuses its multiply-add; the AVX-512 one did not, here): that difference
is what made the kernel tests fail on an AMD EPYC while they passed on this AVX-512 machine. So the fast-path
tests are run again in a fresh process with torch and the kernels restricted to each lesser instruction set, as
they run on such a CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import patience
from skipnet import fastgate

REPO = Path(__file__).resolve().parents[1]

# kernel variant -> the environment that makes torch (ATen, oneDNN, MKL) run as it does on a CPU whose best
# instruction set is that variant's.
EMULATE = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
NATIVE = fastgate.variants()[:1]  # the variant the in-process tests run torch at (the best this CPU has)
LESSER = [v for v in fastgate.variants() if v in EMULATE and v not in NATIVE]
# the tests that compare a fast path with the eager formula it replaces (their end-to-end CLI tests, marked slow,
# run once, in the suite itself)
FAST_PATH_TESTS = ["tests/test_fastgate.py", "tests/test_routing.py"]


def _emulated(isa: str) -> dict[str, str]:
    env = {**os.environ, **EMULATE[isa], "SKIPNET_KERNEL_ISA": isa, "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_XDIST_WORKER_COUNT", None)
    return env


def test_this_machine_can_emulate_a_lesser_cpu() -> None:
    """On x86-64 the suite must also run the AVX2 and baseline emulations, not pass by having nothing to run."""
    if os.uname().machine in ("x86_64", "AMD64"):
        assert "default" in LESSER
        assert NATIVE == ["avx512"] or "avx2" in NATIVE + LESSER


@pytest.mark.slow
@pytest.mark.parametrize("isa", LESSER)
def test_fast_paths_equal_eager_with_torch_at_a_lesser_isa(isa: str) -> None:
    env = _emulated(isa)
    probe = (
        "import torch; from skipnet import fastgate as f; print(torch.backends.cpu.get_cpu_capability(), f.variant())"
    )
    got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.split() == [EMULATE[isa]["ATEN_CPU_CAPABILITY"].upper(), isa]  # torch really runs there
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-n",
        "0",
        "-p",
        "no:cacheprovider",
        "-m",
        "not slow",
        *FAST_PATH_TESTS,
    ]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=patience(900))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]


def test_emulation_changes_what_torch_computes(tmp_path) -> None:
    """The emulation is not a no-op: torch's eager lerp on the same inputs rounds differently at some lesser
    capability (its baseline build, on this machine), so a bit-for-bit comparison against the result of one
    capability can fail at another, which is what the tests above are run again for."""
    torch.manual_seed(0)
    s, e = torch.randn(2, 1 << 16)
    torch.save((s, e, torch.rand(1 << 16)), tmp_path / "in.pt")
    code = "import sys, torch; s, e, w = torch.load(sys.argv[1]); torch.save(torch.lerp(s, e, w), sys.argv[2])"
    outs = []
    for isa in ["native", *LESSER]:
        env = os.environ.copy() if isa == "native" else _emulated(isa)
        argv = [sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / f"{isa}.pt")]
        subprocess.run(argv, env=env, check=True)
        outs.append(torch.load(tmp_path / f"{isa}.pt"))
    assert len(outs) > 1, "no lesser instruction set to emulate on this CPU"
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
