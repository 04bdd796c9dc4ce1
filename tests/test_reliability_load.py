"""Loading hostile checkpoints: bounds on every architecture field (no memory exhaustion from a small file or a
name), malformed contents as one line in every command, and a fuzz test of .pt and .safetensors loading."""

from __future__ import annotations

import json
import math
import os
import random
import resource
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import one_line_error
from skipnet import SkipnetError
from skipnet.checkpoint import export_safetensors, load_checkpoint, load_model, make_checkpoint
from skipnet.cli import main
from skipnet.config import LIMITS, ArchConfig
from skipnet.registry import create_model, get_config

ARCH = "tiny_rnn_gate_14"


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("load")
    pt, st = root / "ok.pt", root / "ok.safetensors"
    torch.manual_seed(0)
    data = {"mean": [0.5] * 3, "std": [0.25] * 3, "val_split": 0.2}
    ckpt = make_checkpoint(create_model(ARCH, num_classes=10), step=3, data=data)
    torch.save(ckpt, pt)
    export_safetensors(ckpt, st)
    return {"root": root, "pt": pt, "st": st, "ckpt": ckpt}


# ------------------------------------------------------------------------------------------ bounds (defect 7)
@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("depth", 1_200_002, "depth must be in [1, 2000]"),
        ("width", 100_000, "width must be in [1, 1024]"),
        ("num_classes", 10**9, "num_classes must be in [1, 100000]"),
        ("image_size", 10**6, "image_size must be in [1, 4096]"),
        ("rnn_hidden", 10**7, "rnn_hidden must be in [1, 1024]"),
        ("in_channels", 10**4, "in_channels must be in [1, 64]"),
        ("depth", "14", "depth must be an integer"),
        ("width", 8.0, "width must be an integer"),
        ("gate", 3, "gate must be a string"),
    ],
)
def test_every_architecture_field_is_bounded_before_building(field, value, needle) -> None:
    arch = get_config(ARCH).to_dict() | {field: value}
    with pytest.raises(SkipnetError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        ArchConfig.from_dict(arch)


def test_weight_count_is_bounded_as_well() -> None:
    arch = get_config(ARCH).to_dict() | {"depth": 1202, "width": 512}  # each field in range, 1.3e10 weights
    with pytest.raises(SkipnetError, match="more than the 3e\\+08 skipnet builds"):
        ArchConfig.from_dict(arch)
    assert set(LIMITS) == {"depth", "num_classes", "image_size", "width", "rnn_embed", "rnn_hidden", "in_channels"}


def test_huge_depth_in_a_name_is_one_line(tmp_path, capsys) -> None:
    argv = ["train", "cifar10_rnn_gate_600000002", "--stage", "sp", "--data", "digits", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "depth must be in [1, 2000], got 600000002" in one_line_error(capsys, "train")
    assert main([*argv[:1], "cifar10_rnn_gate_" + "9" * 5000, *argv[2:]]) == 2
    assert "unknown architecture" in one_line_error(capsys, "train")


def test_huge_depth_in_safetensors_metadata_is_one_line(valid, tmp_path, capsys) -> None:
    bad = tmp_path / "deep.safetensors"
    export_safetensors(valid["ckpt"] | {"arch": valid["ckpt"]["arch"] | {"depth": 1_200_002}}, bad)
    assert bad.stat().st_size < 300_000
    assert main(["eval", str(bad), "--data", "digits"]) == 2
    assert "depth must be in [1, 2000], got 1200002" in one_line_error(capsys, "eval")


# ------------------------------------------------------------------------------------------ malformed (defect 8)
def _mutations(ckpt: dict) -> dict[str, dict]:
    sd = ckpt["state_dict"]
    first = next(iter(sd))
    return {
        "missing tensor": ckpt | {"state_dict": {k: v for k, v in sd.items() if k != first}},
        "extra tensor": ckpt | {"state_dict": sd | {"extra.weight": torch.zeros(3)}},
        "wrong shape": ckpt | {"state_dict": sd | {first: torch.zeros(2, 2)}},
        "bogus mode": ckpt | {"mode": "bogus"},
        "no arch": {k: v for k, v in ckpt.items() if k != "arch"},
        "nan threshold": ckpt | {"threshold": math.nan},
    }


NEEDLES = {
    "missing tensor": "does not hold the weights of its architecture",
    "extra tensor": "does not hold the weights of its architecture",
    "wrong shape": "does not hold the weights of its architecture",
    "bogus mode": "gate mode 'bogus'",
    "no arch": "has no architecture record",
    "nan threshold": "threshold nan; it must be a number in [0, 1]",
}


@pytest.mark.parametrize("case", list(NEEDLES))
def test_malformed_checkpoint_is_one_line_in_every_command(valid, tmp_path, capsys, case) -> None:
    path = tmp_path / "bad.pt"
    torch.save(_mutations(valid["ckpt"])[case], path)
    for argv in (
        ["eval", str(path), "--data", "digits"],
        ["calibrate", str(path), "--data", "digits", "--target-reduction", "10", "--out", str(tmp_path / "c.pt")],
        ["analyze", str(path), "--data", "digits", "--out", str(tmp_path / "an")],
        ["bench", str(path)],
        ["export", str(path), str(tmp_path / "x.safetensors")],
    ):
        assert main(argv) == 2, argv
        assert NEEDLES[case] in one_line_error(capsys, argv[0])
    assert not [p.name for p in tmp_path.iterdir() if p.name != "bad.pt"]  # nothing written


def test_nan_threshold_in_safetensors_metadata_is_refused(valid, tmp_path) -> None:
    raw = valid["st"].read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["threshold"] = "nan"
    blob = json.dumps(header).encode()
    bad = tmp_path / "nan.safetensors"
    bad.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])
    with pytest.raises(SkipnetError, match="fails the checksum"):  # an edited header
        load_checkpoint(bad)
    export_safetensors(valid["ckpt"] | {"threshold": math.nan}, bad)  # written so, with a valid checksum
    with pytest.raises(SkipnetError, match="threshold nan"):
        load_checkpoint(bad)


