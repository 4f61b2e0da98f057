"""`cnc models`: presets with parameter counts and GFLOPs."""

from __future__ import annotations

import json


def test_models_json(run_cli):
    done = run_cli("models", "--json", "--preset", "tiny", "--preset", "cnc-effnet-lite0")
    assert done.code == 0
    presets = json.loads(done.out)["presets"]
    assert set(presets) == {"tiny", "cnc-effnet-lite0"}
    for info in presets.values():
        assert set(info) == {"trainable_params", "frozen_params", "gflops", "image_size"}
        assert info["trainable_params"] > 0 and info["frozen_params"] > 0 and info["gflops"] > 0
    assert presets["cnc-effnet-lite0"]["image_size"] == 256


def test_models_table_and_unknown_preset(run_cli):
    done = run_cli("models", "--preset", "tiny")
    assert done.code == 0 and "tiny" in done.out and "GFLOPs" in done.out
    code, _, err = run_cli("models", "--preset", "nope")
    assert code == 2 and "unknown preset" in err
