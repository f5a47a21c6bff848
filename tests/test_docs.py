"""What the documentation says that can be checked mechanically.

Every environment variable a doc names exists in the code; every
``pip install`` of pgbroker names extras that exist, and a package that an
extra provides is installed through that extra; every ``pgbroker COMMAND``
a doc shows is a command of the CLI.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from pgbroker.cli import main as cli

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(
    [
        ROOT / "README.md",
        ROOT / "compat" / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "examples").glob("*/README.md"),
    ]
)
CODE = sorted(
    p
    for folder in ("pgbroker", "pgbroker_demo", "compat", "examples", "tests")
    for p in (ROOT / folder).rglob("*.py")
    if p.name != Path(__file__).name
)
ENV_VAR = re.compile(r"\b(?:PGBROKER|BENCH|COMPAT)_[A-Z0-9_]*[A-Z0-9]\b")
#: Fenced code blocks and inline code spans.
CODE_TEXT = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)


def lines_of(pattern: re.Pattern[str], code_only: bool = False) -> list[tuple[str, str]]:
    """(where, match) for every match in the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        parts = CODE_TEXT.findall(text) if code_only else [text]
        for part in parts:
            for match in pattern.finditer(part):
                found.append((str(doc.relative_to(ROOT)), match.group(0)))
    return found


def test_every_environment_variable_in_the_docs_exists_in_the_code() -> None:
    code = "\n".join(p.read_text() for p in CODE)
    missing = sorted({(doc, name) for doc, name in lines_of(ENV_VAR) if name not in code})
    assert not missing, f"named in the docs, read nowhere in the code: {missing}"


def test_every_pip_install_uses_extras_that_exist() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # The packages each user-facing extra provides, by distribution name.
    provided = {
        re.split(r"[\[<>=~! ]", req, maxsplit=1)[0].lower().replace("_", "-"): extra
        for extra, reqs in extras.items()
        if extra != "test"
        for req in reqs
        if not req.startswith("pgbroker")
    }
    problems = []
    for doc, command in lines_of(re.compile(r"pip install [^\n`;&|#]*")):
        for names in re.findall(r"(?:pgbroker|\.)\[([\w,-]+)\]", command):
            problems += [
                f"{doc}: {command!r}: no extra {name!r}"
                for name in names.split(",")
                if name not in extras
            ]
        for word in command.split()[2:]:
            package = word.strip("\"'").lower().replace("_", "-")
            if package in provided:
                problems.append(
                    f'{doc}: {command!r}: install {package} with "pgbroker[{provided[package]}]"'
                )
    assert not problems, "\n".join(problems)


def cli_commands() -> set[str]:
    parser = cli.build_parser()
    commands: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update(action.choices)
    return commands


def test_every_pgbroker_command_in_the_docs_exists() -> None:
    commands = cli_commands()
    assert {"migrate", "status", "demo"} <= commands
    # A command line: at the start of a code line or span, maybe after a
    # path (.venv/bin/) or a prompt.
    command_line = re.compile(r"(?:^|(?<=`))\s*(?:\$ )?(?:[\w./-]*/)?pgbroker ([a-z][a-z-]*)", re.M)
    shown = lines_of(command_line, True)
    unknown = sorted(
        {(doc, text.strip()) for doc, text in shown if text.split()[-1] not in commands}
    )
    assert not unknown, f"not a pgbroker command: {unknown}"


def test_readme_transport_options_match_the_code() -> None:
    """The README's table of transport options: every option, its default."""
    import dataclasses

    from pgbroker.options import TransportOptions

    text = (ROOT / "README.md").read_text()
    section = text.split("### Transport options", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, re.M))
    units = {"MiB": 1024 * 1024, "days": 24 * 3600, "hour": 3600, "hours": 3600}

    def value(cell: str) -> object:
        cell = cell.strip().strip("`")
        if cell.startswith('"'):
            return cell.strip('"')
        if cell in ("True", "False"):
            return cell == "True"
        number, _, unit = cell.partition(" ")
        return float(number) * units.get(unit, 1)

    defaults = {f.name: f.default for f in dataclasses.fields(TransportOptions)}
    assert set(rows) == set(defaults)
    for name, cell in rows.items():
        assert value(cell) == defaults[name], (name, cell, defaults[name])
