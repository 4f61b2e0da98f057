"""``cnc report``: a self-contained HTML report from a fake evaluation folder, checked as text and in Chromium."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnc_ad.cli import main
from cnc_ad.report import pixel_threshold, write_report

MAP_SIZE = 32
IMAGE_SIZE = 48  # differs from MAP_SIZE: the report resizes images to the map size
METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
BOTTLE = dict(zip(METRIC_KEYS, (0.9876, 0.9912, 0.9701, 0.9656, 0.5432, 0.5678, 0.9123), strict=True))
METAL_NUT = dict(zip(METRIC_KEYS, (0.9346, 0.9567, 0.9001, 0.9789, 0.4321, 0.4766, math.nan), strict=True))
BOTTLE_PIXEL_THRESHOLD = 0.5
SHARED_PIXEL_THRESHOLD = 0.9  # above every map value: a report that ignores bottle's own threshold predicts nothing


def _blob(offset: int) -> np.ndarray:
    """(MAP_SIZE, MAP_SIZE) bool square, the fake defect."""
    mask = np.zeros((MAP_SIZE, MAP_SIZE), dtype=bool)
    mask[offset : offset + 12, offset : offset + 12] = True
    return mask


def make_eval_dir(root: Path) -> Path:
    """Write what `cnc eval --out DIR` writes, for 2 categories, with one NaN metric and one missing image."""
    rng = np.random.default_rng(0)
    eval_dir, data = root / "eval", root / "data"
    (eval_dir / "examples").mkdir(parents=True)
    data.mkdir()
    metrics = {
        "categories": {"bottle": BOTTLE, "metal_nut": METAL_NUT},
        "mean": {key: float(np.nanmean([BOTTLE[key], METAL_NUT[key]])) for key in METRIC_KEYS},
        "left_out_of_mean": {"pixel_aupro": ["metal_nut"]},
        "protocol": "ader",
        "checkpoint": "runs/demo/last",
        "date": "2026-11-28 15:51",
    }
    (eval_dir / "metrics.json").write_text(json.dumps(metrics, allow_nan=True))
    thresholds = {
        "image": {"__all__": 0.5, "bottle": 0.5, "metal_nut": 0.5},
        "pixel": {"__all__": SHARED_PIXEL_THRESHOLD, "bottle": BOTTLE_PIXEL_THRESHOLD},
    }
    (eval_dir / "thresholds.json").write_text(json.dumps(thresholds))
    ramp = np.linspace(0.0, 1.0, 20)
    curve = {"x": ramp.tolist(), "y": np.sqrt(ramp).tolist()}
    curves = {
        cat: {"image_roc": curve, "image_pr": curve, "pixel_roc": curve, "pixel_pr": curve, "pixel_pro": curve}
        for cat in ("bottle", "metal_nut")
    }
    (eval_dir / "curves.json").write_text(json.dumps(curves))
    examples: dict[str, list[dict]] = {}
    for cat in ("bottle", "metal_nut"):
        examples[cat] = []
        for k, (rank, label) in enumerate([("most", 1), ("most", 1), ("least", 0), ("least", 0)]):
            image = (rng.random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 80 + 90).astype(np.uint8)
            image_path = data / f"{cat}_{k}.png"
            defect = _blob(6 + 4 * k) if label else np.zeros((MAP_SIZE, MAP_SIZE), dtype=bool)
            anomaly_map = np.where(defect, 0.8, 0.2) + rng.random((MAP_SIZE, MAP_SIZE)) * 0.05
            mask_path = None
            if label:
                mask_path = data / f"{cat}_{k}_mask.png"
                Image.fromarray(defect.astype(np.uint8) * 255).save(mask_path)
            if not (cat == "metal_nut" and k == 3):  # this image is missing on disk
                Image.fromarray(image).save(image_path)
            map_name = f"examples/{cat}_{rank}_{k}.npy"
            np.save(eval_dir / map_name, anomaly_map.astype(np.float16))
            examples[cat].append(
                {
                    "image": str(image_path),
                    "score": float(anomaly_map.max()),
                    "label": label,
                    "defect": "scratch & dent" if label else "good",
                    "map": map_name,
                    "mask": str(mask_path) if mask_path else None,
                    "rank": rank,
                }
            )
    (eval_dir / "examples.json").write_text(json.dumps(examples))
    return eval_dir


def _decode_img(html_text: str, alt: str) -> np.ndarray:
    match = re.search(r'<img src="data:image/\w+;base64,([^"]+)" alt="' + re.escape(alt) + '"', html_text)
    assert match, f"no <img> with alt={alt!r}"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(match.group(1)))).convert("RGB"))


@pytest.fixture
def eval_dir(tmp_path: Path) -> Path:
    return make_eval_dir(tmp_path)


def test_cli_writes_self_contained_report(eval_dir: Path, capsys):
    assert main(["report", str(eval_dir)]) == 0
    report = eval_dir / "report.html"
    captured = capsys.readouterr()
    assert captured.out.strip() == str(report)
    text = report.read_text(encoding="utf-8")

    # Self-contained: every src/href is a data URI or an in-page anchor; no stylesheet or font is fetched.
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", text)
    assert references
    assert all(ref.startswith(("data:", "#")) for ref in references), [r[:40] for r in references]
    assert not re.search(r"""(?:src|href)\s*=\s*["']?https?://""", text)
    assert all(ref.startswith(("#", "data:")) for ref in re.findall(r"url\(\s*['\"]?([^)'\"]*)", text))
    assert "@import" not in text and "<script" not in text
    assert not (eval_dir / "report.html.partial").exists()

    # Metadata and the metric table: percentages with one decimal, the mean row, NaN as n/a with a note.
    assert "runs/demo/last" in text and "ader" in text and "2026-11-28 15:51" in text
    table = text[text.index('<table class="metrics">') : text.index("</table>")]
    for value in (98.8, 99.1, 97.0, 96.6, 54.3, 56.8, 91.2, 93.5, 95.7, 90.0, 97.9, 43.2, 47.7):
        assert f"<td>{value:.1f}</td>" in table
    assert '<td class="na">n/a</td>' in table
    assert '<tr class="mean"><th scope="row">mean</th><td>96.1</td>' in table  # (98.76 + 93.46) / 2
    assert re.search(r"left out of its mean\. AUPRO: metal_nut", text)

    # Curves (inline SVG, one per category) and the example rows with their four columns.
    assert text.count('<figure class="curves"><svg') == 2
    assert "false positive rate" in text and "per-region overlap" in text
    for column in ("image", "heatmap overlay", "predicted mask", "ground truth"):
        assert f'<th scope="col">{column}</th>' in text
    assert text.count("most anomalous #") == 4 and text.count("least anomalous #") == 4
    assert "anomalous (scratch &amp; dent)" in text and "scratch & dent" not in text

    # The missing image: a placeholder and a warning, the rest of its row still drawn.
    assert text.count('<div class="placeholder">image missing</div>') == 1
    assert re.search(r"WARNING cnc_ad.report: cannot read image .*metal_nut_3.png", captured.err)
    assert text.count('<img src="data:image/') == 8 * 4 - 1
    assert _decode_img(text, "heatmap of metal_nut_3.png").shape == (MAP_SIZE, MAP_SIZE, 3)


