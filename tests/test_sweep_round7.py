"""``skipnet sweep`` after a hostile review (round 7): runs reused only from the same ``--init`` contents, user
text never taken for a placeholder, every row at the start's threshold, ``--out`` holding only a sweep's files
(written atomically), and one line for each mistake before anything trains."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import train_tiny_sp
from skipnet import fileio
from skipnet.checkpoint import load_checkpoint
from skipnet.cli import build_parser, main
from skipnet.commands import sweep
from skipnet.errors import SkipnetError
from skipnet.experiments import Run, Runner, literal
from skipnet.fileio import atomic_save

FAST = ["--data", "digits", "--iters", "1", "--batch-size", "16", "--limit-train", "64", "--limit-test", "64"]
FAST += ["--threads", "1"]


@pytest.fixture(scope="module")
def sp_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny RNN-gated network after a few SP steps on digits (20% validation split): its ``best.pt``."""
    out = tmp_path_factory.mktemp("sweep7") / "sp"
    return train_tiny_sp(out, iters=4, batch_size=32, limit_train=128) / "best.pt"


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _sweep(capsys: pytest.CaptureFixture, init: Path | str, out: Path | str, *more: str) -> tuple[int, str, str]:
    return _cli(capsys, "sweep", "--init", str(init), "--alphas", "0.1", "--out", str(out), *FAST, *more)


def _one_line(code: int, err: str) -> None:
    assert code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err, err


def _edited(src: Path, dst: Path, **fields) -> Path:
    """A copy of the checkpoint ``src`` with ``fields`` replaced (``perturb=True``: one weight moved)."""
    ckpt = load_checkpoint(src)
    if fields.pop("perturb", False):
        name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
        ckpt["state_dict"][name] = ckpt["state_dict"][name] + 0.5
    atomic_save(ckpt | fields, dst)
    return dst


