"""Reliability and safety: safe checkpoint loading, safetensors export, atomic writes under faults (exceptions,
a full disk, SIGKILL), and one-line errors for bad input (data, images, options, checkpoints, run directories)."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import skipnet.checkpoint as ckpt_mod
import skipnet.fileio as fileio
from conftest import patience
from skipnet import SkipnetError
from skipnet.checkpoint import (
    load_checkpoint,
    load_model,
    load_weights_into,
    model_from_checkpoint,
    save_checkpoint,
)
from skipnet.cli import main
from skipnet.data import load_data
from skipnet.registry import create_model, get_config

TRAIN = ["--batch-size", "4", "--threads", "1", "--val-split", "0.2", "--lr", "0.05"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """Decoded-image caches of the tiny folders go to a temporary directory, not ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SKIPNET_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


# ------------------------------------------------------------------------------------------ helpers
# mode -> file type; "PNG" and "BMP" are RGB images saved losslessly in those formats
EXT = {
    "RGB": ".jpg",
    "CMYK": ".jpg",
    "L": ".png",
    "RGBA": ".png",
    "P": ".png",
    "I;16": ".png",
    "PNG": ".png",
    "BMP": ".bmp",
}


def write_image(path: Path, mode: str = "RGB", size: int = 16, seed: int = 0) -> Path:
    rng = np.random.RandomState(seed)
    if mode == "I;16":
        im = Image.fromarray(rng.randint(0, 65536, (size, size)).astype(np.uint16))
    else:
        im = Image.fromarray(rng.randint(0, 256, (size, size, 3)).astype(np.uint8))
        im = im.convert("RGB" if mode in ("PNG", "BMP") else mode)
    path = path.with_suffix(EXT[mode])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def make_folder(
    root: Path, classes=("a", "b", "c"), n_train: int = 6, n_test: int = 3, modes=("RGB",), size: int = 16
) -> Path:
    """An ImageFolder root with train/ and test/; the images cycle through ``modes``."""
    k = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            for i in range(n):
                write_image(root / split / c / f"{i:03d}", modes[k % len(modes)], size, seed=k)
                k += 1
    return root


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, command: str, needle: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"skipnet {command}: error: "), lines[0]
    assert needle in lines[0], lines[0]


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------ a real run
MIXED = ("RGB", "L", "RGBA", "P", "I;16", "CMYK", "BMP")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny SP run on a folder mixing RGB, grayscale, RGBA, palette, 16-bit, CMYK and BMP images."""
    root = tmp_path_factory.mktemp("rel")
    data = make_folder(root / "mixed", modes=MIXED)
    out = root / "sp"
    base = ["train", "tiny_rnn_gate_14", "--stage", "sp", "--data", str(data), *TRAIN]
    assert main([*base, "--iters", "2", "--out", str(out)]) == 0
    # "argv": a command that would train one step if nothing stopped it
    return {
        "root": root,
        "data": str(data),
        "out": out,
        "ckpt": out / "best.pt",
        "base": base,
        "argv": [*base, "--iters", "1"],
    }


def test_mixed_image_modes_load_and_train_as_rgb(run) -> None:
    ckpt = load_checkpoint(run["ckpt"])
    assert ckpt["arch"]["in_channels"] == 3 and ckpt["arch"]["num_classes"] == 3
    assert ckpt["data"]["image_size"] == 16
    bundle = load_data(run["data"], batch_size=4, val_split=0.0)
    assert bundle.in_channels == 3 and bundle.info["train_images"] == 18 and bundle.info["test_images"] == 9
    # decoded values are right, not merely present: a grayscale PNG is gray in all three channels, and a
    # 16-bit PNG is scaled down to 8 bits (not clipped to 255).
    gray = write_image(run["root"] / "probe" / "train" / "a" / "g", "L")
    deep = write_image(run["root"] / "probe" / "train" / "a" / "d", "I;16", seed=3)
    write_image(run["root"] / "probe" / "test" / "a" / "t", "RGB")
    probe = load_data(str(run["root"] / "probe"), batch_size=1, val_split=0.0)
    x = probe.train.images  # (2, 3, 16, 16) uint8, sorted by file name: d, g
    g = torch.from_numpy(np.array(Image.open(gray)))
    torch.testing.assert_close(x[1], g.expand(3, 16, 16))
    d16 = torch.from_numpy(np.array(Image.open(deep)).astype(np.int64))
    torch.testing.assert_close(x[0].long(), (d16 // 257).expand(3, 16, 16))
    assert x[0].max() > 200 and x[0].min() < 50


@pytest.mark.parametrize("mode", ["PNG", "L", "RGBA", "P", "I;16", "BMP"])
def test_pil_fallback_decodes_like_torchvision(tmp_path, mode) -> None:
    """Without torchvision's (deprecated) decoder every mode still decodes, to the same pixels (lossless formats)."""
    from skipnet.data import _decode_file, _tv_decoder

    path = write_image(tmp_path / "x", mode, seed=5)
    pil = _decode_file(path, None)
    assert pil is not None and pil.dtype == torch.uint8 and pil.shape == (3, 16, 16)
    if mode != "BMP":  # torchvision does not read BMP: the fallback is the only decoder
        torch.testing.assert_close(pil, _decode_file(path, _tv_decoder()))


