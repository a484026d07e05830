"""The ``doe-ext`` command: a dispatcher of subcommand groups (``doe-ext corpus build``,
``doe-ext lda fit|label|show``, ...). A group is a module here with ``register(subparsers)``
that adds its parser and sets ``func`` on each command; add new groups to ``GROUPS``.

Parsing needs neither torch nor transformers (the ``doe-ext`` script, :mod:`doe_ext_cli`, defers
them): every argument is checked by its ``type`` below (a number's range, an input file that must
exist, an output that must be a folder), so a mistyped command fails at once, naming the argument,
before anything is loaded or written. Only then does :func:`main` load the package and run it."""
from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

from doe_ext import threads

GROUPS = ("doe_ext.cli.corpus", "doe_ext.cli.lda", "doe_ext.cli.dmoe")


class CommandError(Exception):
    """An error to report to the user as one line, without a traceback."""


def number(kind, low, strict: bool = False, high=None, what: str = ""):
    """An argparse ``type``: a ``kind`` (int or float) ``>= low`` (``> low`` if ``strict``), ``<= high``
    if given; float ``inf`` passes an open upper end, ``nan`` never does."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        bad = math.isnan(v) or (v <= low if strict else v < low) or (high is not None and v > high)
        if bad:
            rng = f"{'>' if strict else '>='} {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {rng}{what}, got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its other messages
    return parse


positive_int = number(int, 1)
count = number(int, 0)
positive_float = number(float, 0, strict=True)
fraction = number(float, 0.0, high=1.0)


def input_file(text: str) -> str:
    """An argparse ``type``: a file that exists."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: " + ("a folder, not a file" if Path(text).is_dir()
                                                        else "no such file"))
    return text


def input_folder(text: str) -> str:
    """An argparse ``type``: a folder that exists."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text}: " + ("a file, not a folder" if Path(text).exists()
                                                        else "no such folder"))
    return text


def output_folder(text: str) -> str:
    """An argparse ``type``: a folder to write, which may exist, but not as a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return text


def output_file(text: str) -> str:
    """An argparse ``type``: a file to write, in a folder that exists."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not Path(text).resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {Path(text).resolve().parent} does not exist")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doe-ext", description="doe_ext command-line tools")
    sub = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    for name in GROUPS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import doe_ext

    doe_ext.load()  # torch and the compiled ops, deferred by the `doe-ext` script until a command runs
    try:
        args.func(args)
    except (CommandError, ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
            ImportError) as e:  # the lda corpus' and the bank's errors are ValueErrors
        print(f"doe-ext: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("doe-ext: interrupted", file=sys.stderr)
        return 130
    finally:
        threads.release()  # a command's claim on the cores ends with it (doe_ext.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
