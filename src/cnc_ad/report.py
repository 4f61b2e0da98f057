"""The evaluation report: one self-contained ``report.html`` built from an evaluation folder (``cnc eval --out DIR``).

The page holds the metric table (categories x the seven metrics of docs/metrics.md, in %), per-category ROC, PR and
PRO curves (inline SVG drawn with matplotlib) and, for each category, the most and least anomalous test images as
image | heatmap overlay | predicted mask | ground truth. Every picture is embedded as a base64 data URI, so the file
can be mailed or archived on its own. The input layout is the "Evaluation folder" of ``docs/architecture.md``.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnc_ad import __version__
from cnc_ad.data.images import IMAGE_FORMATS
from cnc_ad.files import atomic_write_text
from cnc_ad.metrics import MAX_FPR, METRIC_KEYS, METRIC_LABELS
from cnc_ad.results import CURVES_FILE, EXAMPLES_FILE, REPORT_FILE, StoredEvaluation, read_evaluation
from cnc_ad.thresholds import Thresholds
from cnc_ad.visualize import colorize, mask_to_rgb, outline, overlay, resize_map, to_jpeg_bytes, to_png_bytes

logger = logging.getLogger(__name__)

REPORT_SIZE_WARNING_MB = 20.0


Evaluation = StoredEvaluation  # the contents of an evaluation folder (see :mod:`cnc_ad.results`)


def load_evaluation(eval_dir: str | Path) -> Evaluation:
    """Read the JSON files of an evaluation folder; an absent optional file is logged and left out of the report.

    Raises:
        DataError: ``eval_dir`` has no ``metrics.json`` (it is not an evaluation folder), or a file is not valid JSON
            of the documented shape.
    """
    evaluation = read_evaluation(eval_dir)
    for name in evaluation.missing:
        logger.warning("%s is missing; the report leaves out what it holds", evaluation.root / name)
    return evaluation


def write_report(
    eval_dir: str | Path, out: str | Path | None = None, *, thumbnail_size: int = 256, jpeg_quality: int = 85
) -> Path:
    """Write the self-contained HTML report of an evaluation folder.

    Args:
        eval_dir: folder written by ``cnc eval --out DIR``.
        out: the HTML file to write (default ``eval_dir/report.html``); parent folders are created.
        thumbnail_size: side in pixels of the example thumbnails (at most the anomaly map size). Smaller values
            make a smaller file; 15 categories with 6 examples each at 256 make about 2 MB.
        jpeg_quality: JPEG quality (1-95) of the embedded images and overlays; masks are PNG.

    Returns:
        The path of the written report.

    Raises:
        DataError: ``eval_dir`` is not an evaluation folder (see :func:`load_evaluation`).
    """
    evaluation = load_evaluation(eval_dir)
    out = Path(out) if out is not None else evaluation.root / REPORT_FILE
    page = render_report(evaluation, thumbnail_size=thumbnail_size, jpeg_quality=jpeg_quality)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)  # temporary file, fsync, rename: never a half-written report
    size_mb = out.stat().st_size / 1e6
    logger.info("wrote %s (%.1f MB)", out, size_mb)
    if size_mb > REPORT_SIZE_WARNING_MB:
        logger.warning("%s is %.1f MB; a smaller thumbnail_size or jpeg_quality makes it lighter", out, size_mb)
    return out


def render_report(evaluation: Evaluation, *, thumbnail_size: int = 256, jpeg_quality: int = 85) -> str:
    """Return the report of ``evaluation`` as one HTML document (see :func:`write_report` for the arguments)."""
    categories = evaluation.categories
    anchors = {category: f"cat-{i}-{_slug(category)}" for i, category in enumerate(categories)}
    nav = "".join(f'<li><a href="#{anchors[c]}">{_esc(c)}</a></li>' for c in categories)
    sections = []
    for index, category in enumerate(categories):
        row = evaluation.metrics["categories"][category]
        sections.append(
            f'<section class="category" id="{anchors[category]}">\n'
            f'<h2>{_esc(category)} <a class="top" href="#metrics">back to the table</a></h2>\n'
            f"{_metric_summary(row)}\n"
            f"{_curves_figure(category, evaluation.curves.get(category), row, salt=f'c{index}')}\n"
            f"{_examples_table(evaluation, category, thumbnail_size, jpeg_quality)}\n</section>"
        )
    return _PAGE.format(
        title=_esc(_title(evaluation.metrics)),
        css=_CSS,
        metadata=_metadata(evaluation),
        nav=nav,
        table=_metric_table(evaluation.metrics, anchors),
        legend=_LEGEND.format(max_fpr=MAX_FPR),
        sections="\n".join(sections),
        version=_esc(__version__),
    )


def pixel_threshold(thresholds: Thresholds | Mapping[str, Any], category: str) -> float | None:
    """The finite pixel threshold of ``category``, else the shared one, else None (a ``thresholds.json`` mapping or
    :class:`~cnc_ad.results.Thresholds`).
    """
    if not isinstance(thresholds, Thresholds):
        thresholds = Thresholds.from_json(thresholds)
    return thresholds.fallback("pixel", category)


# ---------------------------------------------------------------------------------------------------------------------
# Header, metadata and metric table


def _title(metrics: Mapping[str, Any]) -> str:
    checkpoint = metrics.get("checkpoint")
    return f"CNC evaluation report: {checkpoint}" if checkpoint else "CNC evaluation report"


def _metadata(evaluation: Evaluation) -> str:
    metrics = evaluation.metrics
    items: list[tuple[str, str]] = [
        ("checkpoint", str(metrics.get("checkpoint") or "n/a")),
        ("protocol", str(metrics.get("protocol") or "n/a")),
    ]
    if metrics.get("date"):
        items.append(("date", str(metrics["date"])))
    else:
        mtime = dt.datetime.fromtimestamp(evaluation.metrics_path.stat().st_mtime)
        items.append(("date", f"{mtime:%Y-%m-%d %H:%M} ({evaluation.metrics_path.name} written)"))
    # Any other plain values cnc eval records (dataset, map size, ...), shown as they are.
    for key, value in metrics.items():
        if key not in {"categories", "mean", "checkpoint", "protocol", "date"} and isinstance(value, str | int | float):
            items.append((key.replace("_", " "), str(value)))
    items.append(("evaluation folder", str(evaluation.root.resolve())))
    items.append(("categories", str(len(evaluation.categories))))
    return "".join(f"<dt>{_esc(key)}</dt><dd>{_esc(value)}</dd>" for key, value in items)


def _metric_keys(metrics: Mapping[str, Any]) -> list[str]:
    """The seven known metrics that are present, in table order, then any other metric keys found."""
    found: dict[str, None] = {}
    for row in [*metrics["categories"].values(), metrics.get("mean") or {}]:
        found.update(dict.fromkeys(row))
    return [key for key in METRIC_KEYS if key in found] + sorted(key for key in found if key not in METRIC_KEYS)


def _metric_table(metrics: Mapping[str, Any], anchors: Mapping[str, str]) -> str:
    keys = _metric_keys(metrics)
    head = "".join(f'<th scope="col" title="{_esc(key)}">{_esc(METRIC_LABELS.get(key, key))}</th>' for key in keys)
    rows = []
    left_out: dict[str, list[str]] = {}
    for category, row in metrics["categories"].items():
        cells = []
        for key in keys:
            value = _as_float(row.get(key))
            if not math.isfinite(value):
                left_out.setdefault(key, []).append(category)
            cells.append(_percent_cell(value))
        link = f'<a href="#{anchors[category]}">{_esc(category)}</a>'
        rows.append(f'<tr><th scope="row">{link}</th>{"".join(cells)}</tr>')
    mean = metrics.get("mean") or {}
    mean_cells = "".join(_percent_cell(_as_float(mean.get(key))) for key in keys)
    rows.append(f'<tr class="mean"><th scope="row">mean</th>{mean_cells}</tr>')
    note = ""
    if left_out:
        parts = "; ".join(
            f"{_esc(METRIC_LABELS.get(key, key))}: {_esc(', '.join(cats))}" for key, cats in left_out.items()
        )
        note = (
            '<p class="note"><strong>n/a</strong>: the metric is undefined for that category (for example no '
            f"anomalous test image, or no defect pixels) and the category was left out of its mean. {parts}.</p>"
        )
    return (
        f'<table class="metrics">\n<thead><tr><th scope="col">category</th>{head}</tr></thead>\n'
        f"<tbody>\n{chr(10).join(rows)}\n</tbody>\n</table>\n{note}"
    )


def _metric_summary(row: Mapping[str, Any]) -> str:
    parts = [
        f"<span>{_esc(METRIC_LABELS.get(key, key))} <b>{_esc(_percent(_as_float(row.get(key))))}</b></span>"
        for key in METRIC_KEYS
        if key in row
    ]
    return f'<p class="summary">{"".join(parts)}</p>'


def _percent(value: float) -> str:
    return f"{100.0 * value:.1f}" if math.isfinite(value) else "n/a"


def _percent_cell(value: float) -> str:
    return f"<td>{_percent(value)}</td>" if math.isfinite(value) else '<td class="na">n/a</td>'


# ---------------------------------------------------------------------------------------------------------------------
# Curves


def _curves_figure(category: str, curves: Mapping[str, Any] | None, row: Mapping[str, Any], salt: str) -> str:
    """ROC, PR and PRO panels of one category as an inline SVG ``<figure>``."""
    import matplotlib
    from matplotlib.figure import Figure

    if not curves:
        logger.warning("%s has no curves for category %r", CURVES_FILE, category)
        return '<p class="note">No curves recorded for this category.</p>'

    def auc_label(kind: str, key: str) -> str:
        return f"{kind} ({METRIC_LABELS[key]} {_percent(_as_float(row.get(key)))})"

    panels = (
        (
            "ROC",
            "false positive rate",
            "true positive rate",
            [("image_roc", "image_auroc"), ("pixel_roc", "pixel_auroc")],
        ),
        ("Precision-recall", "recall", "precision", [("image_pr", "image_ap"), ("pixel_pr", "pixel_ap")]),
        ("PRO", "false positive rate", "per-region overlap", [("pixel_pro", "pixel_aupro")]),
    )
    colors = {"image": "#1f5fa8", "pixel": "#d1495b"}
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt, "font.size": 9}):
        figure = Figure(figsize=(10.5, 3.2), layout="constrained")
        for ax, (title, xlabel, ylabel, series) in zip(figure.subplots(1, 3), panels, strict=True):
            drawn = 0
            for curve_key, metric_key in series:
                points = _curve_points(category, curve_key, curves.get(curve_key))
                if points is None:
                    continue
                kind = curve_key.split("_")[0]
                ax.plot(*points, color=colors[kind], linewidth=1.6, label=auc_label(kind, metric_key))
                drawn += 1
            if title == "ROC":
                ax.plot([0, 1], [0, 1], color="#999999", linewidth=0.8, linestyle=":")
            if title == "PRO":
                ax.axvline(MAX_FPR, color="#666666", linewidth=0.8, linestyle="--")
            if drawn:
                ax.legend(loc="lower right" if title != "Precision-recall" else "lower left", frameon=False)
            else:
                ax.text(0.5, 0.5, "no curve recorded", ha="center", va="center", transform=ax.transAxes)
            ax.set(title=title, xlabel=xlabel, ylabel=ylabel, ylim=(-0.02, 1.02))
            ax.grid(True, linewidth=0.4, alpha=0.5)
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]  # drop the XML prolog and DOCTYPE: the SVG is inlined in HTML
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.DOTALL)
    caption = (
        "Image-level (blue) and pixel-level (red) curves. The dashed line on the PRO panel marks the false positive "
        f"rate {MAX_FPR} up to which AUPRO integrates."
    )
    return f'<figure class="curves">{svg}<figcaption>{_esc(caption)}</figcaption></figure>'


def _curve_points(category: str, name: str, curve: Any) -> tuple[np.ndarray, np.ndarray] | None:
    if curve is None:
        return None
    try:
        x = np.asarray(curve["x"], dtype=np.float64)
        y = np.asarray(curve["y"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        logger.warning("%s: %s/%s is not {'x': [...], 'y': [...]}; left out", CURVES_FILE, category, name)
        return None
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        logger.warning(
            "%s: %s/%s: x and y are not non-empty lists of one length; left out", CURVES_FILE, category, name
        )
        return None
    return x, y


# ---------------------------------------------------------------------------------------------------------------------
# Examples


@dataclass
class _Example:
    entry: Mapping[str, Any]
    image: np.ndarray | None  # (T, T, 3) uint8
    anomaly_map: np.ndarray | None  # (M, M) float32
    mask: np.ndarray | None  # (T, T) bool; None when the mask file is missing or unreadable


def _examples_table(evaluation: Evaluation, category: str, thumbnail_size: int, jpeg_quality: int) -> str:
    entries = evaluation.examples.get(category) or []
    if not entries:
        return '<p class="note">No example images recorded for this category.</p>'
    most = sorted((e for e in entries if e.get("rank") == "most"), key=lambda e: -_as_float(e.get("score")))
    least = sorted((e for e in entries if e.get("rank") != "most"), key=lambda e: _as_float(e.get("score")))
    maps = [_load_map(evaluation.root, entry) for entry in [*most, *least]]
    map_side = max((m.shape[0] for m in maps if m is not None), default=thumbnail_size)
    side = min(thumbnail_size, map_side)
    examples = [
        _Example(
            entry, _load_image(evaluation.root, entry, side), anomaly_map, _load_mask(evaluation.root, entry, side)
        )
        for entry, anomaly_map in zip([*most, *least], maps, strict=True)
    ]
    finite = [m[np.isfinite(m)] for m in maps if m is not None]
    values = np.concatenate(finite) if finite else np.zeros(1, dtype=np.float32)
    vmin, vmax = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    threshold = pixel_threshold(evaluation.thresholds, category)

    threshold_text = f"{threshold:.4g}" if threshold is not None else "none recorded"
    scale = (
        f'<p class="scale"><span class="colorbar" style="background: {_colorbar_css()}"></span> '
        f"heatmap scale {vmin:.4g} (blue) to {vmax:.4g} (red), shared by this category's examples; "
        f"pixel threshold {_esc(threshold_text)}.</p>"
    )
    rows = []
    for label, chosen in (("most anomalous", examples[: len(most)]), ("least anomalous", examples[len(most) :])):
        if not chosen:
            continue
        rows.append(f'<tr class="group"><th colspan="5">{_esc(label)} test images</th></tr>')
        for rank, example in enumerate(chosen, start=1):
            cells = _example_cells(example, side, vmin, vmax, threshold, jpeg_quality)
            rows.append(f'<tr><td class="info">{_example_info(example.entry, label, rank)}</td>{cells}</tr>')
    head = "".join(f'<th scope="col">{name}</th>' for name in _EXAMPLE_COLUMNS)
    return (
        f'{scale}\n<table class="examples">\n<thead><tr><th scope="col">example</th>{head}</tr></thead>\n'
        f"<tbody>\n{chr(10).join(rows)}\n</tbody>\n</table>"
    )


_EXAMPLE_COLUMNS = ("image", "heatmap overlay", "predicted mask", "ground truth")


def _example_info(entry: Mapping[str, Any], label: str, rank: int) -> str:
    truth = "anomalous" if _is_anomalous(entry) else "normal"
    defect = str(entry.get("defect") or "")
    truth_text = f"{truth} ({defect})" if defect and truth == "anomalous" else truth
    name = Path(str(entry.get("image", ""))).name
    score = _as_float(entry.get("score"))
    path = str(entry.get("image", ""))
    return (
        f"<b>{_esc(label)} #{rank}</b><br>score {score:.4g}<br>{_esc(truth_text)}<br>"
        f'<span class="file" title="{_esc(path)}">{_esc(name)}</span>'
    )


def _example_cells(
    example: _Example, side: int, vmin: float, vmax: float, threshold: float | None, jpeg_quality: int
) -> str:
    entry = example.entry
    name = Path(str(entry.get("image", ""))).name
    cells = []
    # image
    if example.image is not None:
        cells.append(_img(to_jpeg_bytes(example.image, jpeg_quality), "image/jpeg", f"{name}", side))
    else:
        cells.append(_placeholder("image missing"))
    # heatmap overlay (the bare heatmap when the image is missing)
    if example.anomaly_map is None:
        cells.append(_placeholder("map missing"))
    else:
        small_map = resize_map(example.anomaly_map, (side, side))
        if example.image is not None:
            picture = overlay(example.image, small_map, alpha=0.5, vmin=vmin, vmax=vmax)
        else:
            picture = colorize(small_map, vmin=vmin, vmax=vmax)
        cells.append(_img(to_jpeg_bytes(picture, jpeg_quality), "image/jpeg", f"heatmap of {name}", side))
    # predicted mask, with the ground-truth boundary in red
    if example.anomaly_map is None or threshold is None:
        cells.append(_placeholder("map missing" if example.anomaly_map is None else "no threshold"))
    else:
        predicted = mask_to_rgb(resize_map(example.anomaly_map, (side, side)) >= threshold)
        if example.mask is not None and example.mask.any():
            predicted = outline(predicted, example.mask, color=(230, 57, 70), width=max(1, side // 128))
        cells.append(_img(to_png_bytes(predicted), "image/png", f"predicted mask of {name}", side))
    # ground truth
    if example.mask is not None:
        cells.append(_img(to_png_bytes(mask_to_rgb(example.mask)), "image/png", f"ground truth of {name}", side))
    else:
        cells.append(_placeholder("mask missing"))
    return "".join(f"<td>{cell}</td>" for cell in cells)


def _load_map(root: Path, entry: Mapping[str, Any]) -> np.ndarray | None:
    """The example's ``(M, M)`` float32 anomaly map, or None (with a warning) when it cannot be read."""
    if not entry.get("map"):
        logger.warning("%s: %s has no anomaly map", EXAMPLES_FILE, entry.get("image"))
        return None
    path = _resolve(root, str(entry["map"]))
    try:
        anomaly_map = np.load(path, allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as err:
        logger.warning("cannot read anomaly map %s (%s); shown as a placeholder", path, err)
        return None
    anomaly_map = np.squeeze(anomaly_map)
    if anomaly_map.ndim != 2:
        logger.warning("anomaly map %s has shape %s, not (M, M); shown as a placeholder", path, anomaly_map.shape)
        return None
    return anomaly_map


def _load_image(root: Path, entry: Mapping[str, Any], side: int) -> np.ndarray | None:
    """The example image as ``(side, side, 3)`` uint8 RGB, or None (with a warning) when it cannot be read."""
    path = _resolve(root, str(entry.get("image", "")))
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:
            return np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        logger.warning("cannot read image %s (%s); shown as a placeholder", path, err)
        return None


def _load_mask(root: Path, entry: Mapping[str, Any], side: int) -> np.ndarray | None:
    """The ground-truth mask as ``(side, side)`` bool; all False for a normal image without a mask file."""
    if not entry.get("mask"):
        if _is_anomalous(entry):
            logger.warning(
                "%s: anomalous image %s has no mask; shown as a placeholder", EXAMPLES_FILE, entry.get("image")
            )
            return None
        return np.zeros((side, side), dtype=bool)
    path = _resolve(root, str(entry["mask"]))
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as mask:
            foreground = np.asarray(mask.convert("L")) > 0
    except (OSError, UnidentifiedImageError, ValueError) as err:
        logger.warning("cannot read mask %s (%s); shown as a placeholder", path, err)
        return None
    return np.asarray(Image.fromarray(foreground).resize((side, side), Image.Resampling.NEAREST))


def _resolve(root: Path, name: str) -> Path:
    """A path from the evaluation files: absolute, else relative to the evaluation folder, else to the cwd."""
    path = Path(name)
    if path.is_absolute():
        return path
    in_root = root / path
    return in_root if in_root.exists() or not path.exists() else path


# ---------------------------------------------------------------------------------------------------------------------
# HTML helpers


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _img(data: bytes, mime: str, alt: str, side: int) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return (
        f'<img src="data:{mime};base64,{encoded}" alt="{_esc(alt)}" width="{side}" height="{side}" class="{mime[6:]}">'
    )


def _placeholder(text: str) -> str:
    return f'<div class="placeholder">{_esc(text)}</div>'


def _colorbar_css() -> str:
    stops = colorize(np.linspace(0.0, 1.0, 9, dtype=np.float32)[None, :], vmin=0.0, vmax=1.0)[0]
    return "linear-gradient(to right, " + ", ".join(f"rgb({r},{g},{b})" for r, g, b in stops) + ")"


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_-]+", "-", text).strip("-") or "category"


