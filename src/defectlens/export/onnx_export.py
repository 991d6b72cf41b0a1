"""`defectlens export model.dlens --format onnx`: one self-describing ONNX file.

The file carries what the runtime needs besides the graph (image size, calibration for masks
and regions, the source model's checksum) as ONNX metadata, so a line PC needs the .onnx file
and ONNX Runtime, not the bundle or PyTorch.
"""

from __future__ import annotations

import io
import json
import os
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from defectlens.bundle import Bundle
from defectlens.data.images import ModelSize, size_hw
from defectlens.errors import DefectLensError
from defectlens.export.graph import OUTPUTS, ScoringGraph
from defectlens.jsonutil import finite

META_KEY = "defectlens"
FORMAT = "defectlens-onnx"
FORMAT_VERSION = 1
OPSET = 17


def trace(module: torch.nn.Module, size: ModelSize, outputs: Sequence[str], target: str | io.BytesIO, opset: int = OPSET) -> None:
    """``module`` as an ONNX graph with input ``images`` (n, 3, height, width) and the named outputs,
    the batch axis free: what `export` writes and what the default runtime runs."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (torch.rand(2, 3, *size_hw(size)),), target, input_names=["images"], output_names=list(outputs),
                          dynamic_axes={"images": {0: "n"}, **{name: {0: "n"} for name in outputs}},
                          opset_version=opset, dynamo=False, do_constant_folding=True)


def export_onnx(bundle: Bundle, path: str | os.PathLike, opset: int = OPSET) -> Path:
    import onnx

    path = Path(path)
    det = bundle.detector
    graph = ScoringGraph(det, bundle.calibration).eval()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        trace(graph, det.image_size, OUTPUTS, str(tmp), opset)
        model = onnx.load(str(tmp))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source_checksum": bundle.checksum,
            "detector": {"name": det.name, "params": det.get_params()},
            "image_size": det.image_size,
            "calibration": bundle.calibration.to_dict() if bundle.calibration else None,
            "metadata": {k: v for k, v in bundle.metadata.items() if k != "train_files"},
        }
        entry = model.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(finite(meta), allow_nan=False)
        model.producer_name = "defectlens"
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    except DefectLensError:
        raise
    except Exception as exc:  # noqa: BLE001 -- an exporter failure is reported in one line, the half-written file removed
        raise DefectLensError(f"{path}: ONNX export failed ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path
