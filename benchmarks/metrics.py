"""Speed, agreement and memory of cnc_ad.metrics on a synthetic MVTec-sized test set. Prints; never asserts.

Full mode (default for up to 2,000 images): every category's maps are generated first, then all seven metrics are
computed per category by (a) ours exact (``compute_metrics``), (b) ours streaming (``MetricAccumulator`` fed in
batches of 32, default bins and score range), (c) the straightforward reference: scikit-learn per metric
(``roc_auc_score``, ``average_precision_score``, max F1 over ``precision_recall_curve``) and the 200-threshold AUPRO
sweep that ADer and Dinomaly use (from cflow-ad: thresholds evenly spaced between the map minimum and maximum, PRO
from ``skimage.measure`` regions, FPR kept below 0.3 and rescaled to [0, 1]); its region labelling is done once per
category, not once per threshold as in the original, which only makes the reference faster. (d) checks our AUPRO
against the algorithm of the MVTec AD evaluation code (every pixel sorted, exact), timed apart.

Streaming mode (``--images`` above 2,000, or ``--mode streaming``) generates maps batch by batch, never holding the
test set, feeds streaming accumulators and prints the peak resident memory.

    .venv/bin/python benchmarks/metrics.py                  # 1725 images, 15 categories, 256 x 256
    .venv/bin/python benchmarks/metrics.py --images 20000   # streaming only, peak memory
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from collections.abc import Iterator

import numpy as np
from scipy import ndimage

from cnc_ad.metrics import METRIC_KEYS, MetricAccumulator, compute_metrics

# MVTec AD test split: (normal, anomalous) images per category, 1725 in all.
MVTEC_TEST = {
    "bottle": (20, 63),
    "cable": (58, 92),
    "capsule": (23, 109),
    "carpet": (28, 89),
    "grid": (21, 57),
    "hazelnut": (40, 70),
    "leather": (32, 92),
    "metal_nut": (22, 93),
    "pill": (26, 141),
    "screw": (41, 119),
    "tile": (33, 84),
    "toothbrush": (12, 30),
    "transistor": (60, 40),
    "wood": (19, 60),
    "zipper": (32, 119),
}
BATCH = 32


def split_images(images: int, categories: int) -> list[tuple[str, int, int]]:
    """(category, normal, anomalous) per category: MVTec AD's split for 1725 images and 15 categories, else even
    with MVTec's anomalous share (73%)."""
    if images == 1725 and categories == 15:
        return [(name, normal, anomalous) for name, (normal, anomalous) in MVTEC_TEST.items()]
    counts = np.full(categories, images // categories)
    counts[: images % categories] += 1
    return [(f"category_{i:02d}", int(c) - round(0.73 * c), round(0.73 * c)) for i, c in enumerate(counts)]


class MapGenerator:
    """Anomaly maps like a reverse-distillation model's: smooth noise (one level and contrast per category), bumps
    over blob-shaped defects of varied size and strength, and some false-positive bumps on normal texture."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        fields = [ndimage.gaussian_filter(self.rng.normal(size=(size, size)), 4) for _ in range(32)]
        self.fields = np.stack([f / f.std() for f in fields]).astype(np.float32)

    def batches(self, normal: int, anomalous: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Yields (scores (B,), labels (B,), maps (B, S, S) float32, masks (B, S, S) bool) of one category."""
        labels = np.r_[np.zeros(normal, bool), np.ones(anomalous, bool)]
        self.rng.shuffle(labels)
        level, contrast = self.rng.uniform(0.1, 0.3), self.rng.uniform(0.02, 0.06)
        for start in range(0, labels.size, BATCH):
            batch = labels[start : start + BATCH]
            maps = np.empty((batch.size, self.size, self.size), np.float32)
            masks = np.zeros(maps.shape, bool)
            for i, anomalous_image in enumerate(batch):
                maps[i] = level + contrast * self._field()
                for _ in range(self.rng.integers(1, 4) if anomalous_image else 0):
                    self._add_defect(maps[i], masks[i], strength=self.rng.uniform(0.03, 0.5))
                if self.rng.random() < 0.3:  # a false positive on normal texture
                    self._add_defect(maps[i], np.zeros_like(masks[i]), strength=self.rng.uniform(0.02, 0.2))
            np.clip(maps, 0.0, 2.0, out=maps)
            flat = maps.reshape(batch.size, -1)
            scores = np.sort(flat, axis=1)[:, -flat.shape[1] // 100 :].mean(axis=1)  # top-1% mean
            yield scores, batch.astype(np.int64), maps, masks

    def _field(self) -> np.ndarray:
        field = self.fields[self.rng.integers(len(self.fields))]
        field = np.roll(field, tuple(self.rng.integers(0, self.size, 2)), axis=(0, 1))
        return field[::-1] if self.rng.random() < 0.5 else field

    def _add_defect(self, amap: np.ndarray, mask: np.ndarray, strength: float) -> None:
        """A rotated, noise-warped ellipse in ``mask`` and a smoothed bump of ``strength`` over it in ``amap``."""
        s = self.size
        a, b = self.rng.uniform(1.5, s / 10, 2)
        r = int(max(a, b) * 1.5) + 8
        cy, cx = self.rng.integers(0, s, 2)
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r, s), max(cx - r, 0), min(cx + r, s)
        yy, xx = np.mgrid[y0 - cy : y1 - cy, x0 - cx : x1 - cx].astype(np.float32)
        theta = self.rng.uniform(0, np.pi)
        u, v = yy * np.cos(theta) + xx * np.sin(theta), xx * np.cos(theta) - yy * np.sin(theta)
        warp = self.fields[self.rng.integers(len(self.fields)), : y1 - y0, : x1 - x0]
        blob = (u / a) ** 2 + (v / b) ** 2 < 1 + 0.4 * warp
        mask[y0:y1, x0:x1] |= blob
        amap[y0:y1, x0:x1] += strength * ndimage.gaussian_filter(blob.astype(np.float32), 3)


def reference_metrics(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> dict:
    """scikit-learn per metric and the ADer/Dinomaly 200-threshold AUPRO sweep."""
    from skimage import measure
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

    def f1_max(y: np.ndarray, s: np.ndarray) -> float:
        precision, recall, _ = precision_recall_curve(y, s)
        f1 = 2 * precision * recall / (precision + recall + 1e-12)
        return float(f1.max())

    out = {
        "image_auroc": roc_auc_score(labels, scores),
        "image_ap": average_precision_score(labels, scores),
        "image_f1_max": f1_max(labels, scores),
    }
    y, s = masks.ravel(), maps.ravel()
    out |= {"pixel_auroc": roc_auc_score(y, s), "pixel_ap": average_precision_score(y, s), "pixel_f1_max": f1_max(y, s)}

    regions = [
        (i, region.coords) for i, mask in enumerate(masks) for region in measure.regionprops(measure.label(mask))
    ]
    normal = ~masks
    n_normal = normal.sum()
    low, high = maps.min(), maps.max()
    pros, fprs = [], []
    for threshold in np.arange(low, high, (high - low) / 200):
        binary = maps > threshold
        pros.append(np.mean([binary[i, c[:, 0], c[:, 1]].sum() / len(c) for i, c in regions]))
        fprs.append(np.logical_and(normal, binary).sum() / n_normal)
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < 0.3
    fprs = (fprs[keep] - fprs[keep].min()) / (fprs[keep].max() - fprs[keep].min())
    out["pixel_aupro"] = auc(fprs, pros[keep])
    return out


def mvtec_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """AUPRO as the MVTec AD evaluation code computes it (``compute_pro`` + ``trapezoid``): every pixel sorted,
    cumulative FPR and PRO changes, the last point of each distinct score kept, integrated up to ``max_fpr``."""
    structure = np.ones((3, 3), dtype=int)
    fp_changes = np.zeros(maps.shape, np.uint32)
    pro_changes = np.zeros(maps.shape, np.float64)
    n_ok, n_regions = 0, 0
    for i, mask in enumerate(masks):
        labeled, n = ndimage.label(mask, structure)
        n_regions += n
        ok = labeled == 0
        n_ok += ok.sum()
        fp_changes[i, ok] = 1
        for k in range(1, n + 1):
            region = labeled == k
            pro_changes[i, region] = 1.0 / region.sum()
    order = np.argsort(maps, axis=None)[::-1]
    scores = maps.ravel()[order]
    fprs = np.cumsum(fp_changes.ravel()[order]) / n_ok
    pros = np.cumsum(pro_changes.ravel()[order]) / n_regions
    keep = np.append(np.diff(scores) != 0, True)
    x = np.concatenate(([0.0], np.clip(fprs[keep], None, 1.0), [1.0]))
    y = np.concatenate(([0.0], np.clip(pros[keep], None, 1.0), [1.0]))
    correction = 0.0
    if max_fpr not in x:
        ins = int(np.searchsorted(x, max_fpr))
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (max_fpr - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (max_fpr - x[ins - 1])
    inside = x <= max_fpr
    x, y = x[inside], y[inside]
    return (float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))) + correction) / max_fpr


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def max_diff(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], key: str | None = None) -> float:
    keys = [key] if key else METRIC_KEYS
    return max(abs(a[cat][k] - b[cat][k]) for cat in a for k in keys if not (math.isnan(a[cat][k])))


