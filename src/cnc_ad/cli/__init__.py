"""The ``cnc`` command: ``main(argv) -> int`` dispatches to one subcommand module per job.

Each module in this package exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a callable
taking the parsed namespace and returning an exit code. Library errors (:class:`cnc_ad.errors.CNCError`) and disk errors
(a full, read-only or failing disk: :data:`DISK_ERRORS`) become a one-line message and a non-zero exit code here, never
a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

from cnc_ad import __version__
from cnc_ad.errors import EXTRAS, CNCError, missing_extra

# Library messages name library terms (CONTRIBUTING.md, "Errors and messages"); the command line shows its flags.
FLAGS = {
    "skip_bad=True": "--skip-bad",
    "resume=True": "--resume",
    "overwrite=True": "--overwrite",
    "clip_weights=PATH": "--clip-weights PATH",
    "trust_pickle=True": "--trust-pickle",
    "format=NAME": "--format NAME",
    "normal=DIR": "--normal DIR",
    "device=cpu": "--device cpu",
    "device=auto": "--device auto",
    "device=cuda": "--device cuda",
    "allowed_hosts '*'": "--allow-host '*'",
    "token=TOKEN": "--token TOKEN",
    "keep=anomalous": "--keep anomalous",
    "keep=all": "--keep all",
    "keep='none'": "--keep none",
}
# Disk errors: a full, read-only or failing disk is the machine's state, not a bug; each becomes one line with the fix.
DISK_ERRORS = {
    errno.ENOSPC: ("write", "free space or choose another {out}"),
    errno.EDQUOT: ("write", "free space (a disk quota is full) or choose another {out}"),
    errno.EFBIG: ("write", "choose another {out}, on a file system that takes larger files"),
    errno.EROFS: ("write", "choose another {out}"),
    errno.EACCES: ("access", "check its permissions or choose another {out}"),
    errno.EPERM: ("access", "check its permissions or choose another {out}"),
    errno.EIO: ("access", "check the disk (its kernel log) or choose another {out}"),
}
# Subcommand modules, in the order `cnc --help` lists them.
COMMANDS = (
    "data", "models", "train", "eval", "calibrate", "report", "predict", "export", "serve", "decisions", "demo",
    "ablate",
)  # fmt: skip

DESCRIPTION = """\
CNC: unsupervised multi-class anomaly detection with a cross-modal normality constraint (AAAI 2025).

One model learns the good images of every product category at once, then scores new images and
localises defects (heatmap and mask).

typical workflow:
  cnc data synth data/synth                         # or use MVTec AD / VisA / MVTec AD 2 / your folders
  cnc data scan data/synth                          # check what was found
  cnc train --config configs/demo.yaml --data-root data/synth --out runs/demo
  cnc eval --checkpoint runs/demo/last --data-root data/synth --out runs/demo/eval
  cnc calibrate --checkpoint runs/demo/last --normal good_parts/   # thresholds from good images only
  cnc report runs/demo/eval
  cnc predict --checkpoint runs/demo/last images/ --out predictions
  cnc export --checkpoint runs/demo/last --format onnx --out model.onnx
  cnc serve --checkpoint runs/demo/last             # HTTP API + web page on http://127.0.0.1:8000/
  cnc decisions decisions/ --since 2h               # what the server decided, and the operators' corrections
  cnc calibrate --checkpoint runs/demo/last --from-feedback decisions/   # thresholds from parts confirmed good

  cnc demo                                          # all of the above on synthetic data, offline
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnc", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"cnc-ad {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"cnc_ad.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"cnc_ad.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (it may be replaced, e.g. under pytest)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always reads sys.stderr
        pass


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logger = logging.getLogger("cnc_ad")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cnc`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # for commands that relaunch themselves (train --nproc)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    _setup_logging(args.verbose, args.quiet)
    if not (getattr(args, "json", False) and getattr(args, "json_document", False)):
        return _run(args)
    with _stdout_to_stderr() as stdout:
        code = _run(args)
        summary: dict[str, Any] | None = getattr(args, "json_summary", None)
        error: dict[str, Any] | None = getattr(args, "json_error", None)
        if summary is None and error is None and code == 0:
            return code  # a process that reports nothing (a torchrun worker other than the first)
        document = {"command": args.command, "ok": code == 0, "exit_code": code, **(summary or {})}
        if error is not None:
            document["error"] = error
        stdout.write(json.dumps(_json_safe(document)) + "\n")  # ASCII: any file name, any parser
        stdout.flush()
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        try:
            return int(args.func(args) or 0)
        except ModuleNotFoundError as err:  # an optional dependency this install lacks: name the extra
            if (err.name or "").split(".")[0] not in EXTRAS:
                raise
            raise missing_extra(f"cnc {args.command}", err) from err
    except CNCError as err:  # one line, even when the message quotes a multi-line report (e.g. torch's)
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        for term, flag in FLAGS.items():
            message = message.replace(term, flag)
        print(f"cnc {args.command}: error: {message}", file=sys.stderr)
        args.json_error = {"type": type(err).__name__, "message": message}
        return err.exit_code
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        message = disk_error_message(err, "--out" if hasattr(args, "out") else "folder")
        print(f"cnc {args.command}: error: {message}", file=sys.stderr)
        args.json_error = {"type": "OSError", "message": message}
        return 1
    except KeyboardInterrupt:
        print(f"cnc {args.command}: interrupted", file=sys.stderr)
        args.json_error = {"type": "KeyboardInterrupt", "message": "interrupted"}
        return 130
    finally:
        if "torch" in sys.modules:  # leave a torchrun process group cleanly (no-op otherwise)
            from cnc_ad import distributed

            distributed.cleanup()


def disk_error_message(err: OSError, out: str) -> str:
    """The one-line message of a :data:`DISK_ERRORS` error, e.g. ``cannot write PATH: No space left on device; free
    space or choose another --out`` (``out`` names the option or thing to choose instead).
    """
    assert err.errno is not None, "only errors of DISK_ERRORS come here"
    verb, advice = DISK_ERRORS[err.errno]
    reason = err.strerror or os.strerror(err.errno)
    path = f" {os.fsdecode(err.filename)}" if err.filename is not None else ""
    return f"cannot {verb}{path}: {reason}; {advice.format(out=out)}"


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[TextIO]:
    """Send everything written to stdout (Python's and, in a real process, file descriptor 1: native libraries) to
    stderr; yield a stream that writes to the real stdout, for the one JSON object.
    """
    real = sys.stdout
    try:
        fd, err_fd = real.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stream (pytest's capsys): Python-level only
        fd = err_fd = -1
    sys.stdout = sys.stderr
    if fd != 1 or err_fd < 0:  # not the process's own stdout (a capture): Python-level only
        try:
            yield real
        finally:
            sys.stdout = real
        return
    real.flush()
    saved = os.dup(fd)
    try:
        os.dup2(err_fd, fd)
        with os.fdopen(os.dup(saved), "w", encoding="utf-8") as stream:
            yield stream
    finally:
        sys.stderr.flush()
        sys.stdout = real
        os.dup2(saved, fd)
        os.close(saved)


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as null, NumPy scalars as numbers and paths as strings (strict JSON)."""
    if hasattr(value, "item") and hasattr(value, "dtype"):  # a NumPy scalar or 0-d array
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
