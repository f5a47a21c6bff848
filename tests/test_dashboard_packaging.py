"""The dashboard works offline from the wheel: its templates, htmx (with its
license) and its stylesheet are package data, and no page loads anything
from another site."""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pgbroker" / "dashboard"


def test_the_wheel_holds_everything_the_pages_use(tmp_path: Path) -> None:
    build = pytest.importorskip("hatchling.build", reason="hatchling builds the wheel")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        name = build.build_wheel(str(tmp_path))
    finally:
        os.chdir(cwd)
    with zipfile.ZipFile(tmp_path / name) as wheel:
        names = set(wheel.namelist())
    wanted = {
        f"pgbroker/dashboard/{p.relative_to(PACKAGE).as_posix()}"
        for folder in ("templates", "static")
        for p in (PACKAGE / folder).rglob("*")
        if p.is_file()
    }
    assert "pgbroker/dashboard/static/htmx.min.js" in wanted
    assert "pgbroker/dashboard/static/htmx.LICENSE.txt" in wanted
    assert "pgbroker/dashboard/templates/base.html" in wanted
    assert wanted <= names, sorted(wanted - names)
    assert "pgbroker/migrations/016_dashboard.sql" in names
    assert "pgbroker/sql/dashboard.sql" in names


def test_no_page_loads_anything_from_elsewhere() -> None:
    for template in (PACKAGE / "templates").glob("*.html"):
        text = template.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), template.name
        # Every script is the vendored file (the CSP allows 'self' only).
        for tag in re.findall(r"<script[^>]*>", text):
            assert 'src="{{ base }}/static/' in tag, (template.name, tag)
    assert (PACKAGE / "static" / "htmx.LICENSE.txt").read_text().startswith("Zero-Clause BSD")
