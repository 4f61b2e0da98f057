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


def add_decision_log(parser: argparse.ArgumentParser, *, default: str | None, keep: str) -> None:
    """``--decisions DIR`` (the decision log; with a default folder also ``--no-decisions``), ``--keep`` and
    ``--log-max-mb``.
    """
    from cnc_ad.deploy.decisions import DEFAULT_MAX_BYTES, KEEPS

    where = f"default: {default}" if default else "default: none"
    parser.add_argument(
        "--decisions", default=default, metavar="DIR", help=f"record every decision in the decision log DIR ({where})"
    )
    if default is not None:
        parser.add_argument("--no-decisions", action="store_true", help="record no decisions")
    parser.add_argument(
        "--keep",
        choices=KEEPS,
        default=keep,
        help=f"--decisions: which decisions keep their image and heatmap in DIR (default {keep})",
    )
    parser.add_argument(
        "--log-max-mb",
        type=float,
        default=DEFAULT_MAX_BYTES / 2**20,
        metavar="MB",
        help="--decisions: the most MiB the log and its kept images take; the oldest go first (default 1024)",
    )


def open_decision_log(args: argparse.Namespace, detector: Any, source: str) -> Any:
    """The :class:`cnc_ad.deploy.decisions.DecisionLog` of :func:`add_decision_log`'s options for ``detector``'s
    decisions, or None (no ``--decisions``, or ``--no-decisions``).

    Raises:
        ConfigError: a bad option, or another process logs into the folder.
    """
    from cnc_ad.deploy.decisions import DecisionLog
    from cnc_ad.errors import ConfigError

    if args.decisions is None or getattr(args, "no_decisions", False):
        return None
    if not args.log_max_mb > 0:
        raise ConfigError(f"--log-max-mb must be > 0, got {args.log_max_mb}")
    return DecisionLog(
        args.decisions,
        source=source,  # type: ignore[arg-type]  # the caller's Literal
        model=detector.model_id,
        keep=args.keep,
        max_bytes=int(args.log_max_mb * 2**20),
    )


OUTBOX_DRAIN_S = 5.0
"""Seconds a command waits at its end for the outbox to send what is queued (the rest goes at the next start)."""


def add_outbox(parser: argparse.ArgumentParser) -> None:
    """``--webhook URL`` and ``--mqtt URL`` (each repeatable), ``--outbox DIR`` and ``--outbox-max-mb``: send every
    decision of the decision log out, from a durable queue.
    """
    from cnc_ad.deploy.outbox import DEFAULT_MAX_BYTES, DEFAULT_TOPIC

    parser.add_argument(
        "--webhook",
        action="append",
        default=[],
        metavar="URL",
        help="POST every decision's record as JSON to this http(s) URL (repeatable; needs the decision log)",
    )
    parser.add_argument(
        "--mqtt",
        action="append",
        default=[],
        metavar="URL",
        help=f"publish every decision (QoS 1) to mqtt://[user:password@]host[:port]/TOPIC (default topic "
        f"{DEFAULT_TOPIC}; {{category}} {{verdict}} {{source}} {{model}}; repeatable; the mqtt extra)",
    )
    parser.add_argument(
        "--outbox",
        default="outbox",
        metavar="DIR",
        help="--webhook/--mqtt: the durable queue of messages not yet sent (default: outbox)",
    )
    parser.add_argument(
        "--outbox-max-mb",
        type=float,
        default=DEFAULT_MAX_BYTES / 2**20,
        metavar="MB",
        help=f"--webhook/--mqtt: the most MiB the queue takes; the oldest go first (default {DEFAULT_MAX_BYTES >> 20})",
    )


def check_outbox(args: argparse.Namespace) -> None:
    """Refuse :func:`add_outbox`'s options without a decision log, with a bad size or URL, or ``--mqtt`` without
    paho-mqtt, before a model is loaded.

    Raises:
        ConfigError: ``--webhook``/``--mqtt`` without a decision log, a bad URL, or ``--outbox-max-mb`` not > 0.
        MissingExtra: ``--mqtt`` without paho-mqtt.
    """
    from cnc_ad.errors import ConfigError

    if not args.webhook and not args.mqtt:
        return
    if args.decisions is None or getattr(args, "no_decisions", False):
        given = "--no-decisions" if getattr(args, "no_decisions", False) else "no --decisions DIR"
        raise ConfigError(f"--webhook and --mqtt send the decisions of the decision log, and there is none ({given})")
    if not args.outbox_max_mb > 0:
        raise ConfigError(f"--outbox-max-mb must be > 0, got {args.outbox_max_mb}")
    _destinations(args)  # a bad URL or a missing paho is said now, not after the model and the log are opened


