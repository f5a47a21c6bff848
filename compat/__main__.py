"""``python -m compat``: the Celery compatibility suite.

    python -m compat --broker URL --backend URL \\
        [--reference-broker redis://... --reference-backend redis://...] \\
        [--app myproject.celery:app] [--only NAME,...] [--json PATH]

Runs every scenario of :mod:`compat.suite.scenarios` against the target
system (``--broker`` + ``--backend``) and then against each reference, each
with its own ``celery worker`` (prefork, concurrency 2, the same settings for
all), and prints one table. A system whose client library is not installed,
or whose broker or backend does not answer, is reported as "not run" with the
reason. Exit status: 0 when every scenario passes (or is skipped) on the
target and the ``--app`` check has no failure, 1 otherwise (a target that is
not run included; references are only reported), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from compat.suite import SCENARIOS, System, default_backend, run_suite, system_name
from compat.suite.appcheck import FAIL, check_app, load_app, render_checks


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m compat",
        description="Run the Celery compatibility suite against a broker and result backend, "
        "beside reference systems.",
        epilog=f"Scenarios: {', '.join(SCENARIOS)}.",
    )
    parser.add_argument(
        "--broker",
        default=os.environ.get("COMPAT_BROKER_URL"),
        help="broker URL of the system under test (env COMPAT_BROKER_URL)",
    )
    parser.add_argument(
        "--backend",
        default=os.environ.get("COMPAT_BACKEND_URL"),
        help="result backend URL (env COMPAT_BACKEND_URL; default: the broker URL, "
        "or rpc:// for amqp)",
    )
    parser.add_argument(
        "--reference-broker",
        action="append",
        default=[],
        metavar="URL",
        help="broker URL of a reference system; repeat for several",
    )
    parser.add_argument(
        "--reference-backend",
        action="append",
        default=[],
        metavar="URL",
        help="result backend of the reference given at the same position",
    )
    parser.add_argument("--app", help="also smoke-check this app (module:attribute)")
    parser.add_argument("--only", type=_names, help="comma-separated scenarios to run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON")
    parser.add_argument(
        "--log-dir", type=Path, help="keep the worker logs here (default: a temporary directory)"
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        return args
    if not args.broker:
        parser.error("--broker is required (or COMPAT_BROKER_URL)")
    if len(args.reference_backend) > len(args.reference_broker):
        parser.error("more --reference-backend than --reference-broker")
    unknown = [name for name in args.only or [] if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    return args


def systems(args: argparse.Namespace) -> tuple[System, list[System]]:
    taken: set[str] = set()

    def make(broker: str, backend: str | None) -> System:
        name = base = system_name(broker)
        n = 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        return System(name, broker, backend or default_backend(broker))

    target = make(args.broker, args.backend)
    backends = args.reference_backend + [None] * len(args.reference_broker)
    refs = [
        make(b, backend)
        for b, backend in zip(
            args.reference_broker, backends[: len(args.reference_broker)], strict=True
        )
    ]
    return target, refs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(SCENARIOS))
        return 0
    target, refs = systems(args)
    result: dict[str, Any] = {}
    ok = True

    if args.app:
        sys.path.insert(0, os.getcwd())
        checks = check_app(load_app(args.app))
        print(f"App {args.app}: routing and serialisation of {len(checks)} task(s)")
        print(render_checks(checks))
        print()
        result["app_check"] = {"app": args.app, "tasks": [c.to_json() for c in checks]}
        ok = not any(c.status == FAIL for c in checks)

    for system in [target, *refs]:
        masked = system.masked()
        print(f"{system.name}: broker {masked['broker']}, backend {masked['backend']}")
    report = run_suite(
        target,
        refs,
        only=args.only,
        log_dir=args.log_dir,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(f"\nworker: {report.worker_command}\n")
    print(report.table())
    logs = sorted({run.log for run in report.runs if run.log})
    if logs:
        print("\nworker logs: " + ", ".join(logs))
    for error in report.harness_errors():
        print(f"\nHARNESS ERROR {error}", file=sys.stderr)
    result.update(report.to_json())
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    ok = ok and report.target_ok() and not report.harness_errors()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
