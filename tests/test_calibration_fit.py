"""Calibration with a real detector: where unseen good scores come from, labelled calibration,
defect typing and the `calibrate` verb."""

from __future__ import annotations

import json

import numpy as np
import pytest

from defectlens import Bundle, Inspector, create_detector
from defectlens.calibration.defect_types import DefectTyper
from defectlens.calibration.settings import CalibrationSettings
from defectlens.cli import main
from defectlens.data import load_dataset
from defectlens.errors import DefectLensError
from defectlens.workflows.fitting import fit_calibrated, kfold_scores, score_images, single_image_views

SMALL = {"image_size": 64, "coreset_ratio": 0.1}


def test_kfold_scores_come_from_models_that_did_not_see_the_image(tiny_dataset):
    images = load_dataset(tiny_dataset, validation_fraction=0.0).train_good[:8]
    det = create_detector("patchcore", **SMALL)
    out_of_fold, _ = kfold_scores(det, images, folds=4)
    in_sample = score_images(det.fit(images), images)
    assert out_of_fold.scores.shape == (8,)
    # a memory bank holding the image's own patches scores it far lower
    assert np.all(out_of_fold.scores > in_sample.scores)


def test_kfold_fold_models_take_what_the_deployed_model_chose_from_the_data(tiny_dataset, monkeypatch):
    """SimpleNet chooses its pooling per fit; the fold models the threshold is set on must be
    fitted with the deployed model's choice, not make their own, whose scale would then set it."""
    import defectlens.workflows.fitting as fitting

    seen = []
    monkeypatch.setattr(fitting, "kfold_scores", lambda det, *a, **k: seen.append(det) or kfold_scores(det, *a, **k))
    good = load_dataset(tiny_dataset, validation_fraction=0.0).train_good[:8]
    det = create_detector("simplenet", image_size=64, embed_dim=16, hidden=32, max_epochs=2)
    fit_calibrated(det, good, scheme="kfold", folds=2)
    assert det.get_params()["pooling"] == "auto" and seen[0].get_params()["pooling"] == det.pooling_
    tiled = create_detector("tiled", detector="simplenet", detector_params={"embed_dim": 16, "hidden": 32, "max_epochs": 2}, tile_size=64)
    tiled.fit(good[:6])
    assert tiled.chosen_params() == {"detector_params": {"embed_dim": 16, "hidden": 32, "max_epochs": 2, "pooling": tiled.inner_.pooling_}}
    assert create_detector("patchcore", **SMALL).fit(good[:4]).chosen_params() == {}
    # an ensemble's members may choose differently: each member's choice is carried on its own
    ensemble = create_detector("ensemble", detector="simplenet,padim", backbones="mobilenet_v2", image_size=64,
                               detector_params={"embed_dim": 16, "hidden": 32, "max_epochs": 2, "n_features": 16}).fit(good[:6])
    chosen = ensemble.chosen_params()
    assert chosen == {"member_params": [{"pooling": ensemble.members_[0].pooling_}, {}]}
    fold = fitting.fold_prototype(ensemble)
    assert fold._members()[0].get_params()["pooling"] == ensemble.members_[0].pooling_
    assert fold._members()[1].get_params()["n_features"] == 16
    with pytest.raises(DefectLensError, match="member_params gives 1 members' settings for an ensemble of 2"):
        create_detector("ensemble", detector="simplenet,padim", member_params=[{}]).fit(good[:6])


@pytest.mark.slow
def test_auto_scheme_picks_holdout_kfold_or_single_image(tiny_dataset):
    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    good = ds.train_good
    kfold = fit_calibrated(create_detector("patchcore", **SMALL), good[:6], good[6:10]).calibration
    assert kfold.source == "kfold-10"
    assert kfold.files == [str(p) for p in good[:10]]  # each out-of-fold score keeps its image's name, for the notes
    bundle = fit_calibrated(create_detector("patchcore", **SMALL), good[:4], good[4:16])
    assert bundle.calibration.source == "holdout" and bundle.calibration.n_good == 12
    assert bundle.calibration.files == [str(p) for p in good[4:16]]
    with pytest.warns(UserWarning, match="single good image"):
        one = fit_calibrated(create_detector("patchcore", **SMALL), good[:1])
    assert one.calibration.source == "single-image-augmented" and one.calibration.n_good == 14
    # the one-image model still tells its own good parts from defects most of the time
    insp = Inspector(one)
    verdicts = {s.defect_type: [] for s in ds.test}
    for s in ds.test:
        verdicts[s.defect_type].append(insp.inspect(s.path).is_defective)
    assert sum(verdicts["scratch"] + verdicts["spot"]) >= 4


def test_single_image_views_do_not_overlap():
    rgb = np.random.default_rng(0).random((40, 50, 3)).astype(np.float32)
    fit, calib = single_image_views(rgb)
    assert len(fit) == 8 and len(calib) == 14
    assert all(v.shape == rgb.shape and v.dtype == np.float32 and v.min() >= 0 and v.max() <= 1 for v in fit + calib)
    for c in calib:
        assert not any(np.array_equal(c, f) for f in fit)


