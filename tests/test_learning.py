"""Learning on the line: detectors that take more good images without a refit, and model versions."""

from __future__ import annotations

import numpy as np
import pytest

from defectlens import create_detector, load_dataset
from defectlens.data.images import load_rgb
from defectlens.detectors.coreset import extend_coreset
from defectlens.errors import DefectLensError

pytestmark = pytest.mark.integration  # the service, line loop, watcher or engines end to end: not for the fast lane


def moved(path, gain: float = 1.35, offset: float = 0.08) -> np.ndarray:
    """A good part photographed on a moved line: brighter lamp, lifted blacks."""
    return np.clip(load_rgb(path) * gain + offset, 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def data(tiny_dataset):
    return load_dataset(tiny_dataset, validation_fraction=0.0)


def test_extend_coreset_adds_only_what_the_bank_does_not_cover():
    rng = np.random.default_rng(0)
    near = rng.normal(0, 0.01, (50, 4)).astype(np.float32)  # all within 0.1 of the bank's one patch at 0
    far = rng.normal(0, 0.01, (50, 4)).astype(np.float32) + 5.0  # a new look: one cluster far away
    candidates = np.concatenate([near, far])
    d2 = (candidates**2).sum(1)
    added = extend_coreset(d2, candidates, radius=0.5)
    assert len(added) == 1 and added[0] >= 50  # one patch covers the far cluster; the near ones add nothing
    covered = np.minimum(d2, ((candidates - candidates[added[0]]) ** 2).sum(1))
    assert covered.max() <= 0.25
    assert len(extend_coreset(d2, candidates, radius=11.0)) == 0  # the far cluster lies 10 away


def test_patchcore_learns_a_moved_good_part_and_nothing_from_a_known_one(data):
    det = create_detector("patchcore", image_size=64, coreset_ratio=0.1).fit(data.train_good[:12])
    bank = len(det.memory_bank_)
    assert det.coverage_radius_ > 0
    det.partial_fit(data.train_good[:3])  # images it was fitted on: every patch is already covered
    assert len(det.memory_bank_) == bank and det.n_learned_patches_ == 0
    shifted = [moved(p) for p in data.train_good]
    before = det.score(shifted)[0]
    det.partial_fit(shifted[:3])
    assert det.n_learned_patches_ > 0 and len(det.memory_bank_) == bank + det.n_learned_patches_
    after = det.score(shifted)[0]
    assert np.all(after[:3] <= det.coverage_radius_ + 1e-4)  # what it learned is covered
    assert np.all(after <= before + 1e-6)  # a bigger bank only brings neighbours closer
    assert after[3:].mean() < before[3:].mean() - 0.02  # moved parts it did not see score lower too
    assert det.n_train_images_ == 12 + 3 + 3


def test_patchcore_keeps_its_coverage_radius_through_a_bundle(data, tmp_path):
    from defectlens.bundle import Bundle

    det = create_detector("patchcore", image_size=64, coreset_ratio=0.1).fit(data.train_good)
    det.partial_fit([moved(data.train_good[0])])
    loaded = Bundle.load(Bundle(det).save(tmp_path / "m.dlens")).detector
    assert loaded.coverage_radius_ == pytest.approx(det.coverage_radius_)
    assert loaded.n_learned_patches_ == det.n_learned_patches_
    np.testing.assert_array_equal(loaded.memory_bank_, det.memory_bank_)


def test_padim_learns_a_second_centre_and_keeps_its_gaussian(data, tmp_path):
    from defectlens.bundle import Bundle

    det = create_detector("padim", image_size=64, n_features=16).fit(data.train_good[:12])
    mean, precision = det.mean_.copy(), det.precision_.copy()
    shifted = [moved(p) for p in data.train_good]
    unmoved_before, before = det.score(data.train_good)[0], det.score(shifted)[0]
    det.partial_fit(shifted[:2]).partial_fit(shifted[2:4])  # a second call pools into the same centre
    np.testing.assert_array_equal(det.mean_, mean)  # the fitted Gaussian is left as it was
    np.testing.assert_array_equal(det.precision_, precision)
    x = np.concatenate([det._select(e) for _, e in det._iter_embeddings(shifted[:4])])
    np.testing.assert_allclose(det.learned_mean_, x.mean(axis=0), rtol=1e-4, atol=1e-5)
    assert det.n_learned_ == 4 and det.n_train_images_ == 16
    after = det.score(shifted)[0]
    assert np.all(after <= before + 1e-4)  # the nearer of two centres is never farther than the old one
    assert after[4:].mean() < before[4:].mean() - 0.2 * (before[4:].mean() - unmoved_before.mean())  # unseen moved parts too
    assert np.all(det.score(data.train_good)[0] <= unmoved_before + 1e-4)  # the old look is still known
    loaded = Bundle.load(Bundle(det).save(tmp_path / "m.dlens")).detector
    assert loaded.n_learned_ == 4
    np.testing.assert_array_equal(loaded.score(shifted)[0], det.score(shifted)[0])


def test_padim_keeps_defects_far_from_both_centres(data):
    det = create_detector("padim", image_size=64, n_features=16).fit(data.train_good)
    defects = [s.path for s in data.test if s.label]
    before = det.score([moved(p) for p in defects])[0]
    det.partial_fit([moved(p) for p in data.train_good[:4]])
    after = det.score([moved(p) for p in defects])[0]
    goods_after = det.score([moved(s.path) for s in data.test if not s.label])[0]
    assert after.min() > goods_after.max()  # moved defects still stand above the moved good parts
    assert after.mean() > 0.5 * before.mean()


def test_ensembles_and_tiles_learn_through_their_members(data):
    ens = create_detector("ensemble", detector="patchcore,padim", backbones="mobilenet_v2", image_size=64,
                          detector_params={"coreset_ratio": 0.1, "n_features": 16}).fit(data.train_good)
    assert ens.learns_incrementally
    ens.partial_fit([moved(data.train_good[0])])
    assert ens.members_[0].n_learned_patches_ > 0 and ens.members_[1].n_train_images_ == len(data.train_good) + 1
    tiled = create_detector("tiled", detector="patchcore", tile_size=32, detector_params={"coreset_ratio": 0.1}).fit(data.train_good[:4])
    assert tiled.learns_incrementally
    tiled.partial_fit([moved(data.train_good[0])])
    assert tiled.inner_.n_learned_patches_ > 0 and tiled.n_train_images_ == 5


def test_a_detector_that_cannot_learn_says_so(data):
    det = create_detector("global", detector="padim", detector_params={"image_size": 64, "n_features": 16}).fit(data.train_good)
    assert not det.learns_incrementally
    with pytest.raises(DefectLensError, match="cannot learn new images without a refit"):
        det.partial_fit([data.train_good[0]])


def test_version_names():
    from pathlib import Path

    from defectlens.workflows.learning import next_version, split_version, version_path

    assert split_version("bottle") == ("bottle", 1) and split_version("bottle.v12") == ("bottle", 12)
    assert split_version("my.part.v2") == ("my.part", 2) and split_version("v2") == ("v2", 1)
    assert version_path(Path("m/bottle.v3.dlens"), 4) == Path("m/bottle.v4.dlens")
    assert version_path(Path("m/bottle.v3.dlens"), 1) == Path("m/bottle.dlens")
    assert next_version(Path("/nonexistent/bottle.dlens")) == 2


def test_learn_writes_a_new_version_and_rechecks_the_threshold(model_dir, tiny_dataset, tmp_path, capsys):
    import shutil

    from PIL import Image

    from defectlens.bundle import Bundle
    from defectlens.cli import main

    model = tmp_path / "discs.dlens"
    shutil.copy(model_dir / "discs.dlens", model)
    parent = Bundle.load(model)
    ds = load_dataset(tiny_dataset)
    folder = tmp_path / "confirmed"
    folder.mkdir()
    for i, p in enumerate([s.path for s in ds.test if not s.label][:2]):
        Image.fromarray((moved(p) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    assert main(["learn", str(model), str(folder), "--label", "good"]) == 0
    out = capsys.readouterr().out
    assert "discs.v2.dlens (version 2, parent discs.dlens)" in out and "re-checked on" in out
    child = Bundle.load(tmp_path / "discs.v2.dlens")
    assert child.metadata["lineage"]["parent_checksum"] == parent.checksum
    assert child.metadata["lineage"]["root_checksum"] == parent.checksum
    assert Bundle.load(model).checksum == parent.checksum  # the parent file is untouched
    assert child.calibration.image_threshold == parent.calibration.image_threshold
    assert len(child.calibration.good_scores) == len(parent.calibration.good_scores)
    assert child.detector.n_learned_patches_ > 0
    # an image the model already knows teaches nothing: no version is written for it
    capsys.readouterr()
    assert main(["learn", str(tmp_path / "discs.v2.dlens"), str(folder / "0.png"), "--label", "good"]) == 2
    assert "already knows parts like these" in capsys.readouterr().err and not (tmp_path / "discs.v3.dlens").exists()
    # learning again from either file numbers on, never overwriting
    darker = folder / "darker.png"
    Image.fromarray((moved(ds.test[0].path, gain=0.6, offset=0.0) * 255).astype(np.uint8)).save(darker)
    assert main(["learn", str(tmp_path / "discs.v2.dlens"), str(darker), "--label", "good"]) == 0
    grandchild = Bundle.load(tmp_path / "discs.v3.dlens")
    assert grandchild.metadata["lineage"]["root_checksum"] == parent.checksum
    assert [e["version"] for e in grandchild.metadata["learned"]] == [2, 3]


def test_learn_refuses_bad_input_in_one_line(model_dir, tmp_path, capsys):
    from defectlens.cli import main

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["learn", str(model_dir / "discs.dlens"), str(bad), "--label", "good"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.png" in err[0]
    assert not list(model_dir.glob("discs.v*.dlens"))
