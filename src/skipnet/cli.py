"""The ``skipnet`` console script: one entry point, one subcommand per module in :mod:`skipnet.commands`.

Each command module defines ``register(subparsers)`` (adds its parser, with ``func`` set to a callable taking
the parsed ``argparse.Namespace`` and returning an exit code). User mistakes raise
:class:`~skipnet.errors.SkipnetError` and are printed as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from skipnet.errors import SkipnetError


def build_parser() -> argparse.ArgumentParser:
    import skipnet.commands as commands

    parser = argparse.ArgumentParser(
        prog="skipnet",
        description="SkipNet: train, measure and deploy residual networks that skip blocks per input.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"skipnet.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SkipnetError as exc:
        print(f"skipnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"skipnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
