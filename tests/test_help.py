"""The CLI's face (issue 20): --version, the license and citation files, and every command's --help."""

from __future__ import annotations

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
