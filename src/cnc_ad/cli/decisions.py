"""``cnc decisions DIR``: list the decisions a decision log holds (:mod:`cnc_ad.deploy.decisions`), with their
corrections, filtered by time, category and verdict.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from cnc_ad.cli._options import add_json, emit_json

EPILOG = """\
examples:
  cnc decisions decisions/                              # the newest 50 decisions of `cnc serve`'s default log
  cnc decisions decisions/ --since 2h --verdict anomalous
  cnc decisions /var/lib/cnc/decisions --since 2026-01-31T06:00 --category pump --limit 0
  cnc decisions decisions/ --json | jq '.decisions[] | select(.feedback.correction == "false_alarm")'

--since: an ISO 8601 time (UTC unless it names an offset) or a span back from now: 90s, 30m, 2h, 3d, 1w, 1d12h.

columns: the time (UTC), the verdict, the score and the threshold it was decided by, how that threshold was found
(its rule and the number of images behind it: false_alarm_rate=R on good images, f1_max from `cnc eval`, request for a
threshold given with the request), the category, the image's name, the operator's correction (good / defect, and
FALSE ALARM or MISSED DEFECT where it contradicts the verdict) and the decision's id (what POST /v1/feedback takes).

--json: one object {"folder", "count", "verdicts": {"anomalous", "ok", "none"}, "false_alarms", "missed_defects",
"decisions": [...]} with each decision's full record (docs/serve.md#the-decision-log) and its "feedback" (or null),
oldest first.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "decisions",
        help="list the decisions in a decision log (cnc serve, cnc predict --decisions), with their corrections",
        description="List the decisions recorded in a decision log, oldest first, with operators' corrections.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", metavar="DIR", help="the decision log's folder")
    parser.add_argument("--since", metavar="TIME", help="only decisions made since TIME (ISO 8601, or 2h, 3d...)")
    parser.add_argument("--category", help="only decisions for this category")
    parser.add_argument("--verdict", choices=["anomalous", "ok", "none"], help="only decisions with this verdict")
    parser.add_argument(
        "--limit", type=int, default=50, metavar="N", help="the newest N of those selected (default 50; 0: all)"
    )
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from collections import deque

    from cnc_ad.deploy.decisions import decision_json, parse_since, read_decisions, read_feedback, select_decisions
    from cnc_ad.errors import ConfigError

    if args.limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {args.limit}")
    try:
        since = parse_since(args.since) if args.since is not None else None
    except ConfigError as err:
        raise ConfigError(f"--since: {err}") from None
    chosen = select_decisions(read_decisions(args.folder), since=since, category=args.category, verdict=args.verdict)
    shown = list(deque(chosen, maxlen=args.limit or None))
    feedback = read_feedback(args.folder)
    rows = [decision_json(decision, feedback.get(decision.id)) for decision in shown]
    counts = {verdict: sum(row["verdict"] == verdict for row in rows) for verdict in ("anomalous", "ok", "none")}
    corrections = [row["feedback"]["correction"] for row in rows if row["feedback"] is not None]
    summary = {
        "folder": args.folder,
        "count": len(rows),
        "verdicts": counts,
        "false_alarms": corrections.count("false_alarm"),
        "missed_defects": corrections.count("missed_defect"),
    }
    if args.json:
        emit_json(args, {**summary, "decisions": rows})
        return 0
    if rows:
        print("| time (UTC) | verdict | score | threshold | rule (images) | category | name | correction | id |")
        print("|---|---|---:|---:|---|---|---|---|---|")
        for row in rows:
            print(_row(row))
    print(
        f"{summary['count']} decision(s) ({counts['anomalous']} anomalous, {counts['ok']} ok, {counts['none']} without "
        f"a threshold); corrections: {summary['false_alarms']} false alarm(s), {summary['missed_defects']} missed "
        f"defect(s); log: {args.folder}"
    )
    return 0


def _row(row: dict[str, Any]) -> str:
    time = row["time"].replace("T", " ").removesuffix("Z")
    rule = row["threshold_rule"] or "-"
    if row["threshold_images"] is not None:
        rule += f" ({row['threshold_images']})"
    given = row["feedback"]
    correction = "-"
    if given is not None:
        correction = given["label"] + {"false_alarm": ": FALSE ALARM", "missed_defect": ": MISSED DEFECT"}.get(
            given["correction"], ""
        )
    cells = [time, row["verdict"], _number(row["score"]), _number(row["threshold"]), rule, row["category"] or "-",
             row["name"], correction, row["id"]]  # fmt: skip
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _number(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.6g}"