def _destinations(args: argparse.Namespace) -> list[Any]:
    from cnc_ad.deploy.outbox import MqttTopic, Webhook

    return [*(Webhook(url) for url in args.webhook), *(MqttTopic(url) for url in args.mqtt)]


def open_outbox(args: argparse.Namespace, decisions: Any) -> Any:
    """The started :class:`cnc_ad.deploy.outbox.Outbox` of :func:`add_outbox`'s options, following ``decisions``, or
    None (no ``--webhook`` nor ``--mqtt``). Close it with ``close(OUTBOX_DRAIN_S)``.

    Raises:
        ConfigError: a bad URL or option, no decision log, or another process uses the folder.
        MissingExtra: ``--mqtt`` without paho-mqtt.
    """
    from cnc_ad.deploy.outbox import Outbox

    check_outbox(args)
    if not args.webhook and not args.mqtt:
        return None
    assert decisions is not None, "check_outbox refuses the options without a decision log"
    outbox = Outbox(args.outbox, _destinations(args), max_bytes=int(args.outbox_max_mb * 2**20))
    outbox.follow(decisions)
    outbox.start()
    return outbox


def add_model(parser: argparse.ArgumentParser) -> None:
    """``--model SOURCE`` (also spelt ``--checkpoint``, ``--onnx``, ``--openvino``): the model a command runs."""
    parser.add_argument(
        "--model",
        "--checkpoint",
        "--onnx",
        "--openvino",
        dest="model",
        required=True,
        metavar="SOURCE",
        help="the model: a run folder or checkpoint (PyTorch), a .onnx graph (ONNX Runtime) or an OpenVINO .xml (its "
        ".bin beside it); exported models need no torch. --checkpoint, --onnx and --openvino are other names for it",
    )


def add_tiling(parser: argparse.ArgumentParser) -> None:
    """``--tile PX`` and ``--tile-overlap SHARE``: score each image by overlapping tiles at its own resolution."""
    parser.add_argument("--tile", type=int, metavar="PX", help="score each image by PX x PX tiles (see below)")
    parser.add_argument(
        "--tile-overlap", type=float, metavar="SHARE", help="--tile: share of a tile shared with the next (0.25)"
    )


def tiling_from(args: argparse.Namespace) -> Any:
    """The :class:`cnc_ad.deploy.Tiling` of ``--tile`` / ``--tile-overlap``, or None.

    Raises:
        ConfigError: ``--tile-overlap`` without ``--tile``, or values out of range.
    """
    from cnc_ad.deploy.tiling import Tiling
    from cnc_ad.errors import ConfigError

    if args.tile is None:
        if args.tile_overlap is not None:
            raise ConfigError("--tile-overlap applies to --tile PX only")
        return None
    try:
        return Tiling(args.tile, 0.25 if args.tile_overlap is None else args.tile_overlap)
    except ConfigError as err:
        raise ConfigError(f"--tile {args.tile} --tile-overlap {args.tile_overlap}: {err}") from None


def load_detector(args: argparse.Namespace, *, check_tiling: bool = True) -> Any:
    """The :class:`cnc_ad.deploy.Detector` of ``--model`` (with ``--thresholds``, ``--tile``, ``--device`` and the
    weights options where the command has them); with ``check_tiling``, warns when the thresholds in use were not set
    with the same tiles.
    """
    import logging

    from cnc_ad.deploy import Detector

    tiling = tiling_from(args) if hasattr(args, "tile") else None
    detector = Detector.load(
        args.model,
        thresholds=getattr(args, "thresholds", None),
        tiling=tiling,
        device=getattr(args, "device", None) or "auto",
        clip_weights=getattr(args, "clip_weights", None),
        trust_pickle=getattr(args, "trust_pickle", False),
    )
    decided_here = getattr(args, "threshold", None) is not None
    if check_tiling and not decided_here and not detector.thresholds_fit_tiling(getattr(args, "category", None)):
        logging.getLogger("cnc_ad.deploy").warning(
            "the thresholds in use were not set %s: decisions may be off (set them with `cnc calibrate%s --save "
            "FILE` and pass --thresholds FILE, or give --threshold)",
            f"with {tiling.describe()}" if tiling is not None else "on whole images",
            f" --tile {tiling.tile}" if tiling is not None else "",
        )
    return detector