def test_malformed_resume_checkpoint_is_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    base = ["train", ARCH, "--stage", "sp", "--data", "digits", "--batch-size", "16", "--threads", "1"]
    argv = [*base, "--limit-train", "64", "--limit-test", "32", "--iters", "2", "--out", str(out)]
    assert main(argv) == 0
    good = load_checkpoint(out / "last.pt")
    for bad, needle in (
        (good | {"optimizer": {"state": {}, "param_groups": []}}, "cannot be resumed by this run"),
        (good | {"train_config": {"lr": 0.1}}, "has no usable run configuration"),
        (_mutations(good)["wrong shape"], "cannot be resumed by this run"),
    ):
        torch.save(bad, out / "last.pt")
        capsys.readouterr()
        assert main([*argv, "--resume"]) == 2
        assert needle in one_line_error(capsys, "train")


def test_checkpoint_on_data_with_another_channel_count(valid, tmp_path, capsys) -> None:
    """A 3-channel checkpoint on the 1-channel digits (the same check refuses 1 channel on 3)."""
    for argv in (
        ["eval", str(valid["pt"]), "--data", "digits"],
        [
            "calibrate",
            str(valid["pt"]),
            "--data",
            "digits",
            "--target-reduction",
            "10",
            "--out",
            str(tmp_path / "c.pt"),
        ],
        ["analyze", str(valid["pt"]), "--data", "digits", "--out", str(tmp_path / "an")],
    ):
        assert main(argv) == 2
        assert "takes 3-channel images but digits has 1-channel ones" in one_line_error(capsys, argv[0])


def test_calibrate_out_mistakes(valid, tmp_path, capsys) -> None:
    existing = tmp_path / "last.pt"
    existing.write_bytes(b"resume state")
    common = ["calibrate", str(valid["pt"]), "--data", "digits", "--target-reduction", "10"]
    assert main([*common, "--out", str(existing)]) == 2
    assert "exists; pass --force" in one_line_error(capsys, "calibrate")
    assert existing.read_bytes() == b"resume state"
    assert main([*common, "--out", str(tmp_path)]) == 2
    assert "is a directory" in one_line_error(capsys, "calibrate")


# ------------------------------------------------------------------------------------------ fuzz
WEIRD = [0, -1, 2**31, 10**12, 1.5, math.nan, math.inf, "x", "", None, [], {}, True, "14" * 40]


def _mutate_pt(ckpt: dict, rng: random.Random) -> dict | bytes:
    c = dict(ckpt)
    sd = dict(c["state_dict"])
    key = rng.choice(sorted(sd))
    kind = rng.randrange(9)
    if kind == 0:
        del sd[key]
    elif kind == 1:
        sd[key + rng.choice(["", ".x"]) + "_renamed"] = sd.pop(key)
    elif kind == 2:
        sd[key] = torch.zeros([rng.randrange(1, 5) for _ in range(rng.randrange(0, 4))])
    elif kind == 3:
        sd[key] = rng.choice(WEIRD)
    elif kind == 4:
        c["arch"] = dict(c["arch"]) | {rng.choice(sorted(c["arch"])): rng.choice(WEIRD)}
    elif kind == 5:
        c[rng.choice(["threshold", "keep_ratio", "mode", "step", "format_version"])] = rng.choice(WEIRD)
    elif kind == 6:
        del c[rng.choice(["arch", "state_dict", "kind"])]
    elif kind == 7:
        sd[key] = sd[key].to(rng.choice([torch.float16, torch.int64, torch.bool]))
    else:
        c["arch"] = rng.choice(WEIRD)
    c["state_dict"] = sd
    return c


