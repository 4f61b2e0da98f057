"""The real-data development suite (../shared/devdata/README.md), materialised in the MVTec AD layout.

Six categories (three with pixel masks), one multi-class model:

- ``deeppcb``: DeepPCB printed circuit boards, already in the MVTec AD layout under ``<devdata>/deeppcb`` (filled
  defect boxes as masks);
- ``bsdata_type2``: BSData ball-screw-drive spindle surfaces with small pitting, MVTec AD layout under
  ``<devdata>/bsdata_type2`` (filled LabelMe polygons as masks);
- ``battery_weld``: battery weld seams, MVTec AD layout under ``<devdata>/battery_weld``, its authors' split (only 37
  good training images: the product type with few pictures);
- ``elpv_mono``, ``elpv_poly``: electroluminescence images of solar cells from the PyPI package ``elpv-dataset``
  (defect probability 0.0 = good, 1.0 = defective; the uncertain 0.33 / 0.67 are left out; image metrics only);
- ``textile``: simulated textiles from the PyPI package ``conformal-clip-data`` (nominal = good, local + global =
  defective; image metrics only).

Splits of the packaged categories are deterministic: the good images of a category sorted by file name, every fifth one
(index % 5 == 0) goes to ``test/good``, the rest to ``train/good``. Images are copied (never committed: see the licences
in the devdata README); the packages are the ``bench`` extra (``pip install '.[bench]'``).

    python benchmarks/devsuite.py OUT [--devdata ../shared/devdata]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

SUITE_VERSION = 2
CATEGORIES = ("deeppcb", "bsdata_type2", "battery_weld", "elpv_mono", "elpv_poly", "textile")
MASKED = ("deeppcb", "bsdata_type2", "battery_weld")  # the folders of shared/devdata, already in the MVTec AD layout
DEFAULT_DEVDATA = Path(__file__).resolve().parents[1].parent / "shared" / "devdata"


def split_good(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, test) of a category's good images: sorted by name, every fifth (index % 5 == 0) is a test image."""
    ordered = sorted(files, key=lambda p: p.name)
    return [p for i, p in enumerate(ordered) if i % 5], [p for i, p in enumerate(ordered) if i % 5 == 0]


def _copy(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        shutil.copyfile(file, folder / file.name)


def _elpv(out: Path) -> dict[str, int]:
    try:
        import elpv_dataset
    except ImportError as err:
        raise SystemExit("the solar-cell categories need the bench extra: pip install '.[bench]'") from err
    root = Path(elpv_dataset.__file__).parent / "data"
    groups: dict[str, dict[str, list[Path]]] = {"mono": {"good": [], "bad": []}, "poly": {"good": [], "bad": []}}
    for line in (root / "labels.csv").read_text().splitlines():
        if not line.strip():
            continue
        path, probability, kind = line.split()
        if float(probability) == 0.0:
            groups[kind]["good"].append(root / path)
        elif float(probability) == 1.0:
            groups[kind]["bad"].append(root / path)
    counts = {}
    for kind, group in groups.items():
        train, test = split_good(group["good"])
        cat = out / f"elpv_{kind}"
        _copy(train, cat / "train" / "good")
        _copy(test, cat / "test" / "good")
        _copy(group["bad"], cat / "test" / "defect")
        counts[f"elpv_{kind}"] = len(train) + len(test) + len(group["bad"])
    return counts


def _textile(out: Path) -> dict[str, int]:
    try:
        import conformal_clip_data as ccd
    except ImportError as err:
        raise SystemExit("the textile category needs the bench extra: pip install '.[bench]'") from err
    train, test = split_good(list(ccd.nominal_dir().glob("*.jpg")))
    cat = out / "textile"
    _copy(train, cat / "train" / "good")
    _copy(test, cat / "test" / "good")
    _copy(sorted(ccd.local_dir().glob("*.jpg")), cat / "test" / "local")
    _copy(sorted(ccd.global_dir().glob("*.jpg")), cat / "test" / "global")
    return {"textile": len(train) + len(test) + 1000}


def _masked(devdata: Path, out: Path) -> dict[str, int]:
    counts = {}
    for name in MASKED:
        source = devdata / name
        if not (source / "train" / "good").is_dir():
            raise SystemExit(f"{name} not found at {source}; pass --devdata pointing at shared/devdata")
        shutil.copytree(source, out / name, ignore=shutil.ignore_patterns("LICENSE"))
        counts[name] = sum(1 for p in (out / name).rglob("*") if p.is_file())
    return counts


def build_suite(out: str | Path, devdata: str | Path = DEFAULT_DEVDATA) -> Path:
    """Materialise the suite under ``out`` (reused when complete); returns ``out``."""
    out = Path(out)
    stamp = out / "suite.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == SUITE_VERSION:
        return out
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    counts = {**_masked(Path(devdata), partial), **_elpv(partial), **_textile(partial)}
    digest = hashlib.sha256(json.dumps(counts, sort_keys=True).encode()).hexdigest()[:12]
    (partial / "suite.json").write_text(json.dumps({"version": SUITE_VERSION, "files": counts, "digest": digest}))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder to write the suite into (MVTec AD layout)")
    parser.add_argument(
        "--devdata", default=str(DEFAULT_DEVDATA), help="the shared/devdata folder (DeepPCB, BSData, battery welds)"
    )
    args = parser.parse_args(argv)
    root = build_suite(args.out, args.devdata)
    print(json.dumps(json.loads((root / "suite.json").read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
