"""A station without torch against the full install, side by side in one run. Prints; never asserts.

1. The station: a virtual environment with ``pip install '.[station]'`` only (built once under ``--station-venv``,
   reused while ``pyproject.toml`` is unchanged); the script checks that ``import torch`` fails in it.
2. The model: ``--config``'s (default ``offline``: cnc-effnet-lite0 with its packaged ImageNet weights, untrained
   decoder), or ``--checkpoint``; exported to OpenVINO by ``cnc export`` in the full environment.
3. Served images/s at concurrency ``--concurrency`` (one image per request, ``--requests`` measured requests after a
   warm-up, synthetic PNGs of ``benchmarks/serve.py``): the station's ``cnc serve --model model.xml`` (OpenVINO)
   against the full environment's ``cnc serve --model CHECKPOINT`` (PyTorch), one after the other on the same cores.
4. The size of each environment's ``site-packages`` (MiB), and the largest score difference between the OpenVINO and
   the PyTorch paths on the same image files (``Detector.predict``, maps and scores as users get them).

The last line:

    station: ov_served_ips=<x> torch_served_ips=<x> ratio=<ov / torch> station_env_mb=<x> torch_env_mb=<x>
    ov_parity=<x>

    .venv/bin/python benchmarks/station.py            # both cores free
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import sysconfig
import tempfile
import venv
from pathlib import Path

import numpy as np
from serve import load, prepare_checkpoint, prepare_model, server_process, synthetic_pngs

from cnc_ad import Detector

ROOT = Path(__file__).resolve().parents[1]


def folder_mb(path: Path) -> float:
    """The size of the files under ``path`` (links not followed), MiB."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total / 2**20


def station_venv(folder: Path) -> Path:
    """A venv with ``pip install '.[station]'`` (rebuilt when pyproject.toml changes); its python."""
    stamp = folder / ".pyproject-sha"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    python = folder / "bin" / "python"
    if not (stamp.is_file() and stamp.read_text() == digest and python.is_file()):
        print(f"building the station environment in {folder} (pip install '.[station]') ...", flush=True)
        venv.create(folder, clear=True, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"{ROOT}[station]"], check=True)
        stamp.write_text(digest)
    else:  # the package itself may have changed since: reinstall it alone
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(ROOT)],
                       check=True)  # fmt: skip
    return python


def site_packages(python: str | Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def served_ips(model: Path, args: argparse.Namespace, files: list[bytes], python: str) -> dict[str, float]:
    env = None
    if python != sys.executable:  # the station runs its own installed copy, whatever this process imports
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with server_process(model, args, python=python, env=env) as (url, _):
        load(url, files, 4 * args.max_batch_size, args.concurrency[0])  # warm-up
        return load(url, files, args.requests, args.concurrency[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="run or checkpoint folder (default: --config's model, untrained)")
    parser.add_argument("--config", default="offline", help="config whose model is built without --checkpoint")
    parser.add_argument("--station-venv", default=str(ROOT / ".bench" / "station-venv"), help="where the venv goes")
    parser.add_argument("--requests", type=int, default=600, help="measured requests per server (default 600)")
    parser.add_argument("--concurrency", type=int, default=32, help="client threads (default 32)")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--parity-images", type=int, default=16, help="image files of the parity check")
    args = parser.parse_args(argv)
    args.concurrency = [args.concurrency]  # what serve.server_process expects

    python = station_venv(Path(args.station_venv))
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    blocked = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True, env=clean)
    print(f"station: `import torch` {'fails' if blocked.returncode else 'WORKS (not a station)'}", flush=True)
    station_mb = folder_mb(site_packages(python))
    full_mb = folder_mb(Path(sysconfig.get_paths()["purelib"]))
    print(f"site-packages: station {station_mb:.0f} MiB, full environment {full_mb:.0f} MiB", flush=True)

    with tempfile.TemporaryDirectory(prefix="cnc-station-bench-") as tmp:
        workdir = Path(tmp)
        checkpoint = prepare_checkpoint(args, workdir)
        xml = prepare_model(checkpoint, "openvino", workdir)
        files = synthetic_pngs(32, 256)
        paths = []
        for index, data in enumerate(files[: args.parity_images]):
            paths.append(workdir / f"parity-{index}.png")
            paths[-1].write_bytes(data)
        by_torch = Detector.load(checkpoint, device="cpu").predict([str(p) for p in paths])
        by_ov = Detector.load(xml).predict([str(p) for p in paths])
        parity = float(np.abs(by_ov.scores - by_torch.scores).max())
        print(f"parity on {len(paths)} image files: max |score diff| {parity:.2e}", flush=True)
        ov = served_ips(xml, args, files, str(python))
        print(f"station (OpenVINO) served: {ov['ips']:.2f} images/s, p99 {ov['p99_ms']:.0f} ms, {ov['errors']} errors")
        torch_row = served_ips(checkpoint, args, files, sys.executable)
        print(f"full (PyTorch) served: {torch_row['ips']:.2f} images/s, p99 {torch_row['p99_ms']:.0f} ms, "
              f"{torch_row['errors']} errors", flush=True)  # fmt: skip
    print(
        f"station: ov_served_ips={ov['ips']:.2f} torch_served_ips={torch_row['ips']:.2f} "
        f"ratio={ov['ips'] / torch_row['ips']:.3f} station_env_mb={station_mb:.0f} torch_env_mb={full_mb:.0f} "
        f"ov_parity={parity:.2e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
