"""The distribution: a LICENSE file that matches the metadata, in the wheel."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def test_license_file_matches_the_metadata() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert "Copyright (c) 2026 the pgbroker authors" in text


def test_wheel_contains_the_license(tmp_path: Path) -> None:
    build = pytest.importorskip("hatchling.build", reason="hatchling builds the wheel")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        name = build.build_wheel(str(tmp_path))
    finally:
        os.chdir(cwd)
    with zipfile.ZipFile(tmp_path / name) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert b"License-Expression: MIT" in metadata
    assert b"License-File: LICENSE" in metadata
