"""`defectlens` command line: fit | calibrate | learn | inspect | evaluate | export | benchmark | serve | loadtest | watch | demo | synth.

Every user-caused failure prints one line `defectlens: error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from defectlens._version import __version__
from defectlens.cli import benchmarking, demo, fitting, inspecting, serving, watching
from defectlens.errors import DefectLensError

EXIT_USAGE = 2
COMMAND_MODULES = (fitting, inspecting, benchmarking, demo, serving, watching)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="defectlens", description="Visual defect detection trained on good parts only.")
    parser.add_argument("--version", action="version", version=f"defectlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"defectlens: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # scoped: callers of main() (tests, scripts) keep their own warning display afterwards
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.run(args)
    except DefectLensError as exc:
        print(f"defectlens: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("defectlens: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
