"""The `cnc` entry point: version, help, and the one-line errors of a full, read-only or failing disk."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from cnc_ad import __version__
from cnc_ad.cli import main
from cnc_ad.deploy import predict as predict_module
from tests.helpers import save_tiny_checkpoint, write_image


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_without_command(capsys):
    assert main([]) == 0
    assert "typical workflow" in capsys.readouterr().out


@pytest.fixture(scope="module")
def predict_argv(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("disk")
    checkpoint = save_tiny_checkpoint(root / "ckpt", {"image": {"__all__": 0.0}})
    image = write_image(root / "a.png")
    return ["-q", "predict", "--checkpoint", str(checkpoint), str(image), "--device", "cpu", "--num-workers", "0",
            "--no-progress"]  # fmt: skip


@pytest.mark.parametrize(
    ("code", "reason", "advice"),
    [
        (errno.ENOSPC, "No space left on device", "free space or choose another --out"),
        (errno.EROFS, "Read-only file system", "choose another --out"),
    ],
)
def test_a_full_or_read_only_disk_is_one_line(
    predict_argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    code: int,
    reason: str,
    advice: str,
) -> None:
    out = tmp_path / "out"

    def failing(path: Path, data: bytes) -> None:
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(predict_module, "atomic_write_bytes", failing)
    assert main([*predict_argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"cnc predict: error: cannot write {out / 'maps'}") and f": {reason}; {advice}\n" in err
    assert main([*predict_argv, "--out", str(out), "--overwrite", "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["ok"] is False and document["exit_code"] == 1
    assert document["error"]["type"] == "OSError" and document["error"]["message"].endswith(f"{reason}; {advice}")


def test_other_os_errors_are_not_hidden(
    predict_argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def failing(path: Path, data: bytes) -> None:
        raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))

    monkeypatch.setattr(predict_module, "atomic_write_bytes", failing)
    with pytest.raises(OSError, match="File name too long"):  # not a disk state: a bug to see with its traceback
        main([*predict_argv, "--out", str(tmp_path / "out")])
