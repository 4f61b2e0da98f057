"""Options that several subcommands share, declared once so that their names, defaults and help agree."""

from __future__ import annotations

import argparse
from typing import Any

from cnc_ad.data.scan import FORMATS


def add_overrides(parser: argparse.ArgumentParser, help: str = "override a config key") -> None:
    """The repeatable ``--set group.key=value`` of the commands that read a config (into ``args.overrides``)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=f"{help} (repeatable)"
    )


def add_device(parser: argparse.ArgumentParser, *, default: str | None = None, note: str = "") -> None:
    """``--device``: where the model runs."""
    parser.add_argument("--device", default=default, help=f"auto, cpu, cuda or cuda:N{f' ({note})' if note else ''}")


def add_format(parser: argparse.ArgumentParser, *, note: str = "") -> None:
    """``--format``: the dataset layout (auto-detected by default)."""
    parser.add_argument(
        "--format", choices=FORMATS, help=f"dataset layout, auto-detected by default{f' ({note})' if note else ''}"
    )


def add_skip_bad(parser: argparse.ArgumentParser) -> None:
    """``--skip-bad``: log and skip unreadable images instead of stopping."""
    parser.add_argument("--skip-bad", action="store_true", help="log and skip unreadable images instead of stopping")


def add_weights(parser: argparse.ArgumentParser) -> None:
    """``--clip-weights`` and ``--trust-pickle``: where the CLIP backbone weights come from, offline."""
    parser.add_argument("--clip-weights", metavar="PATH", help="local CLIP weights file (offline use)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow a pickle/TorchScript CLIP weights file (original OpenAI .pt files)",
    )


def add_progress(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: no progress bars (into ``args.no_progress``)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_json(parser: argparse.ArgumentParser) -> None:
    """``--json``: one JSON summary object on stdout, nothing else there (diagnostics go to stderr in every mode)."""
    parser.add_argument(
        "--json", action="store_true", help="print one JSON summary object on stdout (everything else goes to stderr)"
    )
    parser.set_defaults(json_document=True)  # cnc_ad.cli.main prints the object (commands with JSON of their own: not)


def emit_json(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    """Hand the command's JSON summary to :func:`cnc_ad.cli.main`, which prints it on stdout as the only thing there.

    ``main`` prints it when the command returns, and also when it then fails (with ``"ok": false`` and the error), so
    a script reads one object in either case.
    """
    args.json_summary = summary
