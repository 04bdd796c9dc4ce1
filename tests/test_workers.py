"""``--workers N`` (issue 32, throughput on several cores): :class:`skipnet.ortgraph.ShardedSession` runs a batch's
shards in N ONNX Runtime sessions at once and must give one session's outputs exactly, in batch order, for a
routed graph (any batch) and a conditional one (one image at a time); ``skipnet predict`` and ``skipnet bench``
take it for an ``.onnx`` model and refuse it, in one line, for anything else."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from skipnet.bench import calibrate_bn
from skipnet.checkpoint import save_checkpoint
from skipnet.cli import main
from skipnet.errors import SkipnetError
from skipnet.registry import create_model

pytest.importorskip("onnx", reason="the export extra (pip install -e '.[export]') is part of CI's dev extra")
pytest.importorskip("onnxruntime")

STATS = {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """A tiny SkipNet whose images take different routes, its checkpoint and its conditional and routed graphs."""
    root = tmp_path_factory.mktemp("workers")
    torch.manual_seed(0)
    model = create_model("tiny_rnn_gate_14")
    calibrate_bn(model, 32)
    with torch.no_grad():
        model.gates.fc.weight.mul_(20.0)
        x = (torch.rand(64, 3, 32, 32) - torch.tensor(STATS["mean"]).view(1, 3, 1, 1)) / 0.25  # as the graph sees
        z = model(x, "greedy").trace.logits
        model.set_gate_bias(-float(z.median()))
    out = {"pt": root / "tiny.pt"}
    save_checkpoint(out["pt"], model.eval(), data=STATS)
    for graph in ("conditional", "routed"):
        out[graph] = root / f"{graph}.onnx"
        assert main(["export", str(out["pt"]), str(out[graph]), "--graph", graph, "--probes", "1"]) == 0
    return out


class _Counting:
    """A session that counts the images it was given."""

    def __init__(self, session) -> None:
        self.session, self.images = session, []

    def get_inputs(self):
        return self.session.get_inputs()

    def run(self, names, feeds):
        self.images.append(len(next(iter(feeds.values()))))
        return self.session.run(names, feeds)


@pytest.mark.parametrize("graph", ["routed", "conditional"])
@pytest.mark.parametrize("workers", [3])
def test_a_sharded_session_gives_one_sessions_outputs_in_batch_order(graphs, graph, workers) -> None:
    from skipnet.ortgraph import ShardedSession, onnx_session

    payload = graphs[graph].read_bytes()
    one = onnx_session(payload, 1)
    sharded = ShardedSession([_Counting(onnx_session(payload, 1)) for _ in range(workers)])
    x = np.random.default_rng(1).random((7, 3, 32, 32), dtype=np.float32)
    decided = []
    for n in (1, 2, 5, 7) if graph == "conditional" else (0, 1, 2, 5, 7):
        for s in sharded.sessions:
            s.images.clear()
        got = sharded.run(None, {"images": x[:n]})
        if graph == "conditional":  # one image at a time, dealt out in turn
            parts = [one.run(None, {"images": x[i : i + 1]}) for i in range(n)]
            want = [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
            expect = [[1] * len(range(w, n, workers)) for w in range(workers)]
        else:  # contiguous shards, one per session (fewer for fewer images)
            want, step = one.run(None, {"images": x[:n]}), max(1, -(-n // workers))
            sizes = [min(step, n - i) for i in range(0, n, step)] if n > 1 else [n]
            expect = [sizes[w : w + 1] for w in range(workers)]
        assert [s.images for s in sharded.sessions] == expect
        assert len(got) == len(want) == 3
        for a, b in zip(got, want):
            assert a.shape == b.shape and np.array_equal(a, b)
        decided.append(want[2])
    assert len({tuple(r) for d in decided for r in d.tolist()}) > 1, "the test needs images on different routes"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("graph", ["routed", "conditional"])
def test_predict_with_workers_predicts_as_one_session(graphs, graph, tmp_path, capsys) -> None:
    from PIL import Image

    gen = np.random.default_rng(2)
    for i in range(7):
        Image.fromarray((gen.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / f"img{i}.png")
    rows = {}
    for workers in ("1", "3"):
        out = tmp_path / f"w{workers}.jsonl"
        argv = ["predict", str(graphs[graph]), str(tmp_path), "--out", str(out), "--threads", "1", "--batch-size", "5"]
        assert main([*argv, "--workers", workers]) == 0, capsys.readouterr().err
        rows[workers] = _jsonl(out)
    assert len(rows["1"]) == 7 and rows["3"] == rows["1"]


def test_bench_with_workers_runs_both_networks_the_same_way(graphs, capsys) -> None:
    bench = ["--images", "2", "--repeats", "1", "--warmup", "0", "--json", "--threads", "1", "--workers", "2"]
    assert main(["bench", str(graphs["routed"]), "--batch-size", "4", *bench]) == 0, capsys.readouterr().err
    got = json.loads(capsys.readouterr().out)
    assert got["workers"] == 2 and got["images"] == 8 and got["speedup"] > 0
    assert "cpu_ms_plain" not in got  # several sessions' work is not the calling thread's CPU time: wall time only
    assert main(["bench", str(graphs["conditional"]), "--batch-size", "3", *bench]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["latency_ms_masked"] > 0


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["predict", "{pt}", "{img}", "--workers", "2"], "applies to an .onnx MODEL only"),
        (["predict", "{routed}", "{img}", "--workers", "0"], "--workers must be in [1, 256]"),
        (["bench", "{pt}", "--workers", "2"], "--workers applies to --runtime onnxruntime"),
        (["bench", "{routed}", "--workers", "0"], "--workers must be in [1, 256]"),
    ],
)
def test_workers_errors_are_one_line(graphs, tmp_path, capsys, argv, needle) -> None:
    from PIL import Image

    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    subs = {"{pt}": str(graphs["pt"]), "{routed}": str(graphs["routed"]), "{img}": str(img)}
    assert main([subs.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_onnx_session_refuses_no_workers(graphs) -> None:
    from skipnet.ortgraph import onnx_session

    with pytest.raises(SkipnetError, match="workers must be at least 1"):
        onnx_session(graphs["routed"].read_bytes(), 1, workers=0)
