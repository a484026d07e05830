"""The ``doe-ext`` command: a dispatcher of subcommand groups (``doe-ext corpus build``,
``doe-ext lda fit|label|show``, ...). A group is a module here with ``register(subparsers)``
that adds its parser and sets ``func`` on each command; add new groups to ``GROUPS``."""
from __future__ import annotations

import argparse
import importlib
import sys

GROUPS = ("doe_ext.cli.corpus", "doe_ext.cli.lda", "doe_ext.cli.dmoe")


class CommandError(Exception):
    """An error to report to the user as one line, without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doe-ext", description="doe_ext command-line tools")
    sub = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    for name in GROUPS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Imported here so `doe-ext --help` stays fast and these errors are known to be the user's.
    from doe_ext.lda.corpus import CorpusError
    from doe_ext.dmoe.bank import BankError  # noqa: F401  (a ValueError: reported below)
    try:
        args.func(args)
    except (CommandError, CorpusError, ValueError, KeyError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"doe-ext: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("doe-ext: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
