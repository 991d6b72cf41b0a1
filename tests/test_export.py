"""ONNX export: the graph scores like PyTorch (1e-4), carries its calibration, and refuses what it cannot hold."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest

from defectlens import Bundle, Inspector, create_detector, load_dataset
from defectlens.cli import main
from defectlens.data.images import load_rgb
from defectlens.errors import BundleError, DefectLensError
from defectlens.export import export_onnx
from defectlens.inference.loading import load_model
from defectlens.workflows import calibrate_detector

from .conftest import calibrated_patchcore

TOLERANCE = 1e-4


def fitted(name: str, dataset, **params):
    ds = load_dataset(dataset, validation_fraction=0.25)
    det = create_detector(name, image_size=64, **params).fit(ds.train_good)
    return calibrate_detector(det, ds.validation), ds


def assert_same_inspections(bundle: Bundle, exported: Bundle, images) -> None:
    torch_side, onnx_side = Inspector(bundle), Inspector(exported)
    for image in images:
        a, b = torch_side.inspect(image), onnx_side.inspect(image)
        assert abs(a.score - b.score) <= TOLERANCE and abs(a.normalised_score - b.normalised_score) <= TOLERANCE
        assert np.abs(a.anomaly_map - b.anomaly_map).max() <= TOLERANCE
        assert a.verdict == b.verdict and [r.box for r in a.regions] == [r.box for r in b.regions]


EXPORT_PARAMS = {"patchcore": {"coreset_ratio": 0.1}, "padim": {"n_features": 50}, "simplenet": {"embed_dim": 16, "hidden": 32, "max_epochs": 3}}


@pytest.mark.parametrize("name", [*sorted(EXPORT_PARAMS), "simplenet-plain"])
def test_export_scores_like_pytorch(name, tiny_dataset, tmp_path):
    detector, _, variant = name.partition("-")  # plain: SimpleNet without its per-position Gaussians
    bundle, ds = fitted(detector, tiny_dataset, **EXPORT_PARAMS[detector], **({"gaussian": False} if variant else {}))
    path = export_onnx(bundle, tmp_path / "model.onnx")
    exported = load_model(path)
    assert exported.checksum == bundle.checksum and exported.calibration.image_threshold == bundle.calibration.image_threshold
    assert_same_inspections(bundle, exported, [s.path for s in ds.test])
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "MatMul" in ops or "Einsum" in ops
    assert {"Conv", "Resize", "Tanh"} <= ops  # Tanh: DecisionRule.normalise, traced and not any("dist" in op.lower() for op in ops)


def test_a_padim_that_learned_on_the_line_exports_its_second_centre(tiny_dataset, tmp_path):
    bundle, ds = fitted("padim", tiny_dataset, **EXPORT_PARAMS["padim"])
    images = [s.path for s in ds.test]
    before = bundle.detector.score(images)[0]
    bundle.detector.partial_fit([np.clip(load_rgb(p) * 1.3 + 0.05, 0, 1).astype(np.float32) for p in ds.train_good[:3]])
    assert not np.allclose(bundle.detector.score(images)[0], before)  # the centre changes scores, so parity below means something
    assert_same_inspections(bundle, load_model(export_onnx(bundle, tmp_path / "learned.onnx")), images)


def test_the_symmetry_term_of_the_calibration_is_in_the_graph(tiny_dataset, tmp_path):
    bundle, ds = fitted("patchcore", tiny_dataset, coreset_ratio=0.1)
    bundle.calibration = replace(bundle.calibration, symmetry={"axes": "lr,tb", "weight": 0.7, "used": True})
    exported = load_model(export_onnx(bundle, tmp_path / "sym.onnx"))
    images = [s.path for s in ds.test]
    raw, maps = bundle.detector.score(images)
    combined = bundle.detector.decision_scores(raw, maps, bundle.calibration)
    assert np.abs(combined - raw).max() > 1e-3  # the term matters here
    assert_same_inspections(bundle, exported, images)


@pytest.mark.slow
def test_export_on_real_images(tmp_path):
    bundle, ds = calibrated_patchcore("mvtec_ad/bottle")  # the accuracy tests' model: default PatchCore, held-out calibration
    exported = load_model(export_onnx(bundle, tmp_path / "bottle.onnx"))
    images = [s.path for s in ds.test]
    raw, maps = bundle.detector.score(images)
    raw_onnx, maps_onnx = exported.detector.score(images)
    assert np.abs(raw - raw_onnx).max() <= TOLERANCE and np.abs(maps - maps_onnx).max() <= TOLERANCE
    print(f"\nbottle, {len(images)} test images: largest difference score {np.abs(raw - raw_onnx).max():.1e}, map {np.abs(maps - maps_onnx).max():.1e}")


def test_what_cannot_be_exported_is_refused_in_one_line(tiny_dataset, tmp_path):
    ds = load_dataset(tiny_dataset)
    auto = create_detector("autoencoder", image_size=64, max_epochs=1).fit(ds.train_good)
    with pytest.raises(DefectLensError, match="export supports patchcore, padim and simplenet models; 'autoencoder'"):
        export_onnx(Bundle(auto), tmp_path / "a.onnx")
    reweighted = create_detector("patchcore", image_size=64, coreset_ratio=0.1, reweight=True).fit(ds.train_good)
    with pytest.raises(DefectLensError, match="reweight"):
        export_onnx(Bundle(reweighted), tmp_path / "r.onnx")
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_files_that_are_not_defectlens_exports_are_refused(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not protobuf")
    with pytest.raises(BundleError, match="garbage.onnx"):
        load_model(garbage)
    foreign = tmp_path / "foreign.onnx"
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph([node], "g", [value("x", onnx.TensorProto.FLOAT, [1])], [value("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(BundleError, match="not one exported by DefectLens"):
        load_model(foreign)
    with pytest.raises(BundleError, match="model file not found"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(BundleError, match="an ONNX export, not a .dlens bundle"):  # the .dlens reader says where to go instead
        Bundle.load(foreign)


def test_export_command_checks_and_the_other_commands_take_the_file(model_dir, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "discs.onnx"
    assert main(["export", str(model_dir / "discs.dlens"), "-o", str(out), "--check", str(tiny_dataset / "test")]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "on 12 given images" in printed
    assert main(["inspect", str(out), str(tiny_dataset / "test" / "scratch")]) == 0
    assert main(["export", str(out)]) == 2
    assert "already an exported model" in capsys.readouterr().err
