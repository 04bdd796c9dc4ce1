"""Exported graphs as inputs (issue 32): ``skipnet bench X.onnx --data D`` on real images, bench's size options
bounded, and altered .onnx files refused by bench and predict in one line (never a traceback, never logits of an
altered graph where that can be detected)."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skipnet.checkpoint import save_checkpoint
from skipnet.cli import main
from test_predict import CLASSES, DATA, _varied_model

onnx = pytest.importorskip("onnx", reason="the export extra (pip install -e '.[export]') is part of CI's dev extra")
pytest.importorskip("onnxruntime")

BENCH = ["--repeats", "1", "--warmup", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint, its conditional graph, and an ImageFolder of its ten classes (one 32 px image per class and
    split)."""
    root = tmp_path_factory.mktemp("onnx_inputs")
    ckpt = root / "tiny.pt"
    save_checkpoint(ckpt, _varied_model(), data=DATA)
    graph = root / "tiny.onnx"
    assert main(["export", str(ckpt), str(graph), "--probes", "1"]) == 0
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        for c in CLASSES:
            d = root / "folder" / split / c
            d.mkdir(parents=True)
            Image.fromarray(rng.randint(0, 256, (32, 32, 3)).astype(np.uint8)).save(d / "0.png")
    (root / "img.png").write_bytes((root / "folder" / "test" / CLASSES[0] / "0.png").read_bytes())
    return {"ckpt": ckpt, "onnx": graph, "folder": root / "folder", "img": root / "img.png"}


def _error(capsys, command: str) -> str:
    """The one error line (a warning line before it, e.g. that the blocked layout does not apply, is allowed)."""
    lines = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in lines if not ln.startswith(f"skipnet {command}: warning:")]
    assert len(err) == 1 and err[0].startswith(f"skipnet {command}: error: "), err
    return err[0]


