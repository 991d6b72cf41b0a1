"""The global term: image-level evidence that local detectors cannot see."""

from __future__ import annotations

import numpy as np
import pytest

from defectlens import Bundle, DefectLensError, create_detector
from defectlens.detectors.global_term import mahalanobis
from defectlens.metrics import image_auroc

SMALL = {"image_size": 64, "coreset_ratio": 0.2}


def _part(rng: np.random.Generator, squares: int) -> np.ndarray:
    """A noisy grey plate carrying ``squares`` bright squares at random places: every patch of
    a plate with none or two looks like some patch of a good plate with one."""
    img = np.clip(0.4 + 0.05 * rng.standard_normal((64, 64, 3)), 0, 1).astype(np.float32)
    for _ in range(squares):
        y, x = rng.integers(4, 44, 2)
        img[y : y + 16, x : x + 16] = 0.95
    return img


@pytest.fixture(scope="module")
def plates():
    rng = np.random.default_rng(0)
    train = [_part(rng, 1) for _ in range(16)]
    test = [_part(rng, 1) for _ in range(6)] + [_part(rng, 0) for _ in range(3)] + [_part(rng, 2) for _ in range(3)]
    return train, test, np.r_[np.zeros(6), np.ones(6)].astype(int)


@pytest.mark.slow
def test_global_term_sees_a_missing_or_extra_part_that_patches_do_not(plates):
    train, test, labels = plates
    local = create_detector("patchcore", **SMALL).fit(train)
    both = create_detector("global", detector="patchcore", detector_params=SMALL).fit(train)
    local_auroc = image_auroc(labels, local.score(test)[0])
    global_auroc = image_auroc(labels, both.score(test)[0])
    assert global_auroc >= 0.9 and global_auroc > local_auroc + 0.1
    # the map is the local detector's: the global term has nowhere to point
    np.testing.assert_allclose(both.score(test[:2])[1], both.inner_.score(test[:2])[1])


def test_global_term_survives_a_bundle_round_trip(plates, tmp_path):
    train, test, _ = plates
    det = create_detector("global", detector="padim", detector_params={"image_size": 64, "n_features": 20}).fit(train)
    path = Bundle(det).save(tmp_path / "g.dlens")
    again = Bundle.load(path).detector
    np.testing.assert_allclose(again.score(test)[0], det.score(test)[0], rtol=1e-5)


def test_mahalanobis_of_the_mean_is_zero_and_grows_with_distance():
    mean, precision = np.zeros(3), np.eye(3) * 4.0
    d = mahalanobis(np.array([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]]), mean, precision)
    np.testing.assert_allclose(d, [0.0, 2.0, 4.0])


def test_global_term_refuses_what_it_cannot_do(plates):
    train, _, _ = plates
    with pytest.raises(DefectLensError, match="at least 4 good images"):
        create_detector("global", detector="patchcore", detector_params=SMALL).fit(train[:3])
    with pytest.raises(DefectLensError, match="cannot wrap another global term"):
        create_detector("global", detector="global").fit(train)