def _mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return raw[: rng.randrange(len(raw))]
    b = bytearray(raw)
    for _ in range(rng.randrange(1, 16)):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def _mutate_st(valid: dict, rng: random.Random, path: Path) -> None:
    ckpt = valid["ckpt"]
    kind = rng.randrange(4)
    if kind == 0:  # metadata values
        raw = valid["st"].read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        meta = header["__metadata__"]
        field = rng.choice(sorted(meta) + ["arch_field"])
        if field == "arch_field":
            arch = json.loads(meta["arch"])
            arch[rng.choice(sorted(arch))] = rng.choice(WEIRD)
            meta["arch"] = json.dumps(arch)
        else:
            meta[field] = rng.choice(["nan", "-1", "1e400", "abc", "{}", "[1]", "", json.dumps(rng.choice(WEIRD))])
        blob = json.dumps(header).encode()
        path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])
    elif kind == 1:  # tensor names and shapes
        mutated = _mutate_pt(ckpt, rng)
        sd = mutated["state_dict"] if isinstance(mutated, dict) and isinstance(mutated.get("state_dict"), dict) else {}
        sd = {k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}
        raw = valid["st"].read_bytes()
        meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
        save_file(sd, path, metadata=meta)
    else:  # truncation, flipped bytes
        path.write_bytes(_mutate_bytes(valid["st"].read_bytes(), rng))


def _load_all(paths: list[Path], original: dict, report: int) -> None:
    """In the forked child: load every file with bounded memory; one JSON line per file into ``report``."""
    status = Path("/proc/self/status").read_text()
    vm = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB more, at most
    for p in paths:
        try:
            model, _ = load_model(p)  # loaded: the weights must be the valid file's (or their float16 rounding)
            same = all(
                torch.equal(v, original[k]) or torch.equal(v, original[k].half().to(v.dtype))
                for k, v in model.state_dict().items()
            )
            result = {"ok": same, "error": None if same else "loaded other weights"}
        except SkipnetError as exc:
            result = {"ok": True, "error": str(exc)}
        except BaseException as exc:  # noqa: BLE001 - what the test looks for
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        os.write(report, (json.dumps({"path": p.name} | result) + "\n").encode())


def test_fuzzed_checkpoints_give_one_line_or_a_working_model(valid, tmp_path) -> None:
    rng = random.Random(16)
    paths = []
    raw_pt = valid["pt"].read_bytes()
    for i in range(60):
        p = tmp_path / f"f{i}.pt"
        if i % 3 == 2:
            p.write_bytes(_mutate_bytes(raw_pt, rng))
        else:
            torch.save(_mutate_pt(valid["ckpt"], rng), p)
        paths.append(p)
    for i in range(60):
        p = tmp_path / f"f{i}.safetensors"
        _mutate_st(valid, rng, p)
        paths.append(p)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            signal.alarm(120)  # a hang ends the child (and fails the test)
            _load_all(paths, valid["ckpt"]["state_dict"], w)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        lines = [json.loads(ln) for ln in f]
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the loader died: status {status}"
    assert len(lines) == len(paths)
    bad = [ln for ln in lines if not ln["ok"] or (ln["error"] and "\n" in ln["error"])]
    assert not bad, bad[:5]
    refused = sum(1 for ln in lines if ln["error"])
    assert 60 < refused < len(paths)  # most mutations are refused; some (a new name, a step count) load fine


