"""`cnc models`: presets with parameter counts and GFLOPs."""

from __future__ import annotations

import json

from cnc_ad.cli import main


def test_models_json(capsys):
    assert main(["models", "--json", "--preset", "tiny", "--preset", "cnc-effnet-lite0"]) == 0
    presets = json.loads(capsys.readouterr().out)["presets"]
    assert set(presets) == {"tiny", "cnc-effnet-lite0"}
    for info in presets.values():
        assert set(info) == {"trainable_params", "frozen_params", "gflops", "image_size"}
        assert info["trainable_params"] > 0 and info["frozen_params"] > 0 and info["gflops"] > 0
    assert presets["cnc-effnet-lite0"]["image_size"] == 256


def test_models_table_and_unknown_preset(capsys):
    assert main(["models", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "GFLOPs" in out
    assert main(["models", "--preset", "nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