def run_full(args: argparse.Namespace) -> None:
    generator = MapGenerator(args.size, args.seed)
    data = {}
    t0 = time.perf_counter()
    for name, normal, anomalous in split_images(args.images, args.categories):
        parts = list(zip(*generator.batches(normal, anomalous), strict=True))
        data[name] = [np.concatenate(p) for p in parts]
    n_pixels = sum(d[2].size for d in data.values())
    print(
        f"data: {args.images} images, {len(data)} categories, {args.size}x{args.size}, {n_pixels / 1e6:.1f} M pixels, "
        f"generated in {time.perf_counter() - t0:.1f} s"
    )

    t0 = time.perf_counter()
    exact = {name: compute_metrics(*d, name=name) for name, d in data.items()}
    exact_s = time.perf_counter() - t0
    print(f"(a) ours exact:     {exact_s:8.2f} s")

    t0 = time.perf_counter()
    streaming, bounds = {}, []
    for name, (scores, labels, maps, masks) in data.items():
        acc = MetricAccumulator("streaming")
        for i in range(0, len(scores), BATCH):
            acc.update(scores[i : i + BATCH], labels[i : i + BATCH], maps[i : i + BATCH], masks[i : i + BATCH])
        streaming[name] = acc.compute(name=name)
        bounds.append(acc.error_bounds())
    streaming_s = time.perf_counter() - t0
    print(f"(b) ours streaming: {streaming_s:8.2f} s  (batches of {BATCH}, {acc.bins} bins over {acc.score_range})")

    reference = {}
    reference_s = math.nan
    if not args.skip_reference:
        t0 = time.perf_counter()
        reference = {name: reference_metrics(*d) for name, d in data.items()}
        reference_s = time.perf_counter() - t0
        print(f"(c) reference:      {reference_s:8.2f} s  (scikit-learn + 200-threshold AUPRO sweep)")

    mvtec_diff = math.nan
    if not args.skip_reference:
        t0 = time.perf_counter()
        mvtec_diff = max(abs(mvtec_aupro(d[2], d[3]) - exact[name]["pixel_aupro"]) for name, d in data.items())
        print(f"(d) MVTec AD AUPRO: {time.perf_counter() - t0:8.2f} s  (the MVTec AD evaluation code's algorithm)")

    print(f"{'metric':<14}{'mean (a)':>10}{'|a-c| max':>12}{'|b-a| max':>12}")
    for key in METRIC_KEYS:
        mean = np.nanmean([exact[cat][key] for cat in exact])
        ac = max_diff(exact, reference, key) if reference else math.nan
        print(f"{key:<14}{mean:>10.4f}{ac:>12.2e}{max_diff(streaming, exact, key):>12.2e}")
    ac_pixel = max(max_diff(exact, reference, k) for k in METRIC_KEYS[:-1]) if reference else math.nan
    print(f"max |a-c| without AUPRO (scikit-learn metrics): {ac_pixel:.2e}")
    print(f"max |a-d| pixel_aupro (ours vs the MVTec AD algorithm): {mvtec_diff:.2e}")
    print(
        f"max |b-a| (streaming vs exact): {max_diff(streaming, exact):.2e}; streaming error bounds (largest over "
        f"categories): pixel_auroc {max(b['pixel_auroc'] for b in bounds):.2e}, "
        f"pixel_aupro {max(b['pixel_aupro'] for b in bounds):.2e}"
    )
    print(f"peak resident memory: {peak_rss_mb():.0f} MB")
    d = max_diff(exact, reference) if reference else math.nan
    print(
        f"metrics: exact_s={exact_s:.2f} reference_s={reference_s:.2f} speedup={reference_s / exact_s:.1f} "
        f"max_abs_diff={d:.2e}"
    )


