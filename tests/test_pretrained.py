"""Pretrained models (issue 20): the zoo written by benchmarks/make_pretrained.py, ``pretrained:NAME`` wherever a
checkpoint is read, ``create_model(..., pretrained=True)``, ``skipnet models --pretrained``, and
``save_pretrained`` / ``from_pretrained`` for users' own models. A tiny network stands in for the shipped ones."""

from __future__ import annotations

import importlib.util
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skipnet.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
from skipnet.cli import main
from skipnet.errors import SkipnetError
from skipnet.pretrained import ENV, create_model, from_pretrained, read_index, save_pretrained

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny.sp"  # not an architecture name: found by name, and by its architecture as the default


def _load_script():
    spec = importlib.util.spec_from_file_location("make_pretrained", REPO / "benchmarks" / "make_pretrained.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_folder(root: Path, classes: int = 3, n: int = 4) -> Path:
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 256, (32, 32, 3)).astype(np.uint8)).save(d / f"{i}.png")
    return root


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(1)
    model = create_model("tiny_rnn_gate_14", num_classes=3)
    model.threshold = 0.49  # its gates' probabilities are 0.486-0.495: some blocks run and some are skipped
    return model.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A zoo holding one tiny model, made by the real script; SKIPNET_PRETRAINED_DIR points at it."""
    root = tmp_path_factory.mktemp("pretrained")
    mp = pytest.MonkeyPatch()
    mp.setenv("SKIPNET_CACHE", str(root / "cache"))
    data = make_folder(root / "data")
    ckpt = root / "best.pt"
    save_checkpoint(ckpt, tiny_model(), data={"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]})
    zoo_dir = root / "zoo"
    command = f"skipnet train tiny_rnn_gate_14 --stage sp --data {data} --out runs/tiny"
    rc = _load_script().main([str(ckpt), NAME, "--data", str(data), "--command", command, "--zoo", str(zoo_dir)])
    assert rc == 0
    mp.setenv(ENV, str(zoo_dir))
    yield {"dir": zoo_dir, "data": str(data), "ckpt": ckpt, "root": root, "command": command}
    mp.undo()


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, command: str, needle: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"skipnet {command}: error: ") and needle in lines[0], lines[0]


def test_index_records_the_evaluation_command_and_file(zoo) -> None:
    entry = read_index()[NAME]
    assert entry["file"] == f"{NAME}.safetensors" and (zoo["dir"] / entry["file"]).stat().st_size == entry["bytes"]
    assert entry["arch"] == "tiny_rnn_gate_14" and entry["commands"] == [zoo["command"]]
    assert entry["images"] == 12 and entry["threshold"] == pytest.approx(0.49) and entry["latency_ratio"] is None
    assert 0.0 < entry["computation_percentage"] < 100.0  # some blocks skipped, some not: a real measurement
    results = (zoo["dir"] / "RESULTS.md").read_text()
    assert f"| `{NAME}` | tiny_rnn_gate_14 |" in results and zoo["command"] in results
    assert f"{entry['accuracy']:.2f}" in results and f"{entry['macs_reduction']:.1f}" in results


def test_eval_pretrained_reproduces_the_index_exactly(zoo, capsys) -> None:
    rc, out, err = run_cli(capsys, ["eval", f"pretrained:{NAME}", "--data", zoo["data"], "--json", "--device", "cpu"])
    assert rc == 0, err
    got, entry = json.loads(out), read_index()[NAME]
    for key in ("images", "accuracy", "macs_mean", "macs_all_on", "macs_reduction", "computation_percentage"):
        assert got[key] == entry[key], key
    assert got["checkpoint"] == f"pretrained:{NAME}"


def test_create_model_pretrained_matches_the_checkpoint(zoo) -> None:
    original = model_from_checkpoint(load_checkpoint(zoo["ckpt"]))
    x = torch.randn(6, 3, 32, 32)
    want = original(x, "greedy")
    for name in (NAME, "tiny_rnn_gate_14"):  # by name, and by architecture (the first entry of it)
        model = create_model(name, pretrained=True)
        assert not model.training and model.threshold == pytest.approx(0.49)
        out = model(x, "greedy")
        torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
        assert torch.equal(out.trace.decisions, want.trace.decisions)
    assert from_pretrained(NAME).config.name == "tiny_rnn_gate_14"
    assert from_pretrained(f"pretrained:{NAME}").threshold == pytest.approx(0.49)


def test_pretrained_mistakes_are_one_line(zoo, capsys, tmp_path, monkeypatch) -> None:
    with pytest.raises(SkipnetError, match=rf"no pretrained weights for 'cifar10_rnn_gate_38'; available: {NAME}"):
        create_model("cifar10_rnn_gate_38", pretrained=True)
    with pytest.raises(SkipnetError, match="without overrides \\(num_classes\\)"):
        create_model(NAME, pretrained=True, num_classes=5)
    rc, _, err = run_cli(capsys, ["eval", "pretrained:nope", "--data", zoo["data"]])
    assert_one_line_error(rc, err, "eval", f"no pretrained weights for 'nope'; available: {NAME}")
    rc, _, err = run_cli(capsys, ["export", "pretrained:", str(tmp_path / "x.safetensors")])
    assert_one_line_error(rc, err, "export", "names no model")
    assert not (tmp_path / "x.safetensors").exists()
    monkeypatch.setenv(ENV, str(tmp_path / "empty"))
    with pytest.raises(SkipnetError, match="no pretrained weights for 'tiny_rnn_gate_14'; no pretrained models are"):
        create_model("tiny_rnn_gate_14", pretrained=True)
    rc, out, _ = run_cli(capsys, ["models", "--pretrained"])
    assert rc == 0 and "no pretrained models are installed" in out


def test_damaged_or_missing_shipped_file_is_refused(zoo, tmp_path, monkeypatch, capsys) -> None:
    import shutil

    copy = tmp_path / "zoo"
    shutil.copytree(zoo["dir"], copy)
    monkeypatch.setenv(ENV, str(copy))
    weights = copy / f"{NAME}.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF
    weights.write_bytes(bytes(raw))
    rc, _, err = run_cli(capsys, ["eval", f"pretrained:{NAME}", "--data", zoo["data"]])
    assert_one_line_error(rc, err, "eval", "is damaged (SHA-256 differs from the index)")
    weights.unlink()
    with pytest.raises(SkipnetError, match=f"its file {NAME}.safetensors is missing"):
        create_model(NAME, pretrained=True)
    (copy / "index.json").write_text("{not json")
    rc, _, err = run_cli(capsys, ["models", "--pretrained"])
    assert_one_line_error(rc, err, "models", "is not readable JSON")


def test_models_pretrained_lists_the_zoo(zoo, capsys) -> None:
    entry = read_index()[NAME]
    rc, out, _ = run_cli(capsys, ["models", "--pretrained"])
    assert rc == 0
    row = next(line for line in out.splitlines() if line.startswith(NAME))
    assert "tiny_rnn_gate_14" in row and f"{entry['accuracy']:.2f}" in row
    rc, out, _ = run_cli(capsys, ["models", "--pretrained", "--json"])
    assert rc == 0 and json.loads(out) == read_index()


def test_make_pretrained_refuses_an_existing_name_and_bad_input(zoo, capsys) -> None:
    before = {p.name: p.read_bytes() for p in zoo["dir"].iterdir()}
    script = _load_script()
    base = [str(zoo["ckpt"]), NAME, "--data", zoo["data"], "--zoo", str(zoo["dir"])]
    assert script.main([*base, "--command", "skipnet train x"]) == 2
    assert "already in" in capsys.readouterr().err
    assert script.main([str(zoo["ckpt"]), "bad/name", "--data", zoo["data"], "--command", "c"]) == 2
    assert "use letters, digits" in capsys.readouterr().err
    assert script.main([str(zoo["root"] / "missing.pt"), "other", "--data", zoo["data"], "--command", "c"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in zoo["dir"].iterdir()} == before  # nothing written or left behind


def test_save_and_from_pretrained_round_trip(tmp_path) -> None:
    model = tiny_model()
    data = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}
    directory = save_pretrained(model, tmp_path / "mine", data=data)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((directory / "config.json").read_text())
    assert config["arch"]["name"] == "tiny_rnn_gate_14" and config["threshold"] == pytest.approx(0.49)
    back = from_pretrained(directory)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(back(x, "greedy").logits, model(x, "greedy").logits, rtol=0, atol=0)
    assert load_checkpoint(directory)["data"] == data  # any command also takes the directory as a checkpoint
    with pytest.raises(SkipnetError, match="already holds model.safetensors, config.json; pass overwrite=True"):
        save_pretrained(model, directory)
    save_pretrained(model, directory, overwrite=True)
    config["arch"]["depth"] = 20
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(SkipnetError, match="describes another architecture"):
        from_pretrained(directory)
    with pytest.raises(SkipnetError, match="is not a directory written by save_pretrained"):
        from_pretrained(tmp_path / "nothing" / "here")


def test_the_package_ships_its_zoo(monkeypatch) -> None:
    """The shipped index reads, every file it names is present with its checksum, and pyproject installs them."""
    monkeypatch.delenv(ENV, raising=False)
    from skipnet.pretrained import pretrained_path, zoo_dir

    assert zoo_dir() == REPO / "src" / "skipnet" / "pretrained" and (zoo_dir() / "index.json").is_file()
    for name in read_index():
        assert pretrained_path(name).is_file()
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["skipnet"]
    assert {"pretrained/*.safetensors", "pretrained/index.json", "pretrained/RESULTS.md"} <= set(data)


def test_every_checkpoint_command_takes_pretrained(zoo, capsys, tmp_path) -> None:
    """bench, export and train --init read pretrained:NAME like a file (they all load through load_checkpoint)."""
    from skipnet.checkpoint import load_model

    bench = ["bench", f"pretrained:{NAME}", "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    rc, out, err = run_cli(capsys, [*bench, "--json"])
    assert rc == 0, err
    assert json.loads(out)["source"] == "checkpoint" and json.loads(out)["arch"] == "tiny_rnn_gate_14"
    out_file = tmp_path / "copy.safetensors"
    rc, _, err = run_cli(capsys, ["export", f"pretrained:{NAME}", str(out_file)])
    assert rc == 0, err
    x = torch.randn(3, 3, 32, 32)
    want = create_model(NAME, pretrained=True)(x, "greedy").logits
    torch.testing.assert_close(load_model(out_file)[0](x, "greedy").logits, want, rtol=0, atol=0)
    train = ["train", "tiny_rnn_gate_14", "--stage", "hrl", "--init", f"pretrained:{NAME}", "--data", zoo["data"]]
    rc, _, err = run_cli(
        capsys, [*train, "--iters", "1", "--batch-size", "4", "--threads", "1", "--out", str(tmp_path / "r")]
    )
    assert rc == 0, err
    assert load_checkpoint(tmp_path / "r" / "last.pt")["train_config"]["init"] == f"pretrained:{NAME}"


# ------------------------------------------------------------------------------------------ safetensors reader
def test_safetensors_are_read_with_safe_open_not_whole_files(tmp_path, monkeypatch) -> None:
    """checkpoint.load_safetensors takes the metadata and tensors from safetensors' own reader: it works with
    Path.read_bytes disabled, gives the exported tensors bit for bit, and still refuses a damaged data section
    and a truncated file in one line."""
    from skipnet.checkpoint import export_safetensors

    model = tiny_model()
    out = tmp_path / "m.safetensors"
    export_safetensors(make_checkpoint(model, data={"mean": [0.5] * 3, "std": [0.25] * 3}), out)
    raw = out.read_bytes()

    def no_whole_reads(self):
        raise AssertionError(f"read_bytes({self})")

    monkeypatch.setattr(Path, "read_bytes", no_whole_reads)
    ckpt = load_checkpoint(out)
    assert ckpt["data"]["std"] == [0.25] * 3 and ckpt["threshold"] == pytest.approx(0.49)
    own = model.state_dict()
    assert set(ckpt["state_dict"]) == set(own)
    assert all(torch.equal(v, own[k]) and v.dtype == own[k].dtype for k, v in ckpt["state_dict"].items())
    monkeypatch.undo()
    damaged = bytearray(raw)
    damaged[-1] ^= 0x01
    (tmp_path / "d.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(SkipnetError, match="tensor data fails the checksum"):
        load_checkpoint(tmp_path / "d.safetensors")
    (tmp_path / "t.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SkipnetError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "t.safetensors")


def test_command_of_run_repeats_the_run(tmp_path) -> None:
    """make_pretrained.py --from-run: a run's command, recorded (less --resume) or rebuilt from its options."""
    import shlex

    from skipnet.cli import build_parser
    from skipnet.commands.train import config_from_args
    from skipnet.train import TrainConfig

    command_of_run = _load_script().command_of_run

    cfg = TrainConfig(arch="tiny_rnn_gate_14", stage="hrl", data="some data", out="runs/x", init="runs/sp/best.pt")
    cfg.lr, cfg.alpha, cfg.nesterov, cfg.channels_last, cfg.epochs, cfg.gate_bias = 0.003, 1.5, True, False, 2.5, -1.0
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict() | {"arch_config": {}}))
    words = shlex.split(command_of_run(tmp_path))
    assert words[:3] == ["skipnet", "train", "tiny_rnn_gate_14"] and "--no-channels-last" in words
    assert config_from_args(build_parser().parse_args(words[1:])) == cfg
    recorded = {"command_line": "skipnet train tiny_rnn_gate_14 --stage sp --data 'a b' --out r --resume"}
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict() | {"environment": recorded}))
    assert command_of_run(tmp_path) == "skipnet train tiny_rnn_gate_14 --stage sp --data 'a b' --out r"
    # as recorded by ``python -m skipnet`` with an absolute --out inside the repository: repeated as a user would
    repo = Path(__file__).resolve().parents[1]
    recorded = {"command_line": f"/usr/lib/skipnet/__main__.py train tiny_14 --out {repo}/runs/x --data /d/c.tar"}
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict() | {"environment": recorded}))
    assert command_of_run(tmp_path) == "skipnet train tiny_14 --out runs/x --data /d/c.tar"