def test_calibrate_to_safetensors_writes_an_export_that_eval_reads(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    base = ["train", ARCH, "--stage", "sp", "--data", "digits", "--batch-size", "16", "--threads", "1"]
    assert main([*base, "--limit-train", "64", "--limit-test", "32", "--iters", "2", "--out", str(run)]) == 0
    out = tmp_path / "cal.safetensors"
    cal = ["calibrate", str(run / "best.pt"), "--data", "digits", "--target-reduction", "5", "--margin", "0"]
    assert main([*cal, "--limit", "32", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["source_format"] == "safetensors" and ckpt["calibration"]["threshold"] == ckpt["threshold"]
    capsys.readouterr()
    assert main(["eval", str(out), "--data", "digits", "--limit", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == ckpt["threshold"]
    assert main([*cal, "--limit", "32", "--out", str(out)]) == 2  # now it exists
    assert "exists; pass --force" in one_line_error(capsys, "calibrate")


def test_all_skip_threshold_written_by_calibrate_loads(valid, tmp_path, capsys) -> None:
    """A budget no threshold in [0, 1] meets makes calibrate write the all-skip threshold; eval must take it (it
    refused it once: calibrate wrote a checkpoint its own eval rejected). Any other value above 1 is refused."""
    from skipnet.policy import ALL_SKIP_THRESHOLD

    good, bad = tmp_path / "all_skip.pt", tmp_path / "above.pt"
    torch.save(valid["ckpt"] | {"threshold": ALL_SKIP_THRESHOLD}, good)
    torch.save(valid["ckpt"] | {"threshold": 1.02}, bad)
    assert load_checkpoint(good)["threshold"] == ALL_SKIP_THRESHOLD
    model, _ = load_model(good)
    size = model.config.image_size
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert not out.trace.decisions.any()  # no gated block runs
    assert main(["eval", str(bad), "--data", "digits"]) == 2
    assert "threshold 1.02; it must be a number in [0, 1] or 1.01" in one_line_error(capsys, "eval")


# ------------------------------------------------------------------------------ safetensors header checksum
def _rewrite_header(src: Path, dst: Path, edit) -> None:
    """Copy ``src`` to ``dst`` with its header JSON changed by ``edit(header)``; the data section unchanged."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    dst.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])


def _swap_same_shape(header: dict) -> None:
    by_shape: dict = {}
    for name, entry in sorted(header.items()):
        if name != "__metadata__":
            by_shape.setdefault((entry["dtype"], tuple(entry["shape"])), []).append(name)
    a, b = next(v for v in by_shape.values() if len(v) > 1)[:2]
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]


def _set_meta(key: str, change):
    def edit(header: dict) -> None:
        header["__metadata__"][key] = change(header["__metadata__"][key])

    return edit


HEADER_EDITS = {
    "swapped tensors": _swap_same_shape,
    "threshold 0.5 -> 0.9": _set_meta("threshold", lambda v: "0.9"),
    "a digit of the mean": _set_meta("data", lambda v: v.replace("0.5", "0.6", 1)),
    "mode": _set_meta("mode", lambda v: "all_on"),
    "arch renamed": _set_meta("arch", lambda v: v.replace('"name": "', '"name": "x', 1)),
    "stage": _set_meta("stage", lambda v: "hrl"),
    "a metadata entry added": lambda h: h["__metadata__"].update({"note": "x"}),
    "a metadata entry removed": lambda h: h["__metadata__"].pop("step"),
    "dtype entry": lambda h: h[sorted(k for k in h if k != "__metadata__")[0]].update({"dtype": "I32"}),
}


@pytest.mark.parametrize("case", list(HEADER_EDITS))
def test_an_edited_safetensors_header_fails_its_checksum(valid, tmp_path, capsys, case) -> None:
    """Issue 33: the checksum covered the data section only; two swapped same-shape tensors or an edited
    threshold or mean loaded silently. Header and data are hashed together now, in every command."""
    bad = tmp_path / "edited.safetensors"
    _rewrite_header(valid["st"], bad, HEADER_EDITS[case])
    with pytest.raises(SkipnetError, match="fails the checksum|not a readable safetensors") as exc:
        load_checkpoint(bad)
    assert "\n" not in str(exc.value)
    for argv in (["eval", str(bad), "--data", "digits"], ["export", str(bad), str(tmp_path / "x.safetensors")]):
        assert main(argv) == 2
        one_line_error(capsys, argv[0])


def test_a_repeated_header_key_is_refused(valid, tmp_path) -> None:
    raw = valid["st"].read_bytes()
    n = int.from_bytes(raw[:8], "little")
    text = raw[8 : 8 + n].decode().rstrip()
    blob = (text[:-1] + ',"__metadata__":{"format":"skipnet"}}').encode()  # a second metadata object
    bad = tmp_path / "twice.safetensors"
    bad.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + n :])
    with pytest.raises(SkipnetError):
        load_checkpoint(bad)


def test_an_export_of_the_old_format_still_loads_and_checks_its_data(valid, tmp_path, caplog) -> None:
    """A file written before the header checksum (``data_sha256`` only) loads, with a warning that its header is
    not verified; its data section is still checked."""
    old = tmp_path / "old.safetensors"
    _rewrite_header(valid["st"], old, lambda h: h["__metadata__"].pop("sha256"))
    with caplog.at_level("WARNING", logger="skipnet.checkpoint"):
        ckpt = load_checkpoint(old)
    assert ckpt["threshold"] == valid["ckpt"]["threshold"] and "not verified" in caplog.text
    raw = bytearray(old.read_bytes())
    raw[-3] ^= 0xFF
    old.write_bytes(bytes(raw))
    with pytest.raises(SkipnetError, match="tensor data fails the checksum"):
        load_checkpoint(old)


def test_shipped_models_carry_the_header_checksum() -> None:
    from skipnet.pretrained import pretrained_path, read_index

    for name in read_index():
        path = pretrained_path(name)
        raw = path.read_bytes()
        meta = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
        assert "sha256" in meta and "data_sha256" in meta, name
        load_checkpoint(f"pretrained:{name}")


# ------------------------------------------------------------------------------ data and arch records (issue 33)
def _record_cases(ckpt: dict) -> dict[str, tuple[dict, str]]:
    data, sd = ckpt["data"], ckpt["state_dict"]
    one_channel = make_checkpoint(create_model(ARCH, num_classes=10, in_channels=1), data=data | {"mean": [0.5] * 3})
    return {
        "std 0": (ckpt | {"data": data | {"std": [0.0] * 3}}, "must be > 0"),
        "std nan": (ckpt | {"data": data | {"std": [math.nan] * 3}}, "is not a list of finite numbers"),
        "mean abc": (ckpt | {"data": data | {"mean": "abc"}}, "mean 'abc' is not a list of finite numbers"),
        "mean of 3 on 1 channel": (one_channel, "mean has 3 values but the network takes 1-channel images"),
        "data null": (ckpt | {"data": None}, "malformed data record: NoneType None"),
        "data list": (ckpt | {"data": [1, 2]}, "malformed data record: list"),
        "val_split [1]": (ckpt | {"data": data | {"val_split": [1]}}, "val_split [1] must be a fraction"),
        "classes": (ckpt | {"data": data | {"classes": ["a", "b"]}}, "classes must be 10 names"),
        "image_size 4096": (
            ckpt | {"arch": ckpt["arch"] | {"image_size": 4096}, "data": data | {"image_size": 32}},
            "image_size 32 but the architecture's is 4096",
        ),
        "all-NaN weights": (
            ckpt
            | {"state_dict": {k: torch.full_like(v, math.nan) if v.is_floating_point() else v for k, v in sd.items()}},
            "holds non-finite weights or statistics",
        ),
    }


@pytest.mark.parametrize("case", list(_record_cases(make_checkpoint(create_model(ARCH), data={"mean": [0.5] * 3}))))
def test_a_malformed_data_record_is_one_line_in_every_command(valid, tmp_path, capsys, case) -> None:
    """Issue 33: std [0] or [NaN] evaluated at 11% with a NaN loss, an image size of 4096 counted 1e11 MACs for
    8-px digits, an all-NaN state dict evaluated silently, and null, list or "abc" records were tracebacks."""
    bad_ckpt, needle = _record_cases(valid["ckpt"])[case]
    for suffix in (".pt", ".safetensors") if case != "data null" else (".pt",):  # an export writes null as {}
        path = tmp_path / f"bad{suffix}"
        torch.save(bad_ckpt, path) if suffix == ".pt" else export_safetensors(bad_ckpt, path)
        for argv in (
            ["eval", str(path), "--data", "digits"],
            ["calibrate", str(path), "--data", "digits", "--target-reduction", "10", "--out", str(tmp_path / "c.pt")],
            ["analyze", str(path), "--data", "digits", "--out", str(tmp_path / "an")],
            ["bench", str(path)],
            ["export", str(path), str(tmp_path / "x.safetensors")],
        ):
            assert main(argv) == 2, argv
            assert needle in one_line_error(capsys, argv[0]), argv
        path.unlink()
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_checkpoint_for_another_image_size_is_refused_on_the_data(tmp_path, capsys) -> None:
    """No data record to compare with: the data itself (8-px digits) is compared with the network's size."""
    path = tmp_path / "big.pt"
    torch.save(make_checkpoint(create_model(ARCH, num_classes=10, in_channels=1, image_size=64)), path)
    assert main(["eval", str(path), "--data", "digits"]) == 2
    assert "is built for 64-px images but digits gives 8-px ones" in one_line_error(capsys, "eval")