def test_bench_onnx_on_real_images_decides_as_the_checkpoint(exported, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))
    argv = ["bench", str(exported["onnx"]), "--data", str(exported["folder"]), "--images", "4", *BENCH, "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    res = json.loads(capsys.readouterr().out)
    assert res["inputs"] == f"4 test images of {exported['folder']} (seeded sample)" and res["images"] == 4
    # the decisions are the eager model's on the same pixels, normalised with the checkpoint's statistics
    from skipnet.checkpoint import checkpoint_stats, load_model
    from skipnet.data import load_data

    model, ckpt = load_model(exported["ckpt"])
    data = load_data(str(exported["folder"]), eval_batch_size=4, stats=checkpoint_stats(ckpt), limit_test=4)
    x, _ = next(iter(data.test))
    with torch.no_grad():
        keep = float(model(x[:4], "greedy").trace.decisions.mean())
    assert res["keep"] == pytest.approx(keep)
    # a checkpoint exported on the fly (--runtime onnxruntime) reads the same images and decides the same
    argv = ["bench", str(exported["ckpt"]), "--runtime", "onnxruntime", "--data", str(exported["folder"])]
    assert main([*argv, "--images", "4", *BENCH, "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["keep"] == pytest.approx(keep)


def test_bench_onnx_data_of_other_classes_is_one_line(exported, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SKIPNET_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (other / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(other / split / c / "0.png")
    assert main(["bench", str(exported["onnx"]), "--data", str(other), "--images", "2", *BENCH]) == 2
    assert "was trained for 10 classes" in _error(capsys, "bench")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--image-size", "0"], "--image-size must be in [8, 1024]"),
        (["--image-size", "100000"], "--image-size must be in [8, 1024]"),
        (["--batch-size", "0"], "--batch-size must be in [1, 4096]"),
        (["--batch-size", "-3"], "--batch-size must be in [1, 4096]"),
        (["--batch-size", "1000000"], "--batch-size must be in [1, 4096]"),
        (["--repeats", "0"], "--repeats must be in [1, 10000]"),
        (["--threads", "100000"], "--threads must be in [1, 256]"),
    ],
)
@pytest.mark.parametrize("subject", ["tiny_rnn_gate_14", "missing.onnx"])
def test_bench_size_options_are_bounded(capsys, subject, extra, needle) -> None:
    assert main(["bench", subject, *extra]) == 2
    assert needle in _error(capsys, "bench")


def test_bench_onnx_refuses_another_image_size(exported, capsys) -> None:
    assert main(["bench", str(exported["onnx"]), "--image-size", "64", *BENCH]) == 2
    assert "takes 32-px images" in _error(capsys, "bench")


# ------------------------------------------------------------------------------------------ altered files
def _meta_edit(key: str, value, digested: bool = False) -> callable:
    """An edit of the metadata entry ``key`` (``None``: removed). Unless ``digested``, the whole-file digest goes
    too (as in a file exported before it was recorded), so that the check behind it is what refuses the file."""

    def edit(proto) -> None:
        (prop,) = [p for p in proto.metadata_props if p.key == "skipnet"]
        meta = json.loads(prop.value)
        if value is None:
            del meta[key]
        else:
            meta[key] = value
        if not digested:
            meta.pop("sha256", None)
        prop.value = json.dumps(meta)

    return edit


def _input_size(proto) -> None:
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 64


def _opset(proto) -> None:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 7


def _op_type(proto) -> None:
    next(n for n in proto.graph.node if n.op_type not in ("If", "Constant")).op_type = "NoSuchOp"


def _nan_head(proto) -> None:
    """The classifier's bias set to NaN: the structure is intact, the logits are not."""
    from onnx import numpy_helper

    (bias,) = [t for t in proto.graph.initializer if list(t.dims) == [len(CLASSES)]]
    bias.CopyFrom(numpy_helper.from_array(np.full(len(CLASSES), np.nan, np.float32), bias.name))


def _drop_if(proto) -> None:
    nodes = [n for n in proto.graph.node if n.op_type == "If"]
    del nodes[-1].attribute[:]  # an If without branches


def _undigested(edit) -> callable:
    """``edit`` on a file without the graph digest (as exported before it was recorded): the checks behind it."""

    def both(proto) -> None:
        edit(proto)
        _meta_edit("graph_sha256", None)(proto)

    return both


ALTERED = [
    ("truncated", None, "is not a readable ONNX file"),
    ("no metadata", lambda p: p.metadata_props.pop(), "without skipnet metadata"),
    ("metadata format", _meta_edit("format", "other"), "its metadata has format 'other'"),
    ("no threshold", _meta_edit("threshold", None), "its threshold None is not in [0, 1]"),
    ("classes", _meta_edit("classes", ["a", "b"]), "its class list is not 10 names"),
    ("normalize", _meta_edit("normalize", {"mean": [0.5], "std": [0.2]}), "its normalisation"),
    ("arch", _meta_edit("arch", {"name": "x"}), "its architecture record is malformed"),
    ("graph", _meta_edit("graph", "plain"), "returns ['logits']"),
    ("input size", _undigested(_input_size), "its input is [1, 3, 64, 32]"),
    ("opset", _opset, "it imports opset 7"),
    ("op type", _undigested(_op_type), "fails ONNX's model check"),
    ("if branches", _undigested(_drop_if), "fails ONNX's model check"),
    ("nan head", _undigested(_nan_head), "non-finite logits"),
    ("digest", _nan_head, "its graph (nodes or weights) no longer has the SHA-256"),
    ("classes renamed", _meta_edit("classes", [f"c{i}" for i in range(10)], True), "its skipnet metadata no longer"),
    ("threshold", _meta_edit("threshold", 0.9, True), "its skipnet metadata no longer has the SHA-256"),
]


@pytest.mark.parametrize(("name", "edit", "needle"), ALTERED, ids=[a[0] for a in ALTERED])
def test_an_altered_onnx_file_is_one_line(exported, tmp_path, capsys, name, edit, needle) -> None:
    path = tmp_path / "altered.onnx"
    raw = exported["onnx"].read_bytes()
    if edit is None:
        path.write_bytes(raw[: len(raw) // 2])
    else:
        proto = onnx.load_from_string(raw)
        edit(proto)
        path.write_bytes(proto.SerializeToString())
    out = tmp_path / "p.csv"
    assert main(["predict", str(path), str(exported["img"]), "--out", str(out), "--threads", "1"]) == 2
    assert needle in _error(capsys, "predict")
    assert not out.exists()
    assert main(["bench", str(path), "--images", "1", *BENCH]) == 2
    assert needle in _error(capsys, "bench")


def test_metadata_without_its_digest_is_said_unverified(exported, tmp_path, caplog) -> None:
    """The metadata digest removed (and a class renamed): the graph is still checked, but the class names and the
    threshold cannot be, and predict says so (it said nothing)."""
    proto = onnx.load_from_string(exported["onnx"].read_bytes())
    _meta_edit("classes", ["renamed", *CLASSES[1:]])(proto)
    path = tmp_path / "undigested.onnx"
    path.write_bytes(proto.SerializeToString())
    with caplog.at_level(logging.WARNING, logger="skipnet.export"):
        assert main(["predict", str(path), str(exported["img"]), "--threads", "1"]) == 0
    assert "records no SHA-256 of its skipnet metadata: its class names and threshold are not verified" in caplog.text


def _pt2_with_meta(src: Path, dst: Path, text: str, digest: bool = True) -> None:
    """A copy of the pt2 archive ``src`` with its skipnet metadata replaced by ``text`` (``digest=False``: without
    the digest member, as exported before it was recorded)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if not digest and info.filename.endswith("/skipnet_sha256"):
                continue
            data = zin.read(info)
            zout.writestr(info, text.encode() if info.filename.endswith("extra/skipnet") else data)


def test_an_altered_pt2_file_is_one_line(exported, tmp_path, capsys) -> None:
    pt2 = tmp_path / "tiny.pt2"
    assert main(["export", str(exported["ckpt"]), str(pt2), "--graph", "routed", "--probes", "1"]) == 0
    capsys.readouterr()
    with zipfile.ZipFile(pt2) as z:
        meta = json.loads(z.read(_meta_name(pt2)))
    cases = {
        "truncated": (None, "is damaged or not a torch.export program"),
        "not json": ("{oops", "its skipnet metadata is not JSON"),
        "classes": (json.dumps(meta | {"classes": ["x"]}), "its class list is not 10 names"),
        "image size": (json.dumps(meta | {"image_size": 64}), "its image size 64 is not its architecture's 32"),
    }
    for name, (text, needle) in cases.items():  # the checks behind the digest: files written before it
        bad = tmp_path / f"{name.replace(' ', '_')}.pt2"
        if text is None:
            bad.write_bytes(pt2.read_bytes()[:5000])
        else:
            _pt2_with_meta(pt2, bad, text, digest=False)
        assert main(["predict", str(bad), str(exported["img"]), "--threads", "1"]) == 2, name
        assert needle in _error(capsys, "predict"), name
        if text is not None:  # with the digest: refused by it, whatever the edit
            _pt2_with_meta(pt2, bad, text)
            assert main(["predict", str(bad), str(exported["img"]), "--threads", "1"]) == 2, name
            assert "was altered after export" in _error(capsys, "predict"), name


def _meta_name(pt2: Path) -> str:
    return next(n for n in zipfile.ZipFile(pt2).namelist() if n.endswith("extra/skipnet"))