def test_make_pretrained_replaces_a_superseded_model(zoo, tmp_path, capsys) -> None:
    """--replaces OLD: the new model is recorded, then OLD's entry and file go (the package keeps its size); an OLD
    that is not shipped, or NAME itself, is refused before anything is written."""
    import shutil

    root = tmp_path / "zoo"
    shutil.copytree(zoo["dir"], root)
    script = _load_script()
    base = [str(zoo["ckpt"]), "tiny.next", "--data", zoo["data"], "--zoo", str(root), "--command", "skipnet train x"]
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    for old in ("no.such", "tiny.next"):
        assert script.main([*base, "--replaces", old]) == 2
        assert "not another model of" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in root.iterdir()} == before
    assert script.main([*base, "--replaces", NAME]) == 0
    index = json.loads((root / "index.json").read_text())["models"]
    assert list(index) == ["tiny.next"] and not (root / f"{NAME}.safetensors").exists()
    assert (root / "tiny.next.safetensors").exists() and NAME not in (root / "RESULTS.md").read_text()
    later = [str(zoo["ckpt"]), "tiny.third", "--data", zoo["data"], "--zoo", str(root)]
    assert script.main([*later, "--command", "skipnet train x --init pretrained:tiny.next"]) == 0
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    assert script.main([*base[:1], "tiny.fourth", *base[2:], "--replaces", "tiny.next"]) == 2
    assert "the commands of tiny.third start from it" in capsys.readouterr().err  # they could not be rerun
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before