def run_streaming(args: argparse.Namespace) -> None:
    generator = MapGenerator(args.size, args.seed)
    metrics_s = 0.0
    t_all = time.perf_counter()
    results = {}
    for name, normal, anomalous in split_images(args.images, args.categories):
        acc = MetricAccumulator("streaming")
        for batch in generator.batches(normal, anomalous):
            t0 = time.perf_counter()
            acc.update(*batch)
            metrics_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        results[name] = acc.compute(name=name)
        metrics_s += time.perf_counter() - t0
    total_s = time.perf_counter() - t_all
    n_pixels = args.images * args.size**2
    print(
        f"streaming: {args.images} images, {args.categories} categories, {args.size}x{args.size}, "
        f"{n_pixels / 1e9:.2f} G pixels; metrics {metrics_s:.1f} s ({n_pixels / metrics_s / 1e6:.0f} M pixels/s), "
        f"total with map generation {total_s:.1f} s"
    )
    print(
        "mean pixel_aupro {:.4f}, mean pixel_auroc {:.4f}".format(
            np.mean([r["pixel_aupro"] for r in results.values()]), np.mean([r["pixel_auroc"] for r in results.values()])
        )
    )
    print(f"metrics: streaming_s={metrics_s:.2f} images={args.images} peak_rss_mb={peak_rss_mb():.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", type=int, default=15)
    parser.add_argument("--images", type=int, default=1725, help="test images in all categories together")
    parser.add_argument("--size", type=int, default=256, help="map side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mode",
        choices=["auto", "full", "streaming"],
        default="auto",
        help="auto: full up to 2,000 images, streaming above",
    )
    parser.add_argument("--skip-reference", action="store_true", help="full mode without the slow reference")
    args = parser.parse_args(argv)
    streaming = args.mode == "streaming" or (args.mode == "auto" and args.images > 2000)
    (run_streaming if streaming else run_full)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
