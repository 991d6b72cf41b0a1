"""The `defectlens` command. Each command module parses its options, calls a workflow and prints;
nothing heavy is imported until a command runs, so ``--help`` answers at once."""

from defectlens.cli.main import main

__all__ = ["main"]