# ------------------------------------------------------------------------------------------ 1. safe loading
class Payload:
    """Unpickling this with weights_only=False runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    model = create_model("tiny_resnet_14", num_classes=3)
    ckpt = ckpt_mod.make_checkpoint(model)
    ckpt["metrics"] = {"note": Payload(marker)}
    torch.save(ckpt, path)
    # the payload is real: an unsafe load runs it
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_code_in_checkpoint_is_refused_by_load_checkpoint(evil) -> None:
    path, marker = evil
    with pytest.raises(SkipnetError, match=r"refused to load .*evil\.pt.*(posix|os)\.system") as exc:
        load_checkpoint(path)
    assert "\n" not in str(exc.value)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "export", "calibrate", "train_init"])
def test_code_in_checkpoint_is_refused_by_the_cli(evil, run, capsys, tmp_path, command) -> None:
    path, marker = evil
    argv = {
        "eval": ["eval", str(path), "--data", run["data"]],
        "export": ["export", str(path), str(tmp_path / "x.safetensors")],
        "calibrate": [
            "calibrate",
            str(path),
            "--data",
            run["data"],
            "--target-reduction",
            "10",
            "--out",
            str(tmp_path / "c.pt"),
        ],
        "train_init": [*run["argv"], "--init", str(path), "--out", str(tmp_path / "r")],
    }[command]
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, argv[0], "refused to load")
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "r").exists()


def test_code_in_checkpoint_refused_in_a_real_process(evil, run) -> None:
    path, marker = evil
    proc = subprocess.run(
        [sys.executable, "-m", "skipnet", "eval", str(path), "--data", run["data"]],
        capture_output=True,
        text=True,
        timeout=patience(120),
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("skipnet eval: error: refused to load"), proc.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ 2. export
def test_export_safetensors_round_trip(run, capsys, tmp_path) -> None:
    from safetensors import safe_open

    out = tmp_path / "model.safetensors"
    rc, stdout, err = run_cli(capsys, ["export", str(run["ckpt"]), str(out), "--json"])
    assert rc == 0, err
    assert json.loads(stdout)["tensors"] > 0 and temps(tmp_path) == []
    original = load_checkpoint(run["ckpt"])
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(original["state_dict"])
    assert meta["format"] == "skipnet" and json.loads(meta["arch"]) == original["arch"]
    assert float(meta["threshold"]) == original["threshold"] and meta["mode"] == original["mode"]
    assert json.loads(meta["data"])["mean"] == original["data"]["mean"]

    # the same network: identical logits and decisions
    a, b = model_from_checkpoint(original), load_model(out)[0]
    assert b.threshold == a.threshold and b.config == a.config
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        oa, ob = a(x, "greedy"), b(x, "greedy")
    assert torch.equal(oa.logits, ob.logits) and torch.equal(oa.trace.decisions, ob.trace.decisions)

    # skipnet eval reads it like the .pt: the same numbers
    evals = []
    for f in (run["ckpt"], out):
        rc, stdout, err = run_cli(capsys, ["eval", str(f), "--data", run["data"], "--json"])
        assert rc == 0, err
        evals.append({k: v for k, v in json.loads(stdout).items() if k != "checkpoint"})
    assert evals[0] == evals[1] and evals[0]["images"] == 9

    # --init accepts it
    fresh = create_model("tiny_rnn_gate_14", num_classes=3, image_size=16)
    assert load_weights_into(fresh, load_checkpoint(out)) == []
    torch.testing.assert_close(fresh.state_dict()["backbone.conv1.weight"], a.state_dict()["backbone.conv1.weight"])


def test_export_refuses_to_overwrite_without_force(run, capsys, tmp_path) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    rc, _, err = run_cli(capsys, ["export", str(run["ckpt"]), str(out)])
    assert_one_line_error(rc, err, "export", "already exists; pass --force")
    assert out.read_bytes() == b"keep me"
    rc, _, err = run_cli(capsys, ["export", str(run["ckpt"]), str(tmp_path / "model.pt")])
    assert_one_line_error(rc, err, "export", "must end in .safetensors")
    assert run_cli(capsys, ["export", str(run["ckpt"]), str(out), "--force"])[0] == 0
    assert load_checkpoint(out)["arch"]["name"] == "tiny_rnn_gate_14" and temps(tmp_path) == []


def test_foreign_safetensors_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SkipnetError, match="without skipnet metadata"):
        load_checkpoint(tmp_path / "other.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SkipnetError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------------ 3. atomic writes
def _half_then(exc: BaseException, real=torch.save):
    """A torch.save that writes the first half of the real bytes, then raises ``exc``."""

    def fake(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise exc

    return fake


FAULTS = {
    "torch.save dies half-way": ("torch_save", RuntimeError("boom")),
    "fsync fails": ("fsync", OSError(errno.EIO, "I/O error")),
    "rename fails": ("replace", OSError(errno.EXDEV, "cross-device")),
    "interrupted half-way": ("torch_save", KeyboardInterrupt()),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch, fault) -> None:
    model = create_model("tiny_rnn_gate_14")
    target = tmp_path / "last.pt"
    save_checkpoint(target, model, step=1)
    before = target.read_bytes()
    where, exc = FAULTS[fault]
    if where == "torch_save":
        monkeypatch.setattr(torch, "save", _half_then(exc))
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(exc))
    else:
        monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(exc))
    with pytest.raises(type(exc)):
        save_checkpoint(target, model, step=2)
    monkeypatch.undo()
    assert target.read_bytes() == before and load_checkpoint(target)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left


class FullDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes free: writes past it fail with ENOSPC, as on a full file system."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        super().close()


@pytest.mark.parametrize("where", ["disk fills during torch.save", "write", "fsync"])
def test_full_disk_is_a_clear_error_and_keeps_previous(tmp_path, monkeypatch, where) -> None:
    model = create_model("tiny_rnn_gate_14")
    target = tmp_path / "last.pt"
    save_checkpoint(target, model, step=1)
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "disk fills during torch.save":  # the real torch.save: it raises a RuntimeError of its own
        real_fdopen = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: FullDisk(real_fdopen(fd, mode), 20000))
    elif where == "write":
        monkeypatch.setattr(torch, "save", _half_then(full))
    else:
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(full))
    with pytest.raises(SkipnetError, match=r"no space left on device writing .*last\.pt; previous checkpoint kept"):
        save_checkpoint(target, model, step=2)
    monkeypatch.undo()
    assert load_checkpoint(target)["step"] == 1 and temps(tmp_path) == []
    with pytest.raises(SkipnetError, match="new.pt was not created"):  # no previous file: says so (other files were)
        monkeypatch.setattr(torch, "save", _half_then(full))
        save_checkpoint(tmp_path / "new.pt", model)
    assert not (tmp_path / "new.pt").exists()


def test_full_disk_during_training_then_resume(run, capsys, tmp_path, monkeypatch) -> None:
    """ENOSPC at the second checkpoint of a run: one-line error, exit 2, last.pt of step 2 intact; --resume
    then finishes the run."""
    calls = []

    def flaky(count: int, what: str) -> None:  # the disk fills while the second last.pt is written
        calls.append(what == "write last.pt")
        if sum(calls) == 2 and calls[-1]:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "fault_hook", flaky)
    out = tmp_path / "run"
    argv = [*run["base"], "--iters", "4", "--eval-every", "2", "--out", str(out)]
    rc, _, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err, "train", "no space left on device writing")
    assert load_checkpoint(out / "last.pt")["step"] == 2 and temps(out) == []
    monkeypatch.undo()
    assert run_cli(capsys, [*argv, "--resume"])[0] == 0
    assert load_checkpoint(out / "last.pt")["step"] == 4


def test_sigkill_mid_write_keeps_previous_and_leftover_is_cleaned(tmp_path) -> None:
    target = tmp_path / "last.pt"
    save_checkpoint(target, create_model("tiny_rnn_gate_14"), step=1)
    before = target.read_bytes()
    script = textwrap.dedent(
        f"""
        import io, sys, time, torch
        from skipnet.checkpoint import save_checkpoint
        from skipnet.registry import create_model
        real = torch.save
        def slow(obj, f, *a, **k):
            buf = io.BytesIO(); real(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
            print("writing", flush=True)
            time.sleep(60)
        torch.save = slow
        save_checkpoint({str(target)!r}, create_model("tiny_rnn_gate_14"), step=2)
        """
    )
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        leftover = temps(tmp_path)
        assert len(leftover) == 1 and (tmp_path / leftover[0]).stat().st_size > 0  # killed mid-write
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=patience(30)) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert target.read_bytes() == before and load_checkpoint(target)["step"] == 1
    save_checkpoint(target, create_model("tiny_rnn_gate_14"), step=3)  # the next write removes the dead one's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"] and load_checkpoint(target)["step"] == 3


# ------------------------------------------------------------------------------------------ 4. bad input
def _bad_data(kind: str, tmp: Path) -> str:
    d = tmp / kind
    if kind == "missing":
        return str(d)
    d.mkdir()
    if kind == "empty":
        return str(d)
    (d / "train").mkdir()
    (d / "test").mkdir()
    if kind == "no_class_folders":
        return str(d)
    for split in ("train", "test"):
        (d / split / "a").mkdir()
        (d / split / "a" / "notes.txt").write_text("not an image")
    if kind == "no_images":
        return str(d)
    if kind == "all_corrupt":
        for split in ("train", "test"):
            for i in range(3):
                (d / split / "a" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff garbage")
        return str(d)
    if kind == "new_test_class":
        write_image(d / "train" / "a" / "0")
        write_image(d / "test" / "z" / "0")
        return str(d)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("missing", "does not exist; pass one of"),
        ("empty", "is empty; put train/ and test/"),
        ("no_class_folders", "holds no class folders; put each class"),
        ("no_images", "holds no images (1 other files): its class folders need files ending in"),
        ("all_corrupt", "none of the 3 images under"),
        ("new_test_class", "class folders that the training split lacks (z)"),
    ],
)
def test_bad_data_is_one_line_error(capsys, tmp_path, kind, needle) -> None:
    data = _bad_data(kind, tmp_path)
    out = tmp_path / "out"
    rc, _, err = run_cli(
        capsys, ["train", "tiny_resnet_14", "--stage", "base", "--data", data, *TRAIN, "--out", str(out)]
    )
    assert_one_line_error(rc, err, "train", needle)
    assert not out.exists()


def test_corrupt_images_are_skipped_with_a_warning(tmp_path, caplog) -> None:
    root = make_folder(tmp_path / "d", classes=("a", "b"), n_train=5, n_test=2)
    bad = [root / "train" / "a" / "bad0.jpg", root / "train" / "b" / "bad1.png", root / "train" / "b" / "bad2.jpg"]
    good = (root / "train" / "a" / "000.jpg").read_bytes()
    bad[0].write_bytes(good[: len(good) // 2])  # truncated JPEG
    bad[1].write_bytes(b"")  # empty file
    bad[2].write_bytes(bytes(range(7, 256)) + bytes(range(1, 52)))  # garbage (fixed: random bytes can parse as TGA)
    for attempt in ("decode", "cache hit"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="skipnet.data"):
            bundle = load_data(str(root), batch_size=2, val_split=0.0)
        assert bundle.info["train_images"] == 10, attempt  # 13 files, 3 skipped
        warning = [r.getMessage() for r in caplog.records if "could not be decoded" in r.getMessage()]
        assert len(warning) == 1 and "skipped 3 of 13 images" in warning[0], attempt
        assert all(b.name in warning[0] for b in bad), warning[0]
    assert bundle.train.labels.bincount().tolist() == [5, 5]


def test_corrupt_large_images_are_skipped_when_met(tmp_path, caplog) -> None:
    root = make_folder(tmp_path / "big", classes=("a", "b"), n_train=3, n_test=1, size=80)
    (root / "train" / "a" / "001.jpg").write_bytes(b"\xff\xd8\xff broken")
    bundle = load_data(str(root), batch_size=2, val_split=0.0, image_size=72, workers=0)
    with caplog.at_level(logging.WARNING, logger="skipnet.data"):
        seen = sum(len(y) for _, y in bundle.train)
        x, _ = next(iter(bundle.test))
    assert seen == 5 and x.shape[1:] == (3, 72, 72)  # 6 files, one unreadable: skipped, not replaced
    assert any("001.jpg" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--alpha", "-0.1"], "--alpha must be >= 0, got -0.1"),
        (["--threshold", "1.5"], "--threshold must be in [0, 1], got 1.5"),
        (["--threshold", "-0.01"], "--threshold must be in [0, 1]"),
        (["--threshold", "nan"], "--threshold must be in [0, 1], got nan"),
        (["--batch-size", "0"], "--batch-size must be in [1, 65536], got 0"),
        (["--batch-size", "-4"], "--batch-size must be in [1, 65536], got -4"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--iters", "-1"], "--iters must be positive"),
        (["--val-split", "1"], "--val-split must be in [0, 1), got 1"),
        (["--val-split", "-0.1"], "--val-split must be in [0, 1)"),
        (["--explore", "0.5"], "--explore must be in [0, 0.5), got 0.5"),
        (["--gate-bias", "inf"], "--gate-bias must be finite, got inf"),
        (["--keep", "2"], "--keep must be in [0, 1]"),
        (["--momentum", "1"], "--momentum must be in [0, 1)"),
        (["--limit-train", "0"], "--limit-train must be positive"),
        (["--skip-budget", "1"], "--skip-budget must be in (0, 1), got 1"),
        (["--skip-budget", "0.3", "--alpha-lr", "0"], "--alpha-lr must be positive"),
        (["--skip-budget", "0.3", "--skip-target", "0.3"], "--skip-budget and --skip-target are alternatives"),
        (["--skip-budget", "0.3"], "--skip-budget changes the HRL/RL"),
        (["--skip-reward", "correct"], "--skip-reward changes the HRL/RL"),
        (["--image-size", "4"], "--image-size 4 is too small for tiny_rnn_gate_14"),
    ],
)
def test_invalid_options_are_one_line_errors(run, capsys, tmp_path, extra, needle) -> None:
    out = tmp_path / "out"
    length = [] if extra[0] in ("--epochs", "--iters") else ["--iters", "1"]
    rc, _, err = run_cli(capsys, [*run["base"], *length, *extra, "--out", str(out)])
    assert_one_line_error(rc, err, "train", needle)
    assert not out.exists()


def test_input_too_small_for_imagenet_arch(run, capsys, tmp_path) -> None:
    argv = ["train", "imagenet_rnn_gate_34", "--stage", "sp", "--data", run["data"], "--image-size", "16"]
    rc, _, err = run_cli(capsys, [*argv, "--iters", "1", "--out", str(tmp_path / "o")])
    assert_one_line_error(rc, err, "train", "--image-size 16 is too small for imagenet_rnn_gate_34")
    assert "at least 32x32" in err
    rc, _, err = run_cli(capsys, ["flops", "imagenet_resnet_50", "--image-size", "16"])
    assert_one_line_error(rc, err, "flops", "at least 32x32")


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("tiny_rnn_gat_14", "did you mean tiny_rnn_gate_14"),
        ("cifar10_resnet110", "cifar10_resnet_110"),
        ("imagenet_rnn_gate_100", "imagenet_rnn_gate_101"),
        ("completely_different", None),
    ],
)
def test_unknown_architecture_suggests_close_names(run, capsys, tmp_path, name, suggestion) -> None:
    rc, _, err = run_cli(
        capsys, ["train", name, "--stage", "base", "--data", run["data"], "--out", str(tmp_path / "o")]
    )
    assert_one_line_error(rc, err, "train", f"unknown architecture {name!r}")
    if suggestion:
        assert suggestion in err
    else:
        assert "did you mean" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("setup", "resume", "needle"),
    [
        ("metrics.jsonl", False, "already holds a run (metrics.jsonl); pass --resume"),
        ("summary.json", False, "already holds a run (summary.json); pass --resume"),
        ("file", False, "is a file, not a run directory"),
        ("best.pt", True, "holds a best.pt but no last.pt to continue from"),
    ],
)
def test_run_directory_mistakes(run, capsys, tmp_path, setup, resume, needle) -> None:
    out = tmp_path / "out"
    if setup == "empty_dir":
        out.mkdir()
    elif setup == "file":
        out.write_text("x")
    elif setup.endswith(".pt"):  # as skipnet writes them (a user's own file of that name is refused otherwise)
        out.mkdir()
        torch.save({"step": 1}, out / setup)
    elif setup != "nothing":
        out.mkdir()
        (out / setup).write_text('{"step": 1, "stage": "hrl", "arch": "tiny_rnn_gate_14"}\n')
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else None
    rc, _, err = run_cli(capsys, [*run["argv"], "--out", str(out), *(["--resume"] if resume else [])])
    assert_one_line_error(rc, err, "train", needle)
    if before is not None:  # nothing overwritten or added (but the run directory's lock file)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".lock"} == before
    else:
        assert not out.exists() or out.is_file()


@pytest.mark.parametrize(
    ("arch", "classes", "needle"),
    [
        ("cifar10_resnet_8", 3, "is cifar10_resnet_8 (cifar, depth 8, width 16, 3 classes), which does not match"),
        ("tiny_resnet_14", 5, "was trained for 5 classes but this data has 3"),
    ],
)
def test_init_from_a_mismatched_checkpoint(run, capsys, tmp_path, arch, classes, needle) -> None:
    init = tmp_path / "other.pt"
    save_checkpoint(init, create_model(arch, num_classes=classes))
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, [*run["argv"], "--init", str(init), "--out", str(out)])
    assert_one_line_error(rc, err, "train", needle)
    assert not out.exists()


def test_eval_on_data_with_another_class_count(run, capsys, tmp_path) -> None:
    two = make_folder(tmp_path / "two", classes=("a", "b"), n_train=2, n_test=2)
    rc, _, err = run_cli(capsys, ["eval", str(run["ckpt"]), "--data", str(two)])
    assert_one_line_error(rc, err, "eval", "was trained for 3 classes but two has 2 class folders")


def test_eval_on_data_whose_classes_have_other_names(run, capsys, tmp_path) -> None:
    """Same class count, other folder names: the labels would mean other classes, and the accuracy be silently
    wrong, so it is refused (the checkpoint records its class names)."""
    renamed = make_folder(tmp_path / "renamed", classes=("a", "b", "x"), n_train=2, n_test=2)
    for cmd in ("eval", "calibrate"):
        argv = [cmd, str(run["ckpt"]), "--data", str(renamed)]
        if cmd == "calibrate":
            argv += ["--out", str(tmp_path / "cal.pt"), "--target-reduction", "10"]
        rc, _, err = run_cli(capsys, argv)
        assert_one_line_error(rc, err, cmd, "was trained with class 2 named 'c' but renamed names it 'x'")
    assert not (tmp_path / "cal.pt").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--threshold", "1.2"], "--threshold must be in [0, 1]"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--limit", "-3"], "--limit must be positive"),
    ],
)
def test_eval_invalid_options(run, capsys, extra, needle) -> None:
    rc, _, err = run_cli(capsys, ["eval", str(run["ckpt"]), "--data", run["data"], *extra])
    assert_one_line_error(rc, err, "eval", needle)


def test_invalid_option_in_a_real_process(run, tmp_path) -> None:
    """The console path end to end: stderr is exactly one line, exit status 2, no traceback, nothing written."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "skipnet", *run["argv"], "--alpha", "-1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=patience(120),
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["skipnet train: error: --alpha must be >= 0, got -1"]
    assert not out.exists()


def test_get_config_error_is_a_skipnet_error() -> None:
    with pytest.raises(SkipnetError, match="did you mean tiny_rnn_gate_14"):
        get_config("tiny_rnn_gates_14")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/r/metrics.jsonl"),
            "No space left on device (/r/metrics.jsonl)",
        ),
        (OSError(errno.EACCES, "Permission denied", "/r"), "Permission denied (/r)"),
        (OSError(errno.EROFS, "Read-only file system", "/r"), "Read-only file system (/r)"),
        (
            SkipnetError(
                "Caught SkipnetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                '  File "x.py", line 1, in f\nskipnet.errors.SkipnetError: 50 consecutive images under /d are corrupt'
            ),
            "50 consecutive images under /d are corrupt",
        ),
        (SkipnetError("two\nlines"), "two lines"),
    ],
)
def test_cli_prints_environment_errors_as_one_line(capsys, monkeypatch, exc, expected) -> None:
    def fail(args):
        raise exc

    monkeypatch.setattr("skipnet.commands.models.run", fail)
    rc, _, err = run_cli(capsys, ["models"])
    assert_one_line_error(rc, err, "models", expected)
    assert err.strip().endswith(expected)


