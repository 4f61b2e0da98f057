"""The data layer: typed samples, dataset scanners, robust decoding, torch datasets and synthetic data.

The torch-based names (datasets, loader, tensor transforms) are imported on first use, so that scanning a dataset
(``cnc data scan``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cnc_ad.data.images import (
    IMAGE_EXTENSIONS,
    decode_image,
    decode_mask,
    image_size,
    is_image_file,
    load_image,
    load_mask,
)
from cnc_ad.data.prepare import export_meta, import_meta, meta_index, prepare_visa, write_mvtec_layout
from cnc_ad.data.samples import SPLITS, DatasetIndex, Sample
from cnc_ad.data.scan import FORMATS, detect_format, scan_dataset, verify_index
from cnc_ad.data.synth import synthesize

if TYPE_CHECKING:
    from cnc_ad.data.dataset import CheckedLoader, ImageFileDataset, TestDataset, TrainDataset, make_loader, to_tensor
    from cnc_ad.data.transforms import PROTOCOLS, prepare_image, prepare_mask

_LAZY = {
    "TrainDataset": "cnc_ad.data.dataset",
    "TestDataset": "cnc_ad.data.dataset",
    "ImageFileDataset": "cnc_ad.data.dataset",
    "CheckedLoader": "cnc_ad.data.dataset",
    "make_loader": "cnc_ad.data.dataset",
    "PROTOCOLS": "cnc_ad.data.transforms",
    "prepare_image": "cnc_ad.data.transforms",
    "prepare_mask": "cnc_ad.data.transforms",
    "to_tensor": "cnc_ad.data.dataset",
}

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "PROTOCOLS",
    "SPLITS",
    "CheckedLoader",
    "DatasetIndex",
    "ImageFileDataset",
    "Sample",
    "TestDataset",
    "TrainDataset",
    "decode_image",
    "decode_mask",
    "detect_format",
    "export_meta",
    "image_size",
    "import_meta",
    "is_image_file",
    "load_image",
    "load_mask",
    "make_loader",
    "meta_index",
    "prepare_image",
    "prepare_mask",
    "prepare_visa",
    "scan_dataset",
    "synthesize",
    "to_tensor",
    "verify_index",
    "write_mvtec_layout",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