def test_predicted_mask_is_the_map_above_the_category_threshold(eval_dir: Path):
    text = write_report(eval_dir).read_text(encoding="utf-8")
    predicted = _decode_img(text, "predicted mask of bottle_0.png")
    white = predicted.min(axis=2) > 200  # the ground-truth boundary is drawn in red, inside the defect
    defect = _blob(6)
    assert predicted.shape == (MAP_SIZE, MAP_SIZE, 3)
    assert white[defect].mean() > 0.5 and not white[~defect].any()
    truth = _decode_img(text, "ground truth of bottle_0.png")
    np.testing.assert_array_equal(truth[..., 0] > 127, defect)
    # metal_nut has no pixel threshold of its own: the shared one (above every score) predicts nothing.
    assert not (_decode_img(text, "predicted mask of metal_nut_0.png").min(axis=2) > 200).any()


def test_pixel_threshold_falls_back_to_the_shared_one():
    thresholds = {"pixel": {"__all__": 0.7, "a": 0.3, "b": math.nan}}
    assert pixel_threshold(thresholds, "a") == 0.3
    assert pixel_threshold(thresholds, "b") == 0.7
    assert pixel_threshold(thresholds, "c") == 0.7
    assert pixel_threshold({}, "a") is None


def test_out_option(eval_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "reports" / "demo.html"
    assert main(["report", str(eval_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_missing_metrics_json_says_to_run_eval(tmp_path: Path, capsys):
    assert main(["report", str(tmp_path)]) == 3  # DataError
    err = capsys.readouterr().err
    assert "metrics.json" in err and "cnc eval" in err and "--out" in err
    assert err.count("\n") == 1


def test_missing_optional_files_still_give_a_report(eval_dir: Path):
    for name in ("curves.json", "examples.json", "thresholds.json"):
        (eval_dir / name).unlink()
    text = write_report(eval_dir).read_text(encoding="utf-8")
    assert "No curves recorded" in text and "No example images recorded" in text and "<td>98.8</td>" in text


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "cnc report runs/demo/eval" in out and "--out FILE" in out and "cnc eval" in out


def _chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,2000",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.browser
def test_report_renders_in_headless_chromium(eval_dir: Path, tmp_path: Path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (`apt-get install chromium`; .ci/run installs it)")
    url = write_report(eval_dir).resolve().as_uri()

    screenshot = tmp_path / "report.png"
    _chromium(chromium, tmp_path / "profile-shot", f"--screenshot={screenshot}", url)
    assert screenshot.is_file() and screenshot.stat().st_size > 20_000
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(np.int16)
    assert pixels.shape == (2000, 1400, 3)
    assert pixels.std() > 20  # not a blank page
    # The example thumbnails were decoded and painted: the black backgrounds of the masks fill large squares
    # (a broken image shows only an icon and its alt text).
    assert (pixels.max(axis=2) < 16).sum() > 100_000

    dom = _chromium(chromium, tmp_path / "profile-dom", "--dump-dom", url).stdout
    assert '<table class="metrics">' in dom
    for category in ("bottle", "metal_nut"):
        assert f">{category}</a></th>" in dom
    assert len(re.findall(r'<img src="data:image/(?:jpeg|png);base64,', dom)) == 8 * 4 - 1
    assert dom.count("<svg") >= 2
