"""ONNX and OpenVINO export of the whole visual inference graph (docs/method.md, Inference), with a parity check
against PyTorch.

The graph is ``images -> normalisation -> frozen encoder -> bottleneck -> gated MoE -> decoder -> 1 - cos maps ->
upsample -> Gaussian blur -> image score``. The stored text features enter as constants (they matter only with FNP);
the text tower is not in the graph.

- input ``images``: ``(B, 3, S, S)`` float32 RGB in [0, 1], not normalised (the graph normalises), ``S`` the model's
  image size. Float rather than uint8 so that callers feed exactly what :meth:`cnc_ad.model.CNC.predict` takes.
- outputs ``score`` ``(B,)`` (``config.score``: max, top1 or pool16) and ``anomaly_map`` ``(B, 1, M, M)``,
  ``M = config.map_size``. The batch size B is dynamic.

The MoE runs densely while tracing (every expert weighted by its top-k gates, zeros elsewhere), which is the same
function as the eager sparse dispatch with static shapes. The exporter is the TorchScript-based one
(``dynamo=False``), which handles the dynamic batch of this graph directly.

The OpenVINO IR (``.xml`` + ``.bin``) is converted from that ONNX graph (``openvino.convert_model`` on the file), not
from the torch module: OpenVINO's PyTorch frontend has no conversion rule for ``aten::cosine_similarity`` (the
``1 - cos`` maps), while its ONNX frontend converts the exported graph with the dynamic batch kept and parity within
1e-6 of PyTorch (tiny and cnc-effnet-lite0). One traced graph for both formats also means one set of tracing rules.
Weights stay float32 unless asked (``save_model`` compresses to float16 by default, which breaks the 1e-4 parity).
The metadata (:mod:`cnc_ad.deploy.metadata`: config, thresholds, version) is the graph's ``metadata_props`` in ONNX and
its ``rt_info`` under the same names in OpenVINO; :class:`cnc_ad.deploy.Detector` reads it back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from cnc_ad.deploy.backends import open_backend
from cnc_ad.deploy.metadata import INPUT_NAME, OUTPUT_NAMES, graph_metadata, openvino_bin_path
from cnc_ad.errors import ExportError
from cnc_ad.files import default_mode, fsync_path
from cnc_ad.thresholds import Thresholds

if TYPE_CHECKING:
    from cnc_ad.model import CNC

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


class InferenceGraph(nn.Module):
    """:meth:`CNC.predict` as a module with tensor outputs, the function that is exported.

    Args:
        model: a :class:`cnc_ad.model.CNC` with stored text features.
    """

    def __init__(self, model: CNC) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 3, S, S) in [0, 1] -> scores (B,) and maps (B, 1, M, M)."""
        prediction = self.model.predict(images)
        return prediction.score, prediction.anomaly_map


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ExportError(f"ONNX export needs onnx and onnxruntime ({err}); pip install 'cnc-ad[export]'") from err


def _require_openvino() -> None:
    try:
        import openvino  # noqa: F401
    except ImportError as err:
        raise ExportError(f"OpenVINO export needs openvino ({err}); pip install 'cnc-ad[openvino]'") from err


@contextlib.contextmanager
def _exporting(model: CNC) -> Iterator[None]:
    """Eval mode and the plain (traceable) attention path for the duration of an export of a model whose text
    features were stored (they become constants of the graph).

    Raises:
        TextFeaturesError: the model's text features were never stored.
    """
    model.require_text_features()
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    # nn.MultiheadAttention's fused inference kernel (the CLIP encoder's) has no ONNX symbolic.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            # The tracer warns about Python bools taken from shapes (input checks, blur radius): they are constants
            # of the graph for a fixed image size, and the parity check on another batch size proves it.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # Strided slices are kept as graph ops instead of folded: slower to load, not wrong.
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            # The TorchScript-based exporter announces its own deprecation (and that of its logging helper).
            warnings.filterwarnings(
                "ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning
            )
            warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)


def export_onnx(
    model: CNC,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    batch_size: int = 2,
    thresholds: Thresholds | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> Path:
    """Export a CNC model's inference graph to ONNX (written atomically) and check it with ``onnx.checker``.

    Args:
        model: a :class:`cnc_ad.model.CNC` (its mode is restored afterwards).
        path: the ``.onnx`` file to write.
        opset: ONNX opset version (>= 14 for the attention ops).
        dynamic_batch: make the batch axis dynamic (else the graph takes exactly ``batch_size`` images).
        batch_size: batch of the random example images the graph is traced with.
        thresholds: thresholds to embed (a loaded graph decides by them unless thresholds are stored beside it).
        checkpoint: the checkpoint exported, recorded in the metadata.

    Returns:
        The written file.

    Raises:
        ExportError: onnx/onnxruntime are missing, or the exporter or the checker fails.
        TextFeaturesError: the model's text features were never stored (a model built but never trained or saved).
    """
    _require_onnx()
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.image_size
    device = next(model.parameters()).device
    example = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)} if dynamic_batch else None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _exporting(model):
            graph = InferenceGraph(model).eval()
            try:
                torch.onnx.export(
                    graph,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES),
                    dynamic_axes=axes,
                    do_constant_folding=True,
                )
            except Exception as err:  # the exporter raises many types; one clear message
                raise ExportError(f"ONNX export (opset {opset}) failed: {err}") from err
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, _metadata(model, thresholds, checkpoint))
        onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as err:
            raise ExportError(f"the exported graph fails onnx.checker: {err}") from err
        os.chmod(tmp, default_mode())
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s (opset %d, %s batch)", path, opset, "dynamic" if dynamic_batch else f"fixed {batch_size}")
    return path


