"""The repository's own files carry no absolute path of the machine that produced them."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Absolute locations typical of a machine's checkout, home, data or scratch directory.
MACHINE_PATH = re.compile(r"(?<![\w.$~])/(?:work|root|home|tmp|Users|mnt)/[\w.-]")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an sdist): every file under the repository
        return [p for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [REPO / line for line in out.stdout.splitlines()]


def test_no_absolute_machine_paths_in_tracked_files() -> None:
    own = {str(REPO), str(REPO.parent / "shared")}
    bad = []
    for path in _tracked_text_files():
        if path.name == ".gitignore" or path == Path(__file__).resolve() or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # binary: a shipped safetensors checkpoint's JSON header is checked, the rest not
            raw = path.read_bytes()
            if path.suffix != ".safetensors":
                continue
            text = raw[8 : 8 + int.from_bytes(raw[:8], "little")].decode().replace("\\n", "\n")
        for n, line in enumerate(text.splitlines(), 1):
            if any(p in line for p in own) or MACHINE_PATH.search(line):
                bad.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not bad, "absolute paths in tracked files:\n" + "\n".join(bad[:20])


def test_hang_guards_stretch_with_the_load(monkeypatch) -> None:
    """Issue 33: a test's wall-clock limit on a subprocess (a hang guard) scales with the machine's load, so a CPU
    hog beside the suite does not fail it; and no test gives a subprocess a bare number of seconds."""
    import os

    from conftest import patience

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.0, 0.0))
    assert patience(120) == 120
    monkeypatch.setattr(os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    assert patience(120) == 840
    bare = [
        f"{p.name}:{n}"
        for p in sorted(Path(__file__).parent.glob("test_*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"timeout=\d|TimeoutExpired.*\d{2,}|\.join\(\d|deadline=[^,)]*\d", line)
    ]
    assert not bare, f"bare timeouts (use conftest.patience): {bare}"
