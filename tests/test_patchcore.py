"""PatchCore specifics beyond the shared conformance suite."""

from __future__ import annotations

import numpy as np
import pytest

from defectlens import DefectLensError, create_detector
from defectlens.data import load_dataset
from defectlens.inference.loading import load_model
from defectlens.workflows import calibrate_detector


@pytest.fixture(scope="module")
def ds(tiny_dataset):
    return load_dataset(tiny_dataset, validation_fraction=0.0)


def test_embedding_size_and_coreset_size(ds):
    full = create_detector("patchcore", image_size=64, embed_dim=None, coreset_ratio=0.25).fit(ds.train_good)
    small = create_detector("patchcore", image_size=64, embed_dim=96, coreset_ratio=0.25).fit(ds.train_good)
    assert full.memory_bank_.shape == (round(16 * 8 * 8 * 0.25), 192 + 576)
    assert small.memory_bank_.shape[1] == 96
    assert full.n_train_patches_ == 16 * 8 * 8


def test_reweighting_scales_scores_into_0_1_of_max(ds):
    plain = create_detector("patchcore", image_size=64, coreset_ratio=0.2).fit(ds.train_good)
    weighted = create_detector("patchcore", image_size=64, coreset_ratio=0.2, reweight=True).fit(ds.train_good)
    paths = [s.path for s in load_dataset(ds.root).test]
    s_plain, m_plain = plain.score(paths)
    s_weighted, m_weighted = weighted.score(paths)
    np.testing.assert_array_equal(m_plain, m_weighted)  # maps are not reweighted
    assert np.all(s_weighted <= s_plain + 1e-6) and np.all(s_weighted >= 0)


def test_training_images_score_near_zero_with_full_memory_bank(ds):
    det = create_detector("patchcore", image_size=64, coreset_ratio=1.0).fit(ds.train_good[:3])
    scores, _ = det.score(ds.train_good[:3])
    np.testing.assert_allclose(scores, 0.0, atol=1e-2)


@pytest.mark.parametrize("bad", [{"coreset_ratio": 0}, {"image_size": 50}, {"embed_dim": 0}, {"backbone": "nope"}])
def test_invalid_settings_are_refused_at_fit(ds, bad):
    with pytest.raises(DefectLensError):
        create_detector("patchcore", **bad).fit(ds.train_good[:1])


def test_approximate_search_scores_like_exact_search(tiny_dataset):
    from defectlens.metrics import image_auroc

    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    images = [s.path for s in ds.test]
    labels = np.array([s.label for s in ds.test])
    exact = create_detector("patchcore", image_size=64, coreset_ratio=0.2).fit(ds.train_good)
    approx = create_detector("patchcore", image_size=64, coreset_ratio=0.2, search="ivf").fit(ds.train_good)
    s_exact, m_exact = exact.score(images)
    s_approx, m_approx = approx.score(images)
    # an approximate index may miss the nearest patch, so scores can only rise, and not by much
    assert np.all(s_approx >= s_exact - 1e-6) and np.abs(s_approx - s_exact).max() < 0.05
    assert image_auroc(labels, s_approx) == image_auroc(labels, s_exact)
    assert np.abs(m_approx - m_exact).mean() < 1e-3


def test_patches_the_ivf_index_misses_are_answered_exactly(tiny_dataset):
    """faiss IVF returns -1 where the probed lists hold no patch; that must not pick the bank's last patch."""
    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    images = [s.path for s in ds.test]
    exact = create_detector("patchcore", image_size=64, coreset_ratio=0.2, reweight=True).fit(ds.train_good)
    expected = exact.score(images)[0]

    class Missing:  # an index that misses every other query
        def __init__(self, index):
            self.index = index

        def search(self, queries, k):
            dist, idx = self.index.search(queries, k)
            dist[::2], idx[::2] = np.inf, -1
            return dist, idx

    exact._index = Missing(exact._index)
    np.testing.assert_allclose(exact.score(images)[0], expected, rtol=1e-6)


def test_unknown_search_and_exporting_an_approximate_model_are_refused(tiny_dataset, tmp_path):
    from defectlens import Bundle
    from defectlens.export import export_onnx

    with pytest.raises(DefectLensError, match="search must be one of flat, ivf"):
        create_detector("patchcore", search="hnsw").fit([np.zeros((64, 64, 3), np.uint8)])
    det = create_detector("patchcore", image_size=64, coreset_ratio=0.2, search="ivf").fit(load_dataset(tiny_dataset).train_good)
    with pytest.raises(DefectLensError, match="approximate 'ivf' search"):
        export_onnx(Bundle(det), tmp_path / "m.onnx")


