"""Every consumer runs a checkpoint in the mode it was trained and validated in (issue 33, "a silently wrong
answer"), and every report names the mode it used.

A gated architecture trained in stage ``base`` records mode ``all_on``: its gates were never trained. The fixture
makes them decide as untrained gates may (every gate's output bias at -30: greedy gates would skip every block), so
that a consumer that ran them greedily would report a different accuracy, a large MACs reduction and skip ratios of
1 instead of the run's own figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import one_line_error
from skipnet import SkipnetError
from skipnet.checkpoint import export_safetensors, load_checkpoint, load_model, make_checkpoint
from skipnet.cli import main
from skipnet.evaluate import eval_mode_for
from skipnet.gated import GateMode
from skipnet.pretrained import create_model, sha256_of

ARCH = "tiny_rnn_gate_14"
TRAIN = ["--data", "digits", "--iters", "20", "--batch-size", "32", "--threads", "1", "--seed", "0"]


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SKIPNET_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """``skipnet train tiny_rnn_gate_14 --stage base``, its best.pt with gates that would skip everything, and a
    safetensors export of that."""
    root = tmp_path_factory.mktemp("modes")
    run = root / "R"
    assert main(["train", ARCH, "--stage", "base", *TRAIN, "--out", str(run)]) == 0
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["mode"] == "all_on"
    ckpt["state_dict"]["gates.fc.bias"] = torch.full_like(ckpt["state_dict"]["gates.fc.bias"], -30.0)
    pt, st = root / "base.pt", root / "base.safetensors"
    torch.save(ckpt, pt)
    export_safetensors(ckpt, st)
    summary = json.loads((run / "summary.json").read_text())
    return {"root": root, "run": run, "pt": pt, "st": st, "ckpt": ckpt, "summary": summary}


def test_eval_mode_for_keeps_the_recorded_mode() -> None:
    gated = create_model(ARCH)
    assert eval_mode_for(gated) == GateMode.GREEDY
    for stored, used in [("all_on", "all_on"), ("random", "random"), ("greedy", "greedy"), ("hard", "greedy")]:
        gated.mode = GateMode(stored)
        assert eval_mode_for(gated) == GateMode(used), stored
    assert eval_mode_for(create_model("tiny_resnet_14")) == GateMode.ALL_ON


@pytest.mark.parametrize("kind", ["pt", "st"])
def test_eval_runs_a_base_checkpoint_with_every_block(base, capsys, kind) -> None:
    assert main(["eval", str(base[kind]), "--data", "digits", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "all_on"
    assert out["macs_reduction"] == 0.0 and out["computation_percentage"] == 100.0 and out["gate_macs_mean"] == 0.0
    assert out["skip_ratio_per_block"] == [0.0] * len(out["skip_ratio_per_block"])
    test = base["summary"]["test"] if "test" in base["summary"] else base["summary"]
    assert out["accuracy"] == pytest.approx(test["accuracy"], abs=1e-6)
    assert main(["eval", str(base[kind]), "--data", "digits"]) == 0
    assert "mode all_on" in capsys.readouterr().out.splitlines()[0]


def test_eval_names_an_explicit_mode_and_refuses_a_threshold_it_would_ignore(base, capsys) -> None:
    assert main(["eval", str(base["pt"]), "--data", "digits", "--json", "--mode", "greedy"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "greedy" and set(out["skip_ratio_per_block"]) == {1.0}  # the untrained gates, as asked
    assert main(["eval", str(base["pt"]), "--data", "digits", "--threshold", "0.3"]) == 2
    assert "runs in mode all_on" in one_line_error(capsys, "eval")


def test_calibrate_refuses_a_base_checkpoint(base, capsys, tmp_path) -> None:
    out = tmp_path / "c.pt"
    argv = ["calibrate", str(base["pt"]), "--data", "digits", "--target-reduction", "20", "--out", str(out)]
    assert main(argv) == 2
    assert "mode all_on, as it was trained in stage base" in one_line_error(capsys, "calibrate")
    assert not out.exists()


def test_analyze_refuses_a_base_checkpoint_and_runs_one_as_compare_point_with_every_block(base, capsys, tmp_path):
    assert main(["analyze", str(base["pt"]), "--data", "digits", "--out", str(tmp_path / "a")]) == 2
    assert "mode all_on" in one_line_error(capsys, "analyze")
    assert not (tmp_path / "a").exists()
    # as a --compare point of a gated checkpoint: run as it was validated, every block on, and labelled so
    sp = _sp_like(base, tmp_path)
    argv = ["analyze", str(sp), "--data", "digits", "--out", str(tmp_path / "b"), "--compare", str(base["pt"])]
    argv += ["--thresholds", "0.5", "--scales", "1", "--images", "2"]
    assert main(argv) == 0
    numbers = json.loads((tmp_path / "b" / "analysis.json").read_text())
    assert numbers["checkpoint"]["mode"] == "greedy"
    (point,) = numbers["others"]
    assert point["mode"] == "all_on" and point["computation_percentage"] == 100.0 and "all_on" in point["label"]


def _sp_like(base: dict, tmp_path: Path) -> Path:
    """The base checkpoint relabelled as a greedy SkipNet (gates at a bias that runs about half the blocks)."""
    ckpt = dict(base["ckpt"]) | {"mode": "greedy"}
    sd = dict(ckpt["state_dict"])
    sd["gates.fc.bias"] = torch.zeros_like(sd["gates.fc.bias"])
    ckpt["state_dict"] = sd
    path = tmp_path / "sp.pt"
    torch.save(ckpt, path)
    return path


def test_bench_refuses_to_time_untrained_gates(base, capsys) -> None:
    assert main(["bench", str(base["pt"]), "--repeats", "1", "--warmup", "0", "--batch-size", "4"]) == 2
    assert "mode all_on" in one_line_error(capsys, "bench")
    assert main(["bench", str(base["pt"]), "--runtime", "onnxruntime", "--repeats", "1"]) == 2
    assert "mode all_on" in one_line_error(capsys, "bench")
    argv = ["bench", str(base["pt"]), "--repeats", "1", "--warmup", "0", "--batch-size", "4", "--keep", "0.5"]
    assert main([*argv, "--json"]) == 0  # forced decisions, as asked, and named so
    assert json.loads(capsys.readouterr().out)["mode"] == "forced"


def test_bench_times_an_sdv_checkpoint_at_its_random_keep_ratio(tmp_path, capsys) -> None:
    model = create_model(ARCH).eval()
    model.mode, model.keep_ratio = GateMode.RANDOM, 0.75
    path = tmp_path / "sdv.pt"
    torch.save(make_checkpoint(model), path)
    argv = ["bench", str(path), "--repeats", "1", "--warmup", "0", "--batch-size", "64", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["mode"] == "random" and res["keep_requested"] == 0.75 and 0.6 < res["keep"] < 0.9
    assert main(["export", str(path), str(tmp_path / "x.onnx")]) == 2
    assert "mode random" in one_line_error(capsys, "export")


def test_export_writes_the_plain_graph_of_a_base_checkpoint(base, capsys, tmp_path) -> None:
    out = tmp_path / "x.pt2"
    assert main(["export", str(base["pt"]), str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["graph"] == "plain" and info["mode"] == "all_on"
    assert main(["export", str(base["pt"]), str(tmp_path / "y.pt2"), "--graph", "conditional"]) == 2
    assert "mode all_on" in one_line_error(capsys, "export")
    assert not (tmp_path / "y.pt2").exists()
    assert main(["export", str(base["pt"]), str(tmp_path / "z.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "all_on"
    assert load_checkpoint(tmp_path / "z.safetensors")["mode"] == "all_on"


def test_the_zoo_and_save_pretrained_keep_the_mode(base, tmp_path, monkeypatch, capsys) -> None:
    from skipnet.pretrained import from_pretrained, save_pretrained

    model, _ = load_model(base["pt"])
    saved = save_pretrained(model, tmp_path / "mine", data=base["ckpt"]["data"])
    again = from_pretrained(saved)
    assert again.mode == GateMode.ALL_ON
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(again(x).trace.decisions, torch.ones(2, again.num_gates))  # default forward: all on
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(config | {"mode": "greedy"}))
    with pytest.raises(SkipnetError, match="disagree on the gate mode"):
        from_pretrained(saved)
    # a zoo entry: evaluated in its recorded mode, and an index that names another mode is refused
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "b.safetensors").write_bytes(base["st"].read_bytes())
    entry = {"file": "b.safetensors", "arch": ARCH, "mode": "all_on", "sha256": sha256_of(zoo / "b.safetensors")}
    (zoo / "index.json").write_text(json.dumps({"format": 1, "models": {"b": entry}}))
    monkeypatch.setenv("SKIPNET_PRETRAINED_DIR", str(zoo))
    assert main(["eval", "pretrained:b", "--data", "digits", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "all_on"
    assert create_model("b", pretrained=True).mode == GateMode.ALL_ON
    (zoo / "index.json").write_text(json.dumps({"format": 1, "models": {"b": entry | {"mode": "greedy"}}}))
    assert main(["eval", "pretrained:b", "--data", "digits"]) == 2
    assert "disagree on the gate mode" in one_line_error(capsys, "eval")
