"""The ``kosmos-g`` command line.

Each subcommand lives in ``kosmos_g/commands/<name>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a plain function
taking the parsed arguments. Errors a user can fix (bad paths, bad values) print one
line and exit with status 2; set ``KOSMOS_G_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import CLIError

__all__ = ["CLIError", "build_parser", "main"]

# What a user can fix: bad values, and paths that are missing, in the way, of the wrong kind or
# not writable. Anything else is a bug and keeps its traceback.
USER_ERRORS = (CLIError, ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError)

# Subcommand modules, in the order `kosmos-g --help` lists them.
COMMAND_MODULES = (
    "kosmos_g.commands.generate",
    "kosmos_g.commands.convert",
    "kosmos_g.commands.train",
    "kosmos_g.commands.micro",
    "kosmos_g.commands.demo",
    "kosmos_g.commands.eval",
    "kosmos_g.commands.data",
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="kosmos-g",
        description="Kosmos-G: image generation from interleaved text and image prompts.",
    )
    parser.add_argument("--version", action="version", version=f"kosmos-g {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that subcommand is not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers warns at import that torchvision is absent (we use PIL processors on
    # purpose); keep the CLI's output to what the user asked for.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("KOSMOS_G_DEBUG"):
            raise
        print(f"kosmos-g {args.command}: error: {e}".splitlines()[0] if isinstance(e, CLIError)
              else f"kosmos-g {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:  # raised by the OS: "[Errno 13] ..." made plain
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e)
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