def test_labelled_calibration_learns_defect_types(tiny_dataset):
    ds = load_dataset(tiny_dataset, validation_fraction=0.25)
    defects = [s for s in ds.test if s.label]
    settings = CalibrationSettings(strategy="f1")
    with pytest.warns(UserWarning):
        bundle = fit_calibrated(create_detector("patchcore", **SMALL), ds.train_good, ds.validation, settings, scheme="holdout",
                                defects=[s.path for s in defects], defect_types=[s.defect_type for s in defects])
    cal = bundle.calibration
    assert cal.strategy == "f1" and cal.n_defect == 8 and cal.source == "holdout+labelled"
    assert set(cal.per_type) == {"scratch", "spot"}
    assert isinstance(bundle.typer, DefectTyper) and list(bundle.typer.classes_) == ["scratch", "spot"]
    assert 0.0 <= bundle.typer.cv_accuracy_ <= 1.0


def test_typer_separates_clusters_and_reports_cross_validated_accuracy():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    X = np.concatenate([c + 0.1 * rng.normal(size=(6, 16)) for c in centres])
    y = np.repeat(["crack", "hole", "stain"], 6)
    typer = DefectTyper().fit(X, y)
    assert typer.cv_accuracy_ == 1.0 and typer.per_type_accuracy_ == {"crack": 1.0, "hole": 1.0, "stain": 1.0}
    names, conf = typer.predict(centres[[2, 0]])
    assert names == ["stain", "crack"] and np.all(conf > 0.9)
    arrays, meta = typer.get_state()
    again = DefectTyper().set_state(arrays, json.loads(json.dumps(meta)))
    assert again.predict(centres)[0] == ["crack", "hole", "stain"]
    with pytest.raises(DefectLensError, match="two defect types"):
        DefectTyper().fit(X[:6], y[:6])


@pytest.fixture(scope="module")
def cli_model(tiny_dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("cal") / "m.dlens"
    assert main(["fit", str(tiny_dataset), "-o", str(path), "--validation-fraction", "0.25", "--scheme", "holdout",
                 "--image-size", "64", "--coreset-ratio", "0.1", "--detector", "patchcore"]) == 0
    return path


def test_calibrate_without_data_reuses_stored_scores(cli_model, tmp_path, capsys):
    before = Bundle.load(cli_model).calibration
    out = tmp_path / "strict.dlens"
    assert main(["calibrate", str(cli_model), "--target-frr", "0.5", "-o", str(out)]) == 0
    after = Bundle.load(out).calibration
    assert after.n_good == before.n_good == 4 and after.good_scores == before.good_scores
    # 50 % false rejects allowed: the 2nd largest of 4 good scores, guaranteed FRR <= 2/5
    assert after.image_threshold == sorted(before.good_scores)[-2] < before.image_threshold
    assert after.guarantee["rank"] == 2 and after.guarantee["bound"] == pytest.approx(0.4)
    assert after.synthetic_scores == before.synthetic_scores and len(after.synthetic_scores) >= 8
    assert Bundle.load(cli_model).calibration == before  # -o leaves the original alone
    out_text = capsys.readouterr().out
    assert "estimated false-reject rate" in out_text and "FRR <= 40 % guaranteed on average" in out_text


def test_calibrate_with_labelled_data_and_evaluation_leaves_those_images_out(cli_model, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "f1.dlens"
    assert main(["calibrate", str(cli_model), str(tiny_dataset), "--strategy", "f1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "F1-max" in printed and "defect typing: 2 types" in printed
    bundle = Bundle.load(out)
    assert bundle.calibration.n_defect == 4 and bundle.typer is not None
    assert len(bundle.calibration.files) == 4 + 2 + 4  # 4 unseen train goods, 2 test goods, 4 test defects
    # evaluation on the same data skips the images calibration saw
    assert main(["evaluate", str(out), str(tiny_dataset), "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["metrics"]["n_good"] == 2 and result["metrics"]["n_defect"] == 4 and result["excluded_calibration_images"] == 6
    # inspection now names types from the learned prototypes
    assert main(["inspect", str(out), str(tiny_dataset / "test" / "scratch"), "--no-overlay", "--out", str(tmp_path / "i")]) == 0
    records = [json.loads(line) for line in (tmp_path / "i" / "results.jsonl").read_text().splitlines()]
    typed = [r for rec in records for r in rec["regions"]]
    assert typed and all(r["type"] in ("scratch", "spot") and r["type_source"] == "prototype" for r in typed)
    # a later good-only re-calibration changes the threshold but keeps the learned types
    assert main(["calibrate", str(out), "--target-frr", "0.05", "-o", str(tmp_path / "again.dlens")]) == 0
    again = Bundle.load(tmp_path / "again.dlens")
    assert again.typer is not None and again.calibration.strategy == "target_frr"


def test_calibrate_refuses_what_it_cannot_do(cli_model, capsys):
    assert main(["calibrate", str(cli_model), "--strategy", "f1"]) == 2
    assert "needs DATA with labelled defect images" in capsys.readouterr().err
