"""``cnc data ...`` through ``main(argv)``: JSON schema, tables, conversions, one-line errors and exit codes."""

from __future__ import annotations

import json

import pytest

from cnc_ad.cli import main
from tests.helpers import write_image


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_scan_json_schema(synth_root, run_cli):
    done = run_cli("data", "scan", synth_root, "--json")
    assert done.code == 0
    result = json.loads(done.out)
    assert set(result) == {"format", "categories"} and result["format"] == "mvtec"
    assert sorted(result["categories"]) == ["brick", "grass", "washer"]
    for counts in result["categories"].values():
        assert counts == {"train_good": 6, "test_good": 2, "test_anomalous": 4, "masks": 4}


def test_scan_table_and_verify(synth_root, run_cli):
    code, out, _ = run_cli("-q", "data", "scan", synth_root, "--verify", "--categories", "brick,grass")
    assert code == 0
    assert "train normal" in out and "brick" in out and "washer" not in out
    assert _lines(out)[-1].split() == ["total", "12", "4", "8", "8"]


def test_scan_errors_are_one_line_with_exit_code(tmp_path, run_cli):
    code, _, err = run_cli("data", "scan", tmp_path / "missing")
    assert code == 3 and len(_lines(err)) == 1 and "does not exist" in err
    bad = tmp_path / "d" / "c" / "train" / "good" / "x.png"
    bad.parent.mkdir(parents=True)
    bad.write_text("text, not pixels")
    write_image(tmp_path / "d" / "c" / "train" / "good" / "y.png")
    code, _, err = run_cli("data", "scan", tmp_path / "d", "--verify")
    assert code == 3 and "x.png" in err and "--skip-bad" in err and "Traceback" not in err
    done = run_cli("data", "scan", tmp_path / "d", "--verify", "--skip-bad", "--json")
    assert done.code == 0
    assert json.loads(done.out)["categories"]["c"]["train_good"] == 1 and "x.png" in done.err


def test_scan_folder_options(tmp_path, run_cli):
    for name in ("a", "b", "c"):
        write_image(tmp_path / "ok" / f"{name}.png")
    done = run_cli("data", "scan", "--normal", tmp_path / "ok", "--json")
    assert done.code == 0
    result = json.loads(done.out)
    assert result["format"] == "folder"  # one category, named after the folder that holds ok/
    assert result["categories"] == {tmp_path.name: {"train_good": 3, "test_good": 0, "test_anomalous": 0, "masks": 0}}


def test_synth_export_and_import_meta(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["-q", "data", "synth", str(out), "--categories", "2", "--per-category", "2", "--size", "32"]) == 0
    assert "brick" in capsys.readouterr().out
    (tmp_path / "mine" / "brick").mkdir(parents=True)
    assert main(["data", "synth", str(tmp_path / "mine"), "--categories", "1"]) == 3
    assert "--overwrite" in capsys.readouterr().err
    assert main(["-q", "data", "export-meta", str(out), str(out / "meta.json")]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert sorted(meta["train"]) == ["brick", "washer"]
    assert main(["-q", "data", "import-meta", str(out / "meta.json"), str(tmp_path / "copy")]) == 0
    capsys.readouterr()
    assert main(["data", "scan", str(tmp_path / "copy"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["categories"]["washer"]["test_anomalous"] == 4


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "scan", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "visa-raw" in out and "--skip-bad" in out
    with pytest.raises(SystemExit):
        main(["data", "synth", "--help"])
    assert "examples:" in capsys.readouterr().out
