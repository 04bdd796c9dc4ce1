"""The console script's core commands (``flops``, ``models``), its error handling, and config validation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import patience
from skipnet import ArchConfig, SkipnetError, create_model, get_config
from skipnet.cli import main

FLOPS_KEYS = {
    "arch",
    "image_size",
    "params",
    "gates",
    "fixed_macs",
    "block_macs",
    "gate_macs",
    "total_macs_all_on",
    "gate_overhead",
}


def test_flops_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "cifar10_resnet_110", "--json"]) == 0
    out = capsys.readouterr().out
    d = json.loads(out)
    assert set(d) >= FLOPS_KEYS
    assert d["arch"] == "cifar10_resnet_110"
    assert d["image_size"] == 32
    assert d["gates"] == 53 == len(d["block_macs"]) == len(d["gate_macs"])
    assert d["total_macs_all_on"] == d["fixed_macs"] + sum(d["block_macs"])
    assert d["total_macs_all_on"] == pytest.approx(2.53e8, rel=0.01)
    assert d["gate_overhead"] == 0.0
    assert d["params"] == sum(p.numel() for p in create_model("cifar10_resnet_110").parameters())


def test_flops_overrides_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flops", "tiny_rnn_gate_14", "--json", "--image-size", "64", "--num-classes", "3"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["image_size"] == 64
    base = json.loads(_run_main(capsys, ["flops", "tiny_rnn_gate_14", "--json"]))
    assert d["block_macs"] == [4 * b for b in base["block_macs"]]
    assert d["params"] < base["params"]  # 3 classes instead of 10
    # The human-readable table: one line per gated block plus the totals.
    assert main(["flops", "tiny_rnn_gate_14"]) == 0
    text = capsys.readouterr().out
    assert "tiny_rnn_gate_14 at 32x32" in text
    assert sum(line.startswith("block ") for line in text.splitlines()) == 5
    assert f"{base['total_macs_all_on']:,}" in text
    # the plain network's cost (what "% fewer" is measured against) is labelled as having no gate; the gated
    # network executing every block costs that plus its gates
    lines = {line[:22].strip(): line[22:].split()[0] for line in text.splitlines()[-3:]}
    gates = sum(base["gate_macs"])
    assert lines == {
        "all blocks, no gate": f"{base['total_macs_all_on']:,}",
        "gates, summed": f"{gates:,}",
        "all blocks and gates": f"{base['total_macs_all_on'] + gates:,}",
    }


def _run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def test_models_lists_names(capsys: pytest.CaptureFixture[str]) -> None:
    out = _run_main(capsys, ["models"])
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert {"cifar10_rnn_gate_110", "imagenet_rnn_gate_101", "tiny_rnn_gate_14"} <= names
    configs = json.loads(_run_main(capsys, ["models", "--json"]))
    by_name = {c["name"]: c for c in configs}
    assert by_name["imagenet_rnn_gate_101"]["depth"] == 101
    assert by_name["imagenet_rnn_gate_101"]["gate"] == "rnn"
    assert by_name["cifar10_feedforward_110"]["gate"] == "ffgate2"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["flops", "no_such_arch"], "unknown architecture"),
        (["flops", "cifar10_rnn_gate_40"], "6n+2"),
        (["flops", "tiny_rnn_gate_14", "--image-size", "4"], "image-size"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("skipnet flops: error:")
    assert needle in lines[0]
    assert "Traceback" not in captured.err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "flops" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # argparse's own errors: usage + exit 2
        main(["flops"])
    assert exc.value.code == 2


def _console_script() -> str:
    found = shutil.which("skipnet")
    if found:
        return found
    candidate = Path(sys.executable).parent / "skipnet"
    assert candidate.exists(), "the 'skipnet' console script is not installed"
    return str(candidate)


def test_console_script_entry_point() -> None:
    proc = subprocess.run(
        [_console_script(), "flops", "tiny_rnn_gate_14", "--json"],
        capture_output=True,
        text=True,
        timeout=patience(120),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["arch"] == "tiny_rnn_gate_14" and d["gates"] == 5
    assert 0 < d["gate_overhead"] < 0.01


# --------------------------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"family": "cifar", "depth": 40}, r"6n\+2"),
        ({"family": "cifar", "depth": 2}, r"6n\+2"),
        ({"family": "imagenet", "depth": 42}, "ImageNet ResNet depth"),
        ({"family": "mnist", "depth": 38}, "unknown family"),
        ({"family": "cifar", "depth": 38, "gate": "lstm"}, "unknown gate"),
        ({"family": "cifar", "depth": 38, "num_classes": 0}, "num_classes"),
        ({"family": "cifar", "depth": 38, "image_size": 4}, "image_size"),
    ],
)
def test_config_validation(kwargs: dict, needle: str) -> None:
    base = {"name": "x", "family": "cifar", "depth": 38, "num_classes": 10, "gate": "rnn", "image_size": 32}
    with pytest.raises(SkipnetError, match=needle):
        ArchConfig(**(base | kwargs))


def test_config_validation_through_registry() -> None:
    with pytest.raises(SkipnetError, match="6n\\+2"):
        get_config("cifar10_rnn_gate_40")
    with pytest.raises(SkipnetError, match="unknown architecture"):
        get_config("imagenet_rnn_gate_52")  # ImageNet names are registered, not patterned
    with pytest.raises(SkipnetError):
        create_model("tiny_rnn_gate_14", num_classes=0)


def test_any_6n_plus_2_depth_by_pattern() -> None:
    model = create_model("cifar10_rnn_gate_56")
    # n = 9 blocks per stage, 27 blocks, all but the first gated.
    assert model.config.depth == 56 and model.config.gate == "rnn"
    assert len(model.gated_blocks) + 1 == 27
    assert model.num_gates == 26
    assert create_model("svhn_feedforward_20").config.gate == "ffgate1"
    assert create_model("cifar100_feedforward_200").config.gate == "ffgate2"
    assert create_model("cifar100_resnet_8").num_gates == 2
