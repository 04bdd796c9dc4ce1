"""A command's start: every ``skipnet`` command is a fresh process (and the experiment runner, torchrun and the
suite start hundreds), so what it imports before its work is paid each time. matplotlib (~0.5 s) is imported by
the commands that draw, when they draw; the digits are read from scikit-learn's CSV file without importing
scikit-learn (~1.3 s)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np

from skipnet.data.sources import digits_table


def test_digits_table_is_scikit_learns_load_digits(monkeypatch) -> None:
    from sklearn.datasets import load_digits

    expected = load_digits()
    for found in (True, False):  # the CSV file read directly, and load_digits where it is not found
        if not found:
            monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
        images, labels = digits_table()
        assert images.dtype == expected.images.dtype and np.array_equal(images, expected.images)
        assert np.array_equal(labels, expected.target) and labels.shape == (1797,)


def test_a_command_that_draws_nothing_imports_neither_matplotlib_nor_scikit_learn(tmp_path) -> None:
    code = (
        "import sys\n"
        "from skipnet.cli import build_parser\n"
        "from skipnet.data import load_data\n"
        "build_parser()\n"
        "load_data('digits', batch_size=8, workers=0)\n"
        "print(sorted(m for m in ('matplotlib', 'sklearn') if m in sys.modules))\n"
    )
    env = os.environ | {"SKIPNET_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
