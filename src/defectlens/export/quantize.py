"""int8 backbones: ONNX Runtime's static quantisation of a feature detector's patch embedder.

Only the backbone's convolutions are quantised (QDQ, int8 weights per channel, uint8
activations, calibrated on the model's own good images). The projection after it and the map's
smoothing stay float: quantising them too turned bottle's image AUROC from 1.000 to 0.66.
Weights use 7 of their 8 bits (``reduce_range``): without VNNI, AVX2's 8-bit multiply-add
saturates, and the embeddings of a MobileNetV2 then correlate only 0.69 with float32 (0.97 with
the reduced range, on bottle).

A detector keeps float32 patches in its bank, so an int8 embedder needs the bank rebuilt through
it (``PatchCore.fit_bank``): quantisation noise in every patch would otherwise read as anomaly.
Whether int8 is worth it is measured by ``defectlens benchmark DATA --int8``; on a CPU without
VNNI it is not (docs/measurements.md), so nothing quantises a model unless asked.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from defectlens.data.images import ImageInput, iter_batches, spread
from defectlens.detectors.feature_based import FeatureDetector
from defectlens.export.runtime import embedder_graph

CALIBRATION_IMAGES = 32  # spread over the training set: ONNX Runtime's calibration sets each activation's range from them


def quantize_embedder(detector: FeatureDetector, images: Sequence[ImageInput], calibration_images: int = CALIBRATION_IMAGES) -> bytes:
    """The embedder graph with its backbone's convolutions in int8, calibrated on ``images``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = [batch.pixels for batch in iter_batches(spread(images, calibration_images), detector.image_size, detector.batch_size)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            pixels = next(self._batches, None)
            return None if pixels is None else {"images": pixels}

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "float.onnx").write_bytes(embedder_graph(detector))
        quant_pre_process(str(folder / "float.onnx"), str(folder / "ready.onnx"), skip_symbolic_shape=True)
        backbone = [node.name for node in onnx.load(str(folder / "ready.onnx")).graph.node
                    if node.op_type == "Conv" and "/extractor/" in node.name]
        quantize_static(str(folder / "ready.onnx"), str(folder / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, op_types_to_quantize=["Conv"], nodes_to_quantize=backbone,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return (folder / "int8.onnx").read_bytes()

