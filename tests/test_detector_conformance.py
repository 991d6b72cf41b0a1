"""The conformance suite every registered detector must pass (as scikit-learn's check_estimator).

A new detector registers itself and adds its small-and-fast settings to CONFORMANCE_PARAMS;
the first test fails until it does, so no detector escapes these checks.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from defectlens import Bundle, DefectLensError, Inspector, available_detectors, create_detector, load_model
from defectlens.data import load_dataset
from defectlens.detectors.base import GOOD_ONLY, SUPERVISED, PixelScores
from defectlens.errors import ImageError
from defectlens.workflows import calibrate_detector

CONFORMANCE_PARAMS = {
    "patchcore": {"image_size": 64, "coreset_ratio": 0.1},
    "padim": {"image_size": 64, "n_features": 20},
    "autoencoder": {"image_size": 32, "max_epochs": 30, "batch_size": 4, "patience": 30},
    "ensemble": {"detector": "patchcore", "detector_params": {"coreset_ratio": 0.1}, "image_size": 64},
    "supervised": {"image_size": 64, "epochs": 3, "batch_size": 8},
    "simplenet": {"image_size": 64, "embed_dim": 16, "hidden": 32, "max_epochs": 8},
    "global": {"detector": "padim", "detector_params": {"image_size": 64, "n_features": 20}},
    "tiled": {"detector": "patchcore", "detector_params": {"coreset_ratio": 0.1}, "tile_size": 32, "map_size": 64},
}


def test_every_registered_detector_has_conformance_settings():
    assert set(available_detectors()) <= set(CONFORMANCE_PARAMS)


def fit_on(det, ds):
    """Good-only detectors fit on good images; supervised ones also on half the labelled defects."""
    if det.learning == SUPERVISED:
        defects = [s.path for s in ds.test if s.label][::2]
        return det.fit(ds.train_good + defects, [0] * len(ds.train_good) + [1] * len(defects))
    return det.fit(ds.train_good)


@pytest.fixture(scope="module", params=sorted(CONFORMANCE_PARAMS))
def fitted(request, tiny_dataset):
    ds = load_dataset(tiny_dataset, validation_fraction=0.2)
    det = create_detector(request.param, **CONFORMANCE_PARAMS[request.param])
    assert fit_on(det, ds) is det, "fit must return self"
    return det, ds


def test_score_pixels_is_public_and_named(fitted):
    import torch

    det, _ = fitted
    if det.name == "tiled":  # scores whole images through tiles: its pixels are one tile's
        pytest.skip("tiled scores tiles, not whole images, through score_pixels")
    out = det.score_pixels(torch.rand(2, 3, det.image_size, det.image_size))
    assert isinstance(out, PixelScores) and out.scores.shape == (2,) and out.maps.shape == (2, det.image_size, det.image_size)
    assert out.features is None or out.features.shape[0] == 2


def test_learning_type_is_declared_and_enforced(fitted):
    det, ds = fitted
    assert det.learning in (GOOD_ONLY, SUPERVISED)
    if det.learning == GOOD_ONLY:
        with pytest.raises(DefectLensError, match="good images only"):
            clone(det).fit(ds.train_good[:4], [0, 0, 1, 0])


def test_constructor_only_stores_settings(fitted):
    det, _ = fitted
    fresh = create_detector(det.name, **CONFORMANCE_PARAMS[det.name])
    assert not fresh.is_fitted
    assert not [k for k in vars(fresh) if k.endswith("_")], "learned state must only appear after fit"
    assert clone(det).get_params() == det.get_params()


def test_learned_state_ends_in_underscore(fitted):
    det, _ = fitted
    learned = [k for k in vars(det) if k.endswith("_") and not k.startswith("_")]
    assert learned, "fit must set learned attributes ending in '_'"
    assert set(det.get_state()), "get_state must expose the learned state"


def test_score_shapes_and_ranking(fitted):
    det, ds = fitted
    paths = [s.path for s in ds.test]
    scores, maps = det.score(paths)
    assert scores.shape == (len(paths),)
    assert maps.shape == (len(paths), det.image_size, det.image_size)
    assert np.isfinite(scores).all() and np.isfinite(maps).all()
    labels = np.array([s.label for s in ds.test])
    # the generated defects are obvious: every defect must outscore the typical good image
    assert scores[labels == 1].mean() > scores[labels == 0].mean()


def test_deterministic_with_seed(fitted, tiny_dataset):
    det, ds = fitted
    again = fit_on(create_detector(det.name, **CONFORMANCE_PARAMS[det.name]), ds)
    paths = [s.path for s in ds.test[:4]]
    np.testing.assert_array_equal(det.score(paths)[0], again.score(paths)[0])


def test_bundle_round_trip_scores_identically(fitted, tmp_path):
    det, ds = fitted
    bundle = calibrate_detector(det, ds.validation)
    path = bundle.save(tmp_path / "m.dlens")
    loaded = Bundle.load(path)
    paths = [s.path for s in ds.test]
    s0, m0 = det.score(paths)
    s1, m1 = loaded.detector.score(paths)
    np.testing.assert_array_equal(s0, s1)
    np.testing.assert_array_equal(m0, m1)
    assert loaded.calibration == bundle.calibration
    assert loaded.detector.get_params() == det.get_params()
    insp = Inspector(loaded).inspect(paths[0])
    # against the image scored alone: a batch's matrix products round differently in the last bits,
    # which an ensemble's standardisation by a small spread makes visible
    assert insp.score == pytest.approx(float(det.score(paths[:1])[0][0]))


SCORED_IN_PYTORCH = {"autoencoder", "supervised"}  # no graph for ONNX Runtime: their own networks, not a patch embedder


def test_the_default_runtime_scores_like_pytorch_or_says_why(fitted, tmp_path):
    """Every detector fit can make runs in ONNX Runtime with PyTorch's scores, or says in one line why not."""
    det, ds = fitted
    path = calibrate_detector(det, ds.validation).save(tmp_path / "m.dlens")
    default, reference = load_model(path), load_model(path, "torch")
    paths = [s.path for s in ds.test]
    if det.name in SCORED_IN_PYTORCH:
        assert default.runtime.runtime == "torch" and "no graph" in default.runtime.line() and "\n" not in default.runtime.line()
        with pytest.raises(DefectLensError, match="--runtime onnx: .*no graph"):
            load_model(path, "onnx")
        return
    assert default.runtime.runtime == "onnx", default.runtime.line()
    assert default.runtime.graphs == (2 if det.name == "ensemble" else 1)  # one graph per feature detector inside
    s0, m0 = reference.detector.score(paths)
    s1, m1 = default.detector.score(paths)
    d0, d1 = (b.detector.decision_scores(s, m, b.calibration) for b, s, m in ((reference, s0, m0), (default, s1, m1)))
    assert np.abs(d0 - d1).max() <= 1e-4 * max(1.0, np.abs(d0).max())
    assert np.abs(m0 - m1).max() <= 1e-4 * max(1.0, np.abs(m0).max())
    assert [i.is_defective for i in Inspector(default).inspect_many(paths)] == [i.is_defective for i in Inspector(reference).inspect_many(paths)]


