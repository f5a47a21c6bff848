"""``pgbroker demo``: a durable workflow survives the SIGKILL of its worker.

The command (its options and what it runs) is :mod:`pgbroker_demo.run`'s;
the demo package is imported when the parser is built, not with this module.
"""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pgbroker_demo import run

    run.add_parser(commands)
