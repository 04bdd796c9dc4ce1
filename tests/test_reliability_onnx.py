"""``skipnet bench R.onnx --plain P.onnx`` compares a SkipNet with the plain ResNet of its own backbone only
(issue 33: with P exported from another checkpoint it reported an efficiency of 1.85)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import one_line_error
from skipnet.bench import calibrate_bn
from skipnet.checkpoint import save_checkpoint
from skipnet.cli import main
from skipnet.registry import create_model

onnx = pytest.importorskip("onnx", reason="the export extra (pip install -e '.[export]') is part of CI's dev extra")
pytest.importorskip("onnxruntime")

STATS = {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}
BENCH = ["--images", "2", "--repeats", "1", "--warmup", "0", "--json"]


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = create_model("tiny_rnn_gate_14")
    calibrate_bn(model, 32, seed=seed)
    with torch.no_grad():
        model.gates.fc.weight.mul_(20.0)
    save_checkpoint(path, model.eval(), data=STATS)
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints A and B (other weights, same architecture); A's conditional and routed graphs, the plain graphs
    of A and of B, and B's plain graph with the fingerprint taken out of its metadata."""
    root = tmp_path_factory.mktemp("onnx")
    a, b = _checkpoint(root / "a.pt", 0), _checkpoint(root / "b.pt", 1)
    out = {}
    for name, ckpt, graph in [("cond_a", a, "conditional"), ("routed_a", a, "routed"), ("plain_a", a, "plain")]:
        out[name] = root / f"{name}.onnx"
        assert main(["export", str(ckpt), str(out[name]), "--graph", graph, "--probes", "2"]) == 0
    out["plain_b"] = root / "plain_b.onnx"
    assert main(["export", str(b), str(out["plain_b"]), "--graph", "plain", "--probes", "2"]) == 0
    proto = onnx.load(str(out["plain_b"]))
    for prop in proto.metadata_props:
        if prop.key == "skipnet":
            old = ("backbone_sha256", "sha256")  # a file of an export before either was recorded
            prop.value = json.dumps({k: v for k, v in json.loads(prop.value).items() if k not in old})
    out["plain_b_old"] = root / "plain_b_old.onnx"
    onnx.save(proto, str(out["plain_b_old"]))
    return out


def test_the_plain_graph_of_the_same_checkpoint_is_accepted(graphs, capsys) -> None:
    for subject in ("cond_a", "routed_a"):
        batch = "1" if subject == "cond_a" else "2"
        argv = ["bench", str(graphs[subject]), "--plain", str(graphs["plain_a"]), "--batch-size", batch, *BENCH]
        assert main(argv) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["macs_plain"] > 0


@pytest.mark.parametrize(
    ("subject", "plain", "needle"),
    [
        ("cond_a", "plain_b", "holds other backbone weights"),
        ("routed_a", "plain_b", "holds other backbone weights"),
        ("cond_a", "plain_b_old", "computes other logits than the backbone"),  # no fingerprint: checked by outputs
        ("routed_a", "plain_b_old", "cannot tell whether --plain"),
    ],
)
def test_the_plain_graph_of_another_checkpoint_is_refused(graphs, capsys, subject, plain, needle) -> None:
    batch = "1" if subject == "cond_a" else "2"
    argv = ["bench", str(graphs[subject]), "--plain", str(graphs[plain]), "--batch-size", batch, *BENCH]
    assert main(argv) == 2
    assert needle in one_line_error(capsys, "bench")


def test_a_checkpoint_benched_in_onnxruntime_checks_its_plain_graph_too(graphs, capsys) -> None:
    ckpt = graphs["cond_a"].parent / "a.pt"
    argv = ["bench", str(ckpt), "--runtime", "onnxruntime", "--batch-size", "2", "--plain", str(graphs["plain_b"])]
    assert main([*argv, *BENCH]) == 2
    assert "holds other backbone weights" in one_line_error(capsys, "bench")


def test_a_routed_graph_is_benched_against_the_plain_resnet_unfolded_from_itself(graphs, capsys) -> None:
    """``skipnet bench R.onnx`` needs no --plain for a routed graph: with every per-block gather and scatter of the
    executing images made the identity, the file is the plain ResNet of its own weights (the logits of ``skipnet
    export --graph plain``, no NonZero, gather or scatter left)."""
    import numpy as np
    import onnxruntime as ort

    from skipnet.bench_onnx import unfold_routes

    plain = unfold_routes(onnx.load(str(graphs["routed_a"])))
    assert not {n.op_type for n in plain.graph.node} & {"NonZero", "ScatterND", "Gather"}
    reference = ort.InferenceSession(str(graphs["plain_a"]), providers=["CPUExecutionProvider"])
    shape = [3 if isinstance(d, str) else d for d in reference.get_inputs()[0].shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    unfolded = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(unfolded.run(None, {"images": x})[0], reference.run(None, {"images": x})[0], atol=1e-5)
    assert main(["bench", str(graphs["routed_a"]), "--batch-size", "2", *BENCH]) == 0, capsys.readouterr().err
    got = json.loads(capsys.readouterr().out)
    assert got["graph"] == "routed" and got["macs_plain"] >= got["macs_routed"] > 0