def _metadata(model: CNC, thresholds: Thresholds | None, checkpoint: str | os.PathLike | None) -> dict[str, str]:
    config = dataclasses.asdict(model.config)
    return graph_metadata(config, model.image_size, thresholds=thresholds, checkpoint=checkpoint)


def export_openvino(
    model: CNC,
    path: str | os.PathLike,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    batch_size: int = 2,
    thresholds: Thresholds | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> Path:
    """Export a CNC model's inference graph to OpenVINO IR: ``path`` (``.xml``) and the ``.bin`` beside it.

    The graph is the ONNX export's (:func:`export_onnx`, written to a temporary file and converted with
    ``openvino.convert_model``); the metadata is the IR's ``rt_info`` under the ONNX keys. Both files are written
    under temporary names and renamed into place, the ``.bin`` first: the ``.xml`` appears last.

    Args:
        model: a :class:`cnc_ad.model.CNC` (its mode is restored afterwards).
        path: the ``.xml`` file to write.
        fp16: store the weights in float16 (half the size; no longer within 1e-4 of PyTorch). Default float32.
        opset: ONNX opset of the intermediate graph.
        dynamic_batch: make the batch axis dynamic (else the graph takes exactly ``batch_size`` images).
        batch_size: batch of the random example images the graph is traced with.
        thresholds: thresholds to embed, as for :func:`export_onnx`.
        checkpoint: the checkpoint exported, recorded in the metadata.

    Returns:
        The written ``.xml`` file.

    Raises:
        ExportError: openvino (or onnx/onnxruntime) is missing, ``path`` does not end in ``.xml``, or the export or
            the conversion fails.
        TextFeaturesError: the model's text features were never stored (a model built but never trained or saved).
    """
    _require_openvino()
    import openvino as ov

    path = Path(path)
    if path.suffix != ".xml":
        raise ExportError(f"an OpenVINO IR is an .xml file (with a .bin beside it); got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as scratch_name:
        scratch = Path(scratch_name)
        onnx_path = export_onnx(
            model,
            scratch / "graph.onnx",
            opset=opset,
            dynamic_batch=dynamic_batch,
            batch_size=batch_size,
            thresholds=thresholds,
            checkpoint=checkpoint,
        )
        try:
            graph = ov.convert_model(str(onnx_path))
        except Exception as err:  # OpenVINO raises its own exception types; one clear message
            raise ExportError(f"OpenVINO cannot convert the exported ONNX graph: {err}") from err
        for key, value in _metadata(model, thresholds, checkpoint).items():
            graph.set_rt_info(value, key)
        xml = scratch / "model.xml"
        ov.save_model(graph, str(xml), compress_to_fp16=fp16)
        for written, final in ((openvino_bin_path(xml), openvino_bin_path(path)), (xml, path)):
            os.chmod(written, default_mode())
            fsync_path(written)
            os.replace(written, final)
        fsync_path(path.parent)
    log.info("exported %s (%s weights)", path, "float16" if fp16 else "float32")
    return path


def random_images(batch_size: int, image_size: int, seed: int = 0) -> Tensor:
    """Uniform random images (B, 3, S, S) in [0, 1] from a seeded generator."""
    return torch.rand(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def check_parity(model: CNC, path: str | os.PathLike, images: Tensor) -> dict[str, float]:
    """Run PyTorch and the exported graph on the same images and compare.

    Args:
        model: the :class:`cnc_ad.model.CNC` that was exported (run in eval mode, fp32, on its device).
        path: the exported graph: ``.onnx`` (run with onnxruntime) or an OpenVINO ``.xml`` (run with OpenVINO,
            float32 inference), both on the CPU.
        images: (B, 3, S, S) float RGB in [0, 1].

    Returns:
        ``{"max_abs_map", "max_abs_score"}``: largest absolute differences of the maps (B, 1, M, M) and scores (B,).
    """
    backend = open_backend(path, device="CPU" if Path(path).suffix == ".xml" else "auto").backend
    scores, maps = backend(images.detach().float().cpu().numpy())  # maps (B, M, M)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        reference = model.predict(images.to(device, torch.float32))
    finally:
        model.train(was_training)
    return {
        "max_abs_map": float(np.abs(maps - reference.anomaly_map[:, 0].float().cpu().numpy()).max()),
        "max_abs_score": float(np.abs(scores - reference.score.float().cpu().numpy()).max()),
    }
