"""CPU inference speed of one preset through PyTorch, ONNX Runtime and OpenVINO, side by side in one run.

Prints; never asserts. Random weights (``build_model(cfg, pretrained=False)``; speed does not depend on the values),
random images in [0, 1]. The model is exported with :func:`cnc_ad.deploy.export.export_onnx` and
:func:`cnc_ad.deploy.export.export_openvino` (float32) into a temporary folder, and each runtime is timed through the
backend :class:`cnc_ad.deploy.Detector` uses (:mod:`cnc_ad.deploy.backends`: ``TorchBackend``, ``OnnxBackend``,
``OpenVinoBackend``): preprocessed images (B, 3, S, S) in -> scores (B,) and maps (B, M, M) as NumPy out, the whole
graph (normalisation to score).

Threads: ``--threads`` for all three (``torch.set_num_threads``; ONNX Runtime ``intra_op_num_threads`` with one
inter-op thread; OpenVINO ``INFERENCE_NUM_THREADS``), float32 inference everywhere. Per batch size the three runtimes
are timed in turn within each repeat (so a change of machine load hits all three alike); a figure is the median of
``--repeats`` calls after ``--warmup`` untimed ones. Images/s = batch size / median seconds per call. The largest
absolute score and map differences to PyTorch are printed beside the speed. The last line, for the first batch size:

    export_speed: torch_ips=<x> ort_ips=<x> ov_ips=<x> ort_vs_torch=<x> ov_vs_torch=<x>

    taskset -c 1 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/export_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cnc_ad.config import ModelConfig
from cnc_ad.deploy.backends import Backend, TorchBackend, open_backend
from cnc_ad.deploy.export import export_onnx, export_openvino, random_images
from cnc_ad.model import build_model


def build_backends(preset: str | ModelConfig, threads: int, folder: Path) -> tuple[dict[str, Backend], int]:
    """PyTorch, ONNX Runtime and OpenVINO backends of one randomly initialised preset (or model config), and its
    image size: the engines :meth:`cnc_ad.deploy.Detector.load` opens, on files :mod:`cnc_ad.deploy.export` writes.
    """
    config = preset if isinstance(preset, ModelConfig) else ModelConfig(preset=preset)
    model = build_model(config, pretrained=False)
    model.store_text_features()
    model.eval()
    onnx_path = export_onnx(model, folder / "model.onnx")
    xml_path = export_openvino(model, folder / "model.xml")
    backends = {
        "torch": TorchBackend(model, torch.device("cpu")),
        "ort": open_backend(onnx_path, threads=threads).backend,
        "ov": open_backend(xml_path, threads=threads).backend,
    }
    return backends, model.image_size


def measure(
    backends: dict[str, Backend], images: np.ndarray, repeats: int, warmup: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of each backend (timed in turn within each repeat) and max |diff| to PyTorch."""
    reference = backends["torch"](images)
    difference = {}
    for name, backend in backends.items():
        output = backend(images)
        difference[name] = max(float(np.abs(a - b).max()) for a, b in zip(output, reference, strict=True))
        for _ in range(warmup - 1):
            backend(images)
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats):
        for name, backend in backends.items():
            start = time.perf_counter()
            backend(images)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, difference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cnc-effnet-lite0", help="model preset (default: the offline one)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1], help="the first one gives the last line")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every runtime (default 1)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per runtime and batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first also checks outputs)")
    args = parser.parse_args(argv)

    import onnxruntime as ort
    import openvino as ov

    torch.set_num_threads(args.threads)
    print(
        f"export_speed: {args.preset}, cpu, {args.threads} thread(s), torch {torch.__version__}, onnxruntime "
        f"{ort.__version__}, openvino {ov.__version__.split('-')[0]}, repeats={args.repeats}, warmup={args.warmup}"
    )
    with tempfile.TemporaryDirectory(prefix="export_speed.") as folder:
        backends, size = build_backends(args.preset, args.threads, Path(folder))
        print(f"{'batch':>5} | {'runtime':>7} | {'ms/call':>8} | {'img/s':>7} | {'vs torch':>8} | {'max |diff|':>10}")
        headline = None
        for batch in args.batch_sizes:
            images = random_images(batch, size).numpy()
            seconds, difference = measure(backends, images, args.repeats, max(1, args.warmup))
            ips = {name: batch / value for name, value in seconds.items()}
            for name in backends:
                print(
                    f"{batch:>5} | {name:>7} | {seconds[name] * 1e3:>8.1f} | {ips[name]:>7.2f} | "
                    f"{ips[name] / ips['torch']:>8.3f} | {difference[name]:>10.2e}"
                )
            headline = headline or ips
    print(
        f"export_speed: torch_ips={headline['torch']:.2f} ort_ips={headline['ort']:.2f} ov_ips={headline['ov']:.2f} "
        f"ort_vs_torch={headline['ort'] / headline['torch']:.3f} ov_vs_torch={headline['ov'] / headline['torch']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
