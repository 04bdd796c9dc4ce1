"""How an image becomes what a network takes has one home, ``skipnet.data``: ``skipnet predict`` prepares an image
file exactly as the evaluation loader of a folder holding it does (decode, resize or resize-and-crop, normalise), and
counts the MACs as ``skipnet eval`` does; the export graphs normalise with the same module; the commands' progress
bars are one (``skipnet.runlog.terminal_bar``)."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from PIL import Image

from skipnet.checkpoint import save_checkpoint
from skipnet.data import FolderLoader, Normalize, TensorLoader, load_data
from skipnet.errors import SkipnetError
from skipnet.predict import load_image, load_predictor, predict
from skipnet.registry import create_model

STATS = ((0.51, 0.47, 0.42), (0.23, 0.26, 0.29))


def _save(path, w: int, h: int, seed: int) -> None:
    """A smooth random colour field with some noise (resizing and cropping it changes its pixels)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=gen), size=(h, w), mode="bilinear")[0]
    img = (low + 0.3 * torch.rand(3, h, w, generator=gen)).clamp(0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An ImageFolder whose training split is mostly large (80 px) images; its test split holds a small image
    (20 x 20) and a large non-square one (150 x 90)."""
    root = tmp_path_factory.mktemp("home") / "imgs"
    for k, c in enumerate(("x", "y")):
        for i in range(4):
            _save(root / "train" / c / f"{i}.png", 80, 80, seed=10 * k + i)
    _save(root / "test" / "x" / "small.png", 20, 20, seed=101)
    _save(root / "test" / "y" / "wide.png", 150, 90, seed=102)
    return root


@pytest.mark.parametrize(("size", "loader", "prepare"), [(32, TensorLoader, "resize"), (72, FolderLoader, "crop")])
def test_predict_prepares_an_image_file_as_the_eval_loader_does(folder, size, loader, prepare) -> None:
    bundle = load_data(str(folder), image_size=size, stats=STATS, batch_size=2, workers=0)
    assert isinstance(bundle.test, loader) and bundle.meta()["prepare"] == prepare
    (x, _), files = next(iter(bundle.test)), [folder / "test" / "x" / "small.png", folder / "test" / "y" / "wide.png"]
    images = torch.stack([load_image(f.read_bytes(), 3, size, prepare) for f in files])
    mine = Normalize(STATS)(images)
    assert x.shape == mine.shape == (2, 3, size, size)
    assert torch.equal(x.contiguous(), mine)  # the same pixels, to the last bit
    # a record older than the choice: decided by the size, as the folder's own choice went
    assert torch.equal(torch.stack([load_image(f.read_bytes(), 3, size) for f in files]), images)


@pytest.mark.parametrize("size", [32, 72])
def test_a_checkpoint_predicts_and_costs_the_images_as_eval_does(folder, tmp_path, size) -> None:
    """The checkpoint's predictions on the test split's files: the logits, decisions and MACs of ``skipnet eval``'s
    pass over its loader (the checkpoint's own normalisation, gate MACs counted by the same rule)."""
    from skipnet.cost import cost_model
    from skipnet.evaluate import data_for_checkpoint, run_eval

    bundle = load_data(str(folder), image_size=size, stats=STATS, batch_size=2, workers=0)
    torch.manual_seed(0)
    model = create_model("tiny_rnn_gate_14", num_classes=2, image_size=size).eval()
    with torch.no_grad():
        model.set_gate_bias(0.0)
    save_checkpoint(tmp_path / "m.pt", model, data=bundle.meta())
    predictor = load_predictor(str(tmp_path / "m.pt"))
    from skipnet.checkpoint import load_model

    net, ckpt = load_model(tmp_path / "m.pt")
    loader = data_for_checkpoint(ckpt, net, str(folder), batch_size=2).test
    record = run_eval(net, loader, cost_model(net))
    files = [folder / "test" / "x" / "small.png", folder / "test" / "y" / "wide.png"]
    rows = predict(predictor, files, batch_size=2).rows
    assert [r["class_index"] for r in rows] == record.preds.tolist()
    assert [r["route"] for r in rows] == ["".join(str(int(v)) for v in d) for d in record.decisions.tolist()]
    assert [r["macs"] for r in rows] == record.macs.tolist()
    x, _ = next(iter(loader))
    with torch.no_grad():
        want = net(x, "greedy").logits
    got, _ = predictor(torch.stack([load_image(f.read_bytes(), 3, size, predictor.prepare) for f in files]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_normalize_is_torchvisions_and_the_export_graphs() -> None:
    from torchvision import transforms as T

    from skipnet import export

    img = torch.rand(3, 9, 7)
    norm = Normalize(STATS)
    assert torch.equal(norm(img), T.Normalize(*STATS)(img))  # one image, as a transform gets it
    assert torch.equal(norm(img[None].expand(2, -1, -1, -1)), T.Normalize(*STATS)(img).expand(2, -1, -1, -1))
    assert torch.equal(Normalize(None, 3)(img), img) and norm.mean.shape == (1, 3, 1, 1)
    with pytest.raises(SkipnetError, match="normalisation has 1 channels but the network takes 3"):
        Normalize(((0.5,), (0.2,)), 3)
    assert export._Normalize is Normalize
    graph = export.build_graph(create_model("tiny_rnn_gate_14").eval(), "routed", STATS)
    assert isinstance(graph.norm, Normalize) and torch.equal(graph.norm(img[None]), norm(img[None]))


@pytest.mark.parametrize("kind", ["pt", "safetensors", "save_pretrained"])
def test_a_normalisation_of_another_channel_count_is_refused_on_loading(tmp_path, kind) -> None:
    """Why predict checks no channel count itself: no checkpoint it accepts reaches it with one."""
    from skipnet.checkpoint import make_checkpoint
    from skipnet.pretrained import save_pretrained

    model = create_model("tiny_rnn_gate_14").eval()
    bad = {"mean": [0.5], "std": [0.25]}
    if kind == "pt":
        target = tmp_path / "m.pt"
        torch.save(make_checkpoint(model, data=bad), target)
    elif kind == "safetensors":
        target = tmp_path / "m.safetensors"
        save_checkpoint(target, model, data=bad)
    else:
        target = save_pretrained(model, tmp_path / "dir", data=bad)
    with pytest.raises(SkipnetError, match="mean has 1 values but the network takes 3-channel images"):
        load_predictor(str(target))


def test_predict_and_training_share_one_progress_bar(monkeypatch) -> None:
    from skipnet.commands.predict import _Bar
    from skipnet.runlog import Progress, terminal_bar

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert terminal_bar(total=3) is None and _Bar(3).bar is None
    monkeypatch.setattr(sys, "stderr", Terminal())  # a terminal that reports no size: 100 columns
    with _Bar(3) as bar:
        assert bar.bar is not None and bar.bar.ncols == 100 and bar.bar.unit == "img"
        bar.update(2)
    progress = Progress(total=3, enabled=True, log_every=1, bar=True)
    assert progress.bar is not None and progress.bar.ncols == 100 and progress.tty
    progress.bar.close()
