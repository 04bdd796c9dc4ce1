"""The CLI's face (issue 20): --version, the license and citation files, and every command's --help."""

from __future__ import annotations

import argparse
import pkgutil
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from skipnet.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_version_is_the_package_version(capsys) -> None:
    import skipnet

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out.strip() == f"skipnet {project['version']}" == f"skipnet {skipnet.__version__}"


def test_license_and_citation_files() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"]["text"] == "MIT"
    assert (REPO / "LICENSE").read_text().startswith("MIT License\n")
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT" and cff["version"] == project["version"]
    paper = cff["preferred-citation"]
    assert paper["title"] == "SkipNet: Learning Dynamic Routing in Convolutional Networks" and paper["year"] == 2018
    assert [a["family-names"] for a in paper["authors"]] == ["Wang", "Yu", "Dou", "Darrell", "Gonzalez"]


# ------------------------------------------------------------------------------------------ --help of every command
# Options whose unset value means "not given" (inputs, outputs, budgets to choose from), not a default to state.
NO_DEFAULT = {
    "data",
    "out",
    "init",
    "init_torchvision",
    "config",
    "base",
    "plain",
    "target_macs",
    "target_reduction",
    "alphas",
    "stage",
}


def commands() -> dict[str, argparse.ArgumentParser]:
    from skipnet.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.fixture
def wide(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per option: phrases are not split by wrapping


def test_every_command_is_checked(wide) -> None:
    import skipnet.commands as package

    modules = {m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")}
    assert set(commands()) == modules and len(modules) >= 10


@pytest.mark.parametrize("name", sorted(commands()))
def test_help_states_real_defaults_once(wide, name) -> None:
    parser = commands()[name]
    text = parser.format_help()
    assert "None" not in text, name
    assert "%%" not in text and "%(" not in text, name
    assert "reference notes" not in text.lower(), name
    for bad in ("(default: True)", "(default: False)", "(default: [])"):
        assert bad not in text, (name, bad)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        shown = formatter._expand_help(action) if action.help else ""
        flag = action.option_strings[-1]
        assert shown.lower().count("default") <= 1, (name, flag, shown)  # never "(default 4) (default: 4)"
        if action.default is None and action.nargs != 0 and action.dest not in NO_DEFAULT:
            # unset means the paper's value, the checkpoint's, all images, ...: the help must say which
            assert "default" in shown.lower() or "paper" in shown.lower(), (name, flag, shown)


def test_help_items_of_issue_20(wide) -> None:
    helps = {name: p.format_help() for name, p in commands().items()}
    train = " ".join(helps["train"].split())
    assert "off on CPU" not in train and "block bodies" not in train  # bf16 works on CPU; the whole module compiles
    for name in ("analyze", "bench", "calibrate", "eval", "export"):  # every command that reads a checkpoint
        positional = " ".join(helps[name].split("positional arguments:")[1].split("options:")[0].split())
        assert ".safetensors" in positional and "pretrained:NAME" in positional, name
    for name, text in helps.items():
        assert "--no-channels-last" not in text or "(default: True)" not in text, name


def test_every_train_option_names_the_docs_page_that_explains_it(wide) -> None:
    """Issue 35: each option of ``skipnet train`` sits in a help group titled with a docs page, and that page
    mentions the option."""
    parser = commands()["train"]
    pages: dict[str, str] = {}
    for group in parser._action_groups:
        found = re.search(r"\(explained in (docs/[\w-]+\.md)\)", group.title or "")
        for action in group._group_actions:
            if action.option_strings and action.dest != "help":
                assert found, (group.title, action.option_strings)
                pages[action.option_strings[-1]] = found.group(1)
    every = {a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(pages) == every
    for flag, page in sorted(pages.items()):
        text = (REPO / page).read_text(encoding="utf-8")
        assert re.search(re.escape(flag) + r"(?![\w-])", text), f"{page} does not explain {flag}"


def test_every_command_names_the_docs_page_that_explains_it(wide) -> None:
    """Issue 35: each command's --help ends by naming its docs page, which exists and shows the command."""
    for name, parser in commands().items():
        found = re.findall(r"docs/[\w-]+\.md", parser.format_help())
        assert found, name
        page = REPO / found[-1]
        assert f"skipnet {name}" in page.read_text(encoding="utf-8"), (name, found[-1])
