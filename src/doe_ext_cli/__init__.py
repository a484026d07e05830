"""The ``doe-ext`` command's entry point. Importing :mod:`doe_ext` imports torch and loads the compiled
ops (over a second on two cores); the command needs neither to print ``--help`` or to reject its
arguments, so it imports the package from here with :data:`DEFER` set, parses its arguments, and
loads the rest (:func:`doe_ext.load`) only for a command that runs."""
from __future__ import annotations

DEFER = False  # read by doe_ext/__init__.py while the command imports it


def main(argv: list[str] | None = None) -> int:
    global DEFER
    DEFER = True
    try:
        from doe_ext.cli import main as run
    finally:
        DEFER = False
    return run(argv)