# --------------------------------------------------------------------------------------------- 1. init contents
@pytest.mark.slow
def test_a_rerun_refuses_runs_trained_from_older_init_contents(
    sp_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    init, out = tmp_path / "spX.pt", tmp_path / "sweep"
    shutil.copyfile(sp_ckpt, init)
    code, _, err = _sweep(capsys, init, out)
    assert code == 0, err
    record = json.loads((out / sweep.RECORD).read_text())["runs"]["alpha_0.1"]
    assert record == {"init": str(init), "init_sha256": sweep.init_digest(str(init))}
    rows, table = (out / "alpha_0.1" / "metrics.jsonl").read_text(), (out / "sweep.json").read_text()

    same = shutil.copyfile(sp_ckpt, tmp_path / "same_bytes.pt")  # the same contents under another name: reused
    code, _, err = _sweep(capsys, same, out)
    assert code == 0, err
    assert (out / "alpha_0.1" / "metrics.jsonl").read_text() == rows

    _edited(sp_ckpt, init, perturb=True)  # another SP checkpoint copied over the same path
    code, _, err = _sweep(capsys, init, out)
    _one_line(code, err)
    assert "trained from another --init" in err and "choose another --out" in err
    assert (out / "alpha_0.1" / "metrics.jsonl").read_text() == rows and (out / "sweep.json").read_text() != table

    (out / sweep.RECORD).unlink()  # a run no record ties to its --init's contents (an older sweep's): not reused
    code, _, err = _sweep(capsys, same, out)
    _one_line(code, err)
    assert "does not tie" in err and (out / "alpha_0.1" / "metrics.jsonl").read_text() == rows


# --------------------------------------------------------------------------------------------- 2. braces
def test_braces_in_user_values_pass_through_literally(tmp_path: Path) -> None:
    argv = ["sweep", "--init", "sp{x}.pt", "--data", "digits", "--alphas", "0.1", "--out", "o"]
    args = build_parser().parse_args([*argv, "--data-dir", "{data}/{runs}"])
    (run,) = sweep.declare(args, "tiny_rnn_gate_14", [0.1], 0.2)
    cmd = Runner(tmp_path, "digits").command(run)
    assert cmd[cmd.index("--init") + 1] == "sp{x}.pt" and cmd[cmd.index("--data-dir") + 1] == "{data}/{runs}"
    args = build_parser().parse_args(["sweep", "--init", "{data}.pt", *argv[3:]])
    (run,) = sweep.declare(args, "tiny_rnn_gate_14", [0.1], 0.2)
    cmd = Runner(tmp_path, "digits").command(run)
    assert cmd[cmd.index("--init") + 1] == "{data}.pt"  # not digits.pt
    # a placeholder still works beside a literal value, and a stray brace is one line naming the run
    runner = Runner(tmp_path, "digits")
    cmd = runner.command(Run("b", ("--init", "{runs}/a/" + literal("x{y}.pt"))))
    assert cmd[3] == f"{tmp_path}/a/x{{y}}.pt"
    with pytest.raises(SkipnetError, match="run b: argument '--init={x}' holds a brace"):
        runner.command(Run("b", ("--init={x}",)))


# --------------------------------------------------------------------------------------------- 3. threshold
@pytest.mark.slow
def test_a_calibrated_init_trains_and_evaluates_every_run_at_its_threshold(
    sp_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    init, out = _edited(sp_ckpt, tmp_path / "cal.pt", threshold=0.42), tmp_path / "sweep"
    code, stdout, err = _sweep(capsys, init, out, "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["threshold"] == 0.42 and "threshold 0.42" in (out / "sweep.md").read_text()
    best = load_checkpoint(out / "alpha_0.1" / "best.pt")
    assert best["threshold"] == 0.42 and best["train_config"]["threshold"] == 0.42

    # 4. the summaries are written atomically: a full disk writing sweep.md leaves the earlier one whole
    with open(out / "sweep.md", "a") as f:
        f.write("a note of the user's\n")
    before = (out / "sweep.md").read_text()

    def full_disk(count: int, what: str) -> None:
        if what == "write sweep.md":
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "fault_hook", full_disk)
    code, _, err = _sweep(capsys, init, out)
    _one_line(code, err)
    assert "no space left" in err and (out / "sweep.md").read_text() == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_an_init_calibrated_to_skip_every_block_is_refused(
    sp_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    init = _edited(sp_ckpt, tmp_path / "all_skip.pt", threshold=1.01)
    code, _, err = _sweep(capsys, init, tmp_path / "sweep")
    _one_line(code, err)
    assert "skip every gated block" in err and not (tmp_path / "sweep").exists()


# --------------------------------------------------------------------------------------------- 4, 5, 7. --out
def _run_dir(sp_ckpt: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(sp_ckpt.parent, run)
    return run


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("empty", "--out is empty"),
        ("file", "--out {out} is a file"),
        ("proc", "--out /proc/x: cannot write in /proc"),
        ("user_md", "--out {out} holds sweep.md that sweep did not write"),
        ("run_dir", "--out {out} holds .lock, best.pt, config.json that sweep did not write"),
        ("link", "--out {out} holds sweep.json that sweep did not write"),
    ],
)
def test_out_holding_others_files_or_unwritable_is_one_line_naming_it(
    kind: str,
    says: str,
    sp_ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    out = {"empty": "", "proc": "/proc/x", "run_dir": str(_run_dir(sp_ckpt, tmp_path))}.get(kind, str(tmp_path / "o"))
    if kind == "file":
        Path(out).write_text("mine")
    elif kind == "user_md":
        Path(out).mkdir()
        (Path(out) / "sweep.md").write_text("# my notes\n")
    elif kind == "link":
        Path(out).mkdir()
        (tmp_path / "target.json").write_text(json.dumps({"rows": [], "init": "x"}))
        (Path(out) / "sweep.json").symlink_to(tmp_path / "target.json")
    before = sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() and out else None
    code, _, err = _sweep(capsys, sp_ckpt, out)
    _one_line(code, err)
    assert says.format(out=out) in err
    assert list(work.iterdir()) == []
    if before is not None:
        assert sorted(p.name for p in Path(out).iterdir()) == before
    if kind == "user_md":
        assert (Path(out) / "sweep.md").read_text() == "# my notes\n"


# --------------------------------------------------------------------------------------------- 6. alphas
def test_alphas_of_one_run_directory_are_refused_before_training(
    sp_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sweep"
    alphas = ["--alphas", "0.1234561", "0.1234562"]
    code, _, err = _cli(capsys, "sweep", "--init", str(sp_ckpt), "--data", "digits", *alphas, "--out", str(out))
    _one_line(code, err)
    assert "0.1234561 and 0.1234562 both name the run directory alpha_0.123456" in err and not out.exists()
    for alpha, says in (("1e39", "--alphas must be at most 3.403e+38"), ("nan", "--alphas must be >= 0, got nan")):
        code, _, err = _cli(
            capsys, "sweep", "--init", str(sp_ckpt), "--data", "digits", "--alphas", alpha, "--out", str(out)
        )
        _one_line(code, err)
        assert says in err and not out.exists()


# --------------------------------------------------------------------------------------------- 7. untrained gates
@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"mode": "all_on", "stage": "base"}, "its gates were never trained"),
        ({"mode": "random", "stage": "sdv"}, "decides at random"),
    ],
)
def test_an_init_whose_gates_never_learned_is_refused(
    fields: dict, says: str, sp_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    init = _edited(sp_ckpt, tmp_path / "init.pt", **fields)
    assert torch.load(init, weights_only=True)["mode"] == fields["mode"]
    code, _, err = _sweep(capsys, init, tmp_path / "sweep")
    _one_line(code, err)
    assert says in err and f"--init {init}" in err and not (tmp_path / "sweep").exists()