def _is_anomalous(entry: Mapping[str, Any]) -> bool:
    return _as_float(entry.get("label")) == 1.0


def _as_float(value: Any) -> float:
    """A JSON number as float; None, NaN and anything non-numeric become NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


_LEGEND = """\
<p class="legend"><b>I-</b> image level (is the image anomalous?), <b>P-</b> pixel level (where is the defect?).
<b>AUROC</b>: area under the ROC curve. <b>AP</b>: average precision (area under the precision-recall curve).
<b>F1max</b>: best F1 score over all thresholds. <b>AUPRO</b>: area under the per-region-overlap curve up to a false
positive rate of {max_fpr}, divided by {max_fpr}. All values in %; the mean row averages the categories.</p>
<p class="legend">Examples, per category: <b>image</b> the test image as the model sees it (resized square);
<b>heatmap overlay</b> the anomaly map over the image (blue normal, red anomalous); <b>predicted mask</b> the pixels
whose score reaches the category's pixel threshold (the one maximising pixel F1), with the ground-truth boundary in
red; <b>ground truth</b> the annotated defect (black for a normal image).</p>"""

_CSS = """\
:root { --ink: #1d2430; --muted: #5b6472; --line: #d9dee5; --band: #f4f6f9; --accent: #1f5fa8; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 24px; margin: 0 0 8px; }
h2 { font-size: 19px; margin: 0 0 6px; padding-top: 8px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0 16px;
          color: var(--muted); }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; word-break: break-all; }
