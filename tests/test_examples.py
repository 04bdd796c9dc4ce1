"""The examples in examples/ run as written (issue 35), on tiny data: tiny_* architectures and the digits data.

``train_own_loop.py`` trains a few steps and writes a checkpoint; the other examples take that checkpoint, as a
user would take their own. The ONNX example needs onnxruntime, which the dev extra installs: it is not skipped.
"""

from __future__ import annotations

import csv
import runpy
from pathlib import Path

import pytest
import torch

import skipnet

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str):
    """The ``main`` of ``examples/NAME.py``, loaded as a script would be (not as ``__main__``)."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"example_{name}")["main"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("own_loop") / "my_skipnet.pt"
    result = example("train_own_loop")(["--steps", "6", "--out", str(out)])
    assert 0.0 <= result["accuracy"] <= 100.0 and result["macs_per_image"] > 0
    return out


def test_every_example_is_tested() -> None:
    tested = {"train_own_loop", "calibrate_budget", "export_onnx", "predict_folder"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_train_own_loop_writes_a_checkpoint_the_cli_reads(trained, capsys) -> None:
    model, ckpt = skipnet.load_model(trained)
    assert model.config.name == "tiny_feedforward_14" and model.config.in_channels == 1
    assert ckpt["data"]["classes"] == [str(i) for i in range(10)] and ckpt["data"]["val_split"] == 0.15
    from skipnet.cli import main as cli

    assert cli(["eval", str(trained), "--data", "digits", "--json"]) == 0
    assert '"accuracy"' in capsys.readouterr().out


def test_calibrate_budget_meets_the_budget_on_validation(trained, tmp_path) -> None:
    out = tmp_path / "calibrated.pt"
    result = example("calibrate_budget")(
        [str(trained), "--data", "digits", "--target-reduction", "20", "--out", str(out)]
    )
    model, _ = skipnet.load_model(out)
    assert model.threshold == pytest.approx(result["threshold"])
    assert result["after"]["macs_mean"] <= result["before"]["macs_mean"]


def test_export_onnx_runs_in_onnx_runtime(trained, tmp_path) -> None:
    out = tmp_path / "my_skipnet.onnx"
    result = example("export_onnx")([str(trained), "--out", str(out), "--images", "4"])
    assert out.is_file()
    assert result["same_decisions"] and result["max_abs_logit_diff"] < 1e-4


def test_predict_folder(trained, tmp_path) -> None:
    from torchvision.transforms.functional import to_pil_image

    from skipnet.data import load_data

    model, _ = skipnet.load_model(trained)
    data = load_data("digits", batch_size=6, eval_batch_size=6)
    x, _ = next(iter(data.test))
    (tmp_path / "images" / "more").mkdir(parents=True)
    for i, img in enumerate(data.denormalize(x)):
        to_pil_image(img).save(tmp_path / "images" / ("more" if i % 2 else "") / f"{i}.png")
    rows = example("predict_folder")(
        [str(tmp_path / "images"), "--checkpoint", str(trained), "--csv", str(tmp_path / "p.csv")]
    )
    assert len(rows) == 6
    with open(tmp_path / "p.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{k: str(v) for k, v in r.items()} for r in rows]
    with torch.no_grad():
        expected = model(x).logits.argmax(1)  # the same images before their 8-bit PNG round trip
    by_index = {int(Path(r["image"]).stem): r for r in rows}
    agree = sum(by_index[i]["class"] == str(int(c)) for i, c in enumerate(expected))
    assert agree >= 5
    assert all(0 <= r["gated_blocks_run"] <= r["gated_blocks"] == model.num_gates for r in rows)