def test_refuses_bad_input(fitted, tmp_path):
    det, _ = fitted
    with pytest.raises(DefectLensError, match="at least one|labelled defect images"):
        create_detector(det.name, **CONFORMANCE_PARAMS[det.name]).fit([])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError, match="broken.png"):
        det.score([broken])
    with pytest.raises(DefectLensError, match="not fitted"):
        create_detector(det.name, **CONFORMANCE_PARAMS[det.name]).score([broken])
    with pytest.raises(DefectLensError, match="no setting"):
        create_detector(det.name, no_such_setting=1)


def test_scoring_runs_ahead_in_a_thread_with_the_callers_faiss_threads_and_hands_out_before_an_error(tiny_dataset, tmp_path):
    """score_batches scores the next batch in a thread while the caller handles this one; that
    thread searches with the caller's faiss thread count (OpenMP's is per thread), a single batch
    is scored in the caller's own thread, and what was scored before an unreadable image is still
    handed out, in order, before the error."""
    import threading

    import faiss

    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    det = create_detector("patchcore", image_size=64, coreset_ratio=0.1, batch_size=2).fit(ds.train_good)
    seen: list[tuple[int, int]] = []
    score_pixels = det.score_pixels

    def recording(pixels, watch=None):
        seen.append((threading.get_ident(), faiss.omp_get_max_threads()))
        return score_pixels(pixels, watch)

    det.score_pixels = recording
    fresh: list[int] = []
    probe = threading.Thread(target=lambda: fresh.append(faiss.omp_get_max_threads()))
    probe.start()
    probe.join()
    target = 2 if fresh[0] == 1 else 1  # a count a new thread would not have by itself
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(target)
    try:
        det.score(ds.train_good[:2])
        assert seen == [(threading.get_ident(), target)]
        seen.clear()
        streamed = list(det.score_batches(ds.train_good[:6]))
        assert [i for out in streamed for i in out.batch.indices] == list(range(6))
        assert len(seen) == 3 and all(ident != threading.get_ident() and threads == target for ident, threads in seen)
    finally:
        faiss.omp_set_num_threads(before)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    handed = []
    with pytest.raises(ImageError, match="broken.png"):
        for out in det.score_batches([*ds.train_good[:4], broken, *ds.train_good[4:6]]):
            handed.extend(out.batch.indices)
    assert handed == [0, 1, 2, 3]
