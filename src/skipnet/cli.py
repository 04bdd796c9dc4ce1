"""The ``skipnet`` console script: one entry point, one subcommand per module in :mod:`skipnet.commands`.

Each command module defines ``register(subparsers)`` (adds its parser, with ``func`` set to a callable taking
the parsed ``argparse.Namespace`` and returning an exit code). User mistakes raise
:class:`~skipnet.errors.SkipnetError` and are printed as one line with exit status 2, without a traceback;
so are the environment's refusals that a user fixes (a full disk, a read-only or forbidden path).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import signal
import sys
import warnings

from skipnet.errors import Interrupted, SkipnetError


class HelpFormatter(argparse.HelpFormatter):
    """Every command's help: an option's default is appended as "(default: X)" when it has a real one that its help
    does not state already. Nothing is appended for a default of ``None`` (the help says what unset means: the
    paper's value, the checkpoint's, ...), for on/off flags, for an empty list, or where the help already names a
    default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or default == []
            or action.nargs == 0
            or "default" in text.lower()
        ):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    import skipnet.commands as commands

    parser = argparse.ArgumentParser(
        prog="skipnet",
        description="SkipNet: train, measure and deploy residual networks that skip blocks per input.",
    )
    from skipnet import __version__

    parser.add_argument("--version", action="version", version=f"skipnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"skipnet.commands.{info.name}")
        module.register(sub)
        _name_docs(sub, info.name, getattr(module, "DOCS", None))
    for command in sub.choices.values():  # one help style for every command
        command.formatter_class = HelpFormatter
    return parser


def sub_parser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser | None:
    """The parser of command ``name`` (``None`` if there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _name_docs(sub: argparse._SubParsersAction, name: str, page: str | None) -> None:
    """End the command's description with the docs page that explains it."""
    command = sub.choices[name]
    if page is None or page in (command.description or ""):
        return
    short = next((a.help for a in sub._choices_actions if a.dest == name), "") or ""
    text = (command.description or short[:1].upper() + short[1:]).rstrip(".")
    command.description = f"{text}. Explained in {page}."


# OSErrors that are the user's to fix, reported like a SkipnetError (one line, exit 2): a full or read-only disk,
# permissions, and paths that cannot be made (under a regular file, a symlink loop, a name too long, no parent).
USER_OS_ERRORS = {
    errno.ENOSPC,
    getattr(errno, "EDQUOT", errno.ENOSPC),
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.EEXIST,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.ELOOP,
    errno.ENAMETOOLONG,
    errno.ENOENT,
}


def one_line(message: str) -> str:
    """A message as one line. An error re-raised from a DataLoader worker carries the worker's traceback: its
    last line (the original message) is kept."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    if len(lines) > 1 and "Original Traceback" in message:
        last = lines[-1]
        return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") and ": " in last else last
    return " ".join(lines)


def _warning_line(command: str):
    """``warnings.showwarning`` for a command: ``skipnet COMMAND: warning: MESSAGE`` on stderr."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001 - its signature
        print(f"skipnet {command}: warning: {one_line(str(message))}", file=sys.stderr if file is None else file)

    return show


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports torch: a Ctrl-C here is the same one line as later
    except KeyboardInterrupt:
        print("skipnet: interrupted", file=sys.stderr)
        return 130
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command they were given to ("skipnet models: error: ..."), as its own errors are
        tokens, name = list(sys.argv[1:] if argv is None else argv), getattr(args, "command", None)
        after = name in tokens and all(tokens.index(e) > tokens.index(name) for e in extra if e in tokens)
        command = sub_parser(parser, name) if after else None
        (command or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    given = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "command", None) in given:  # the command's own arguments (skipnet train --config reads them)
        args.command_argv = given[given.index(args.command) + 1 :]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():  # a library warning reaches a user as one line, not as a source location
            warnings.showwarning = _warning_line(args.command)
            return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `skipnet eval ... --json | head -c 10`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 128 + signal.SIGPIPE
    except Interrupted as exc:  # a clean stop on a signal, with a checkpoint to resume from
        print(f"skipnet {args.command}: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except SkipnetError as exc:
        print(f"skipnet {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"skipnet {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"skipnet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
