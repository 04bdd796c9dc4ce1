"""``skipnet quickstart`` run again into the same --out: the same command continues (or reuses) what is there; other
options that change the results are refused in one line naming them, before anything runs or is written."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from skipnet.cli import main
from skipnet.commands import quickstart
from skipnet.runlog import RunLog

QUICK = ["--epochs", "0.01", "--threads", "1"]  # 6 base, 3 SP and 3 HRL steps: a second or two


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root`` (dot files included): its bytes and mtime."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def refusal(capsys, argv: list[str]) -> str:
    """The one line of a refused quickstart (exit 2)."""
    assert main(["quickstart", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("skipnet quickstart: error: ") and not captured.out, err
    return err[0]


def sigterm_at_step(monkeypatch, at: int) -> None:
    """SIGTERM to this process when the first stage logs step ``at`` (the trainer stops at the next step)."""
    logged = RunLog.step

    def step(self, n: int, *args, **kwargs) -> None:
        if n == at:
            signal.raise_signal(signal.SIGTERM)
        logged(self, n, *args, **kwargs)

    monkeypatch.setattr(RunLog, "step", step)


@pytest.mark.slow
def test_other_options_are_refused_and_the_same_command_continues(tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "qs"
    argv = ["--out", str(out), *QUICK]
    with monkeypatch.context() as m:
        sigterm_at_step(m, 2)
        assert main(["quickstart", *argv]) == 128 + signal.SIGTERM
    stopped = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.startswith("skipnet quickstart: SIGTERM: stopped at step 2/"), stopped
    assert stopped.endswith("run the same skipnet quickstart command again to continue it") and "resume" not in stopped
    assert not (out / "sp").exists()

    before = snapshot(out)
    assert "quickstart.json" in before and "base/last.pt" in before
    for other, made in [
        (["--epochs", "0.02", "--threads", "1"], "--epochs 0.01 (now 0.02)"),
        ([*QUICK, "--alpha", "1"], "--alpha 2 (now 1)"),
        ([*QUICK, "--seed", "3"], "--seed 0 (now 3)"),
        (["--epochs", "0.01"], "--threads 1 (now default)"),
        (["--epochs", "0.05", "--threads", "2"], "--epochs 0.01 (now 0.05), --threads 1 (now 2)"),
    ]:
        line = refusal(capsys, ["--out", str(out), *other])
        assert f"--out {out} holds a quickstart made with {made}: use another --out" in line, line
        assert "resume" not in line
    assert snapshot(out) == before  # nothing written, nothing touched

    assert main(["quickstart", *argv, "--json"]) == 0  # the same command: base continues from step 2, SP and HRL run
    rows = json.loads(capsys.readouterr().out)
    assert [r["stage"] for r in rows] == ["base", "sp", "hrl"]
    assert json.loads((out / "base" / "summary.json").read_text())["steps"] == 6
    assert main(["quickstart", *argv]) == 0
    assert capsys.readouterr().err.count("finished earlier: reused") == 3


def test_the_record_is_written_before_the_first_stage(tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "qs"
    seen = []

    def first_stage(cfg, **kwargs) -> dict:
        seen.append((json.loads((out / "quickstart.json").read_text()), sorted(p.name for p in out.iterdir())))
        raise KeyboardInterrupt  # killed as the first stage starts

    monkeypatch.setattr(quickstart, "train", first_stage)
    assert main(["quickstart", "--out", str(out), "--epochs", "0.5", "--seed", "7"]) == 130
    assert seen == [({"epochs": 0.5, "alpha": 2.0, "seed": 7, "threads": None}, ["quickstart.json", "quickstart.log"])]
    capsys.readouterr()
    line = refusal(capsys, ["--out", str(out), "--epochs", "0.5"])
    assert "made with --seed 7 (now 0)" in line


@pytest.mark.parametrize(
    ("leftover", "needle"),
    [
        ({"sp/metrics.jsonl": '{"step": 3}\n'}, "holds sp/ but no quickstart.json"),
        ({"quickstart.json": "{not json"}, "quickstart.json cannot be read (JSONDecodeError)"),
        ({"quickstart.json": '{"epochs": 1.0}'}, "quickstart.json is not a quickstart record (no --alpha)"),
    ],
    ids=["stages-without-record", "malformed-record", "incomplete-record"],
)
def test_an_out_without_a_readable_record_is_refused(tmp_path, capsys, leftover, needle) -> None:
    out = tmp_path / "qs"
    for name, text in leftover.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    line = refusal(capsys, ["--out", str(out), *QUICK])
    assert needle in line and "use another --out" in line, line
    assert snapshot(out) == before