nav ul { list-style: none; padding: 0; margin: 0 0 20px; display: flex; flex-wrap: wrap; gap: 6px; }
nav li a { display: block; padding: 3px 10px; border: 1px solid var(--line); border-radius: 12px;
           background: var(--band); }
table { border-collapse: collapse; }
table.metrics { margin: 8px 0; font-variant-numeric: tabular-nums; }
table.metrics th, table.metrics td { padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: right; }
table.metrics th[scope=row], table.metrics thead th:first-child { text-align: left; }
table.metrics thead th { border-bottom: 2px solid var(--ink); }
table.metrics tbody tr:nth-child(even) { background: var(--band); }
table.metrics tr.mean th, table.metrics tr.mean td { font-weight: 700; border-top: 2px solid var(--ink); }
td.na { color: var(--muted); font-style: italic; }
.note, .legend, figcaption, .scale { color: var(--muted); font-size: 13px; max-width: 1100px; }
section.category { border-top: 1px solid var(--line); margin-top: 28px; padding-top: 8px; }
p.summary { display: flex; flex-wrap: wrap; gap: 6px 18px; margin: 0 0 8px; color: var(--muted); }
p.summary b { color: var(--ink); }
figure.curves { margin: 8px 0 12px; }
figure.curves svg { width: 100%; max-width: 1100px; height: auto; }
.colorbar { display: inline-block; width: 120px; height: 10px; vertical-align: middle; border-radius: 2px; }
table.examples th, table.examples td { padding: 4px 6px; vertical-align: top; }
table.examples thead th { text-align: left; border-bottom: 2px solid var(--ink); }
table.examples tr.group th { text-align: left; padding-top: 14px; color: var(--muted); font-weight: 600;
                             border-bottom: 1px solid var(--line); }
table.examples td.info { width: 190px; font-size: 13px; }
table.examples img, .placeholder { display: block; width: 200px; height: 200px; border: 1px solid var(--line); }
table.examples img.png { image-rendering: pixelated; }  /* masks stay crisp when enlarged */
a.top { font-size: 12px; font-weight: 400; margin-left: 10px; }
.placeholder { display: flex; align-items: center; justify-content: center; color: var(--muted); font-size: 13px;
               background: repeating-linear-gradient(45deg, #f6f7f9, #f6f7f9 8px, #eceff3 8px, #eceff3 16px); }
.file { color: var(--muted); word-break: break-all; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""

_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{css}</style>
</head>
<body>
<main>
<h1>{title}</h1>
<dl class="meta">{metadata}</dl>
<nav><ul>{nav}</ul></nav>
<h2 id="metrics">Metrics</h2>
{table}
{legend}
{sections}
<footer>Written by cnc-ad {version} (<code>cnc report</code>). Self-contained: every image is embedded.</footer>
</main>
</body>
</html>
"""