def test_cli_lets_unexpected_os_errors_through(monkeypatch) -> None:
    """An I/O error that is not the user's to fix keeps its traceback (it is a bug report, not a usage error)."""

    def fail(args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("skipnet.commands.models.run", fail)
    with pytest.raises(OSError, match="Input/output error"):
        main(["models"])


def test_an_export_never_replaces_a_file_made_while_it_ran_without_force(run, capsys, tmp_path, monkeypatch) -> None:
    """Two exports to one OUT at once: the existence check comes first, the write last; the second must not
    replace the first's file without --force (the final rename is a no-replace link)."""
    from skipnet.fileio import atomic_write

    out = tmp_path / "model.safetensors"
    real = fileio.fault_point

    def another_export_finishes(label: str) -> None:  # the other process's file appears before ours is renamed
        if label == "fsync model.safetensors" and not out.exists():
            out.write_bytes(b"the other export")
        real(label)

    monkeypatch.setattr(fileio, "fault_point", another_export_finishes)
    rc, _, err = run_cli(capsys, ["export", str(run["ckpt"]), str(out)])
    assert_one_line_error(rc, err, "export", "was written by another process meanwhile")
    assert out.read_bytes() == b"the other export" and temps(tmp_path) == []
    assert run_cli(capsys, ["export", str(run["ckpt"]), str(out), "--force"])[0] == 0  # --force replaces
    assert load_checkpoint(out)["arch"]["name"] == "tiny_rnn_gate_14"
    monkeypatch.setattr(fileio, "fault_point", real)
    with pytest.raises(FileExistsError):
        atomic_write(out, lambda f: f.write(b"x"), replace=False)
    atomic_write(tmp_path / "new.bin", lambda f: f.write(b"x"), replace=False)
    assert (tmp_path / "new.bin").read_bytes() == b"x" and temps(tmp_path) == []


@pytest.mark.parametrize(
    ("out", "needle"),
    [("a.png/p.csv", "a parent of it is a file"), ("/proc/p.csv", "cannot write in /proc")],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(capsys, tmp_path, out, needle) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    target = out if out.startswith("/") else str(tmp_path / out)
    for argv in (
        ["predict", "pretrained:cifar10_resnet_20", str(tmp_path / "a.png"), "--out", target],
        ["export", "pretrained:cifar10_resnet_20", target.replace(".csv", ".onnx")],
    ):
        rc, _, err = run_cli(capsys, argv)
        assert_one_line_error(rc, err, argv[0], needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