@pytest.mark.parametrize("settings", [{"reduction": "pca", "embed_dim": 48}, {"reduction": "random", "embed_dim": 48}, {"bank_dtype": "float16"}])
def test_projections_and_half_precision_bank_round_trip_and_export(settings, tiny_dataset, tmp_path):
    from defectlens import Bundle, Inspector
    from defectlens.export import export_onnx

    ds = load_dataset(tiny_dataset, validation_fraction=0.25)
    images = [s.path for s in ds.test]
    # a projection is compared with PatchCore's channel means; a float16 bank with the same model in float32
    reference_settings = {"reduction": "mean", "embed_dim": 256} if "reduction" in settings else {}
    reference = create_detector("patchcore", image_size=64, coreset_ratio=0.2, **reference_settings).fit(ds.train_good)
    det = create_detector("patchcore", image_size=64, coreset_ratio=0.2, **settings).fit(ds.train_good)
    assert det.memory_bank_.dtype == np.dtype(det.bank_dtype) and det.memory_bank_.shape[1] == det.embed_dim
    if det.reduction == "pca":  # orthonormal principal axes
        np.testing.assert_allclose(det.projection_.T @ det.projection_, np.eye(det.embed_dim), atol=1e-4)
    scores, maps = det.score(images)
    ref_scores, _ = reference.score(images)
    assert np.corrcoef(scores, ref_scores)[0, 1] > 0.9  # the same images stand out
    if det.bank_dtype == "float16":
        np.testing.assert_allclose(scores, ref_scores, rtol=2e-3, atol=2e-3)

    bundle = calibrate_detector(det, ds.validation)
    loaded = Bundle.load(bundle.save(tmp_path / "m.dlens"))
    again, again_maps = loaded.detector.score(images)
    np.testing.assert_array_equal(again, scores)
    np.testing.assert_array_equal(again_maps, maps)
    exported = Inspector(load_model(export_onnx(bundle, tmp_path / "m.onnx")))
    for image, score in zip(images, scores, strict=True):
        assert abs(exported.inspect(image).score - float(score)) <= 1e-4


def test_projection_settings_are_checked(ds):
    with pytest.raises(DefectLensError, match="must be below the backbone's 768 channels"):
        create_detector("patchcore", image_size=64, reduction="random", embed_dim=768).fit(ds.train_good[:1])
    with pytest.raises(DefectLensError, match="bank_dtype must be one of"):
        create_detector("patchcore", bank_dtype="int8").fit(ds.train_good[:1])


def test_a_model_saved_before_reductions_existed_still_loads(ds, tmp_path):
    """Bundles store every setting the detector had; one written before `reduction` (and the
    float16 bank and two-stage coreset) existed averaged channels, whatever today's default is."""
    import json
    import zipfile

    from defectlens import Bundle
    from defectlens.bundle import _manifest_checksum

    det = create_detector("patchcore", image_size=64, coreset_ratio=0.2, reduction="mean", embed_dim=96).fit(ds.train_good)
    path = Bundle(det).save(tmp_path / "new.dlens")
    old = tmp_path / "old.dlens"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "manifest.json":
                manifest = json.loads(data)
                for key in ("reduction", "bank_dtype", "coreset_global_max"):
                    del manifest["detector"]["params"][key]
                manifest["checksum"] = _manifest_checksum(manifest)
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    loaded = Bundle.load(old).detector
    assert loaded.reduction == "mean"
    images = [s.path for s in load_dataset(ds.root).test]
    np.testing.assert_array_equal(loaded.score(images)[0], det.score(images)[0])


def test_pca_sample_is_spread_over_the_set_and_capped_in_patches(ds, monkeypatch):
    from defectlens.detectors import feature_based

    monkeypatch.setattr(feature_based, "PCA_PATCHES", 100)  # 64 px images have 64 patches each: two images' worth
    det = create_detector("patchcore", image_size=64, embed_dim=32, coreset_ratio=0.2)
    det._begin_fit(ds.train_good)  # the backbone, before a projection is fitted
    assert det._projection_sample(ds.train_good).shape == (100, 768)
    first_two = det._projection_sample([ds.train_good[0], ds.train_good[1]])
    np.testing.assert_array_equal(det._projection_sample(ds.train_good), first_two[:100])
    spread = det._projection_sample(ds.train_good[::-1])  # a different order of the set starts elsewhere
    assert not np.array_equal(spread, first_two[:100])
