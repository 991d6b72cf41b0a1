"""MkDocs hook: replace ``<!-- cli-reference -->`` with every command's --help, from the parser itself."""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- cli-reference -->"


def _help(parser: argparse.ArgumentParser) -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; fix it so the page does not depend on who built it
    return parser.format_help()


def cli_reference() -> str:
    from defectlens.cli.main import build_parser

    parser = build_parser()
    parts = ["## defectlens", "", "```text", _help(parser).rstrip(), "```", ""]
    commands = parser._subparsers._group_actions[0].choices  # the registered verbs, in order
    for name, sub in commands.items():
        parts += [f"## defectlens {name}", "", "```text", _help(sub).rstrip(), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, **_) -> str:
    return markdown.replace(MARKER, cli_reference()) if MARKER in markdown else markdown
