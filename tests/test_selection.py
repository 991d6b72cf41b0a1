"""Automatic detector choice from good images and synthetic defects (`fit --detector auto`)."""

from __future__ import annotations

import numpy as np
import pytest

from defectlens import Bundle
from defectlens.cli import main
from defectlens.data import load_dataset
from defectlens.data.defects import LOGICAL
from defectlens.workflows import selection
from defectlens.workflows.selection import LOGICAL_DEFECTS, Candidate, CandidateResult, ValidationSet, rank, select_detector, tiling_for

SMALL_POOL = [
    Candidate("patchcore", "patchcore", {"image_size": 64, "coreset_ratio": 0.1}),
    Candidate("padim", "padim", {"image_size": 64, "n_features": 20}),
]


def test_candidates_rank_by_mean_of_auroc_and_aupro_and_ties_by_speed():
    results = [
        CandidateResult("slow-precise", "final", 10, image_auroc=0.90, aupro=0.80, fit_s=9, ms_per_image=30),  # 0.850
        CandidateResult("fast-precise", "final", 10, image_auroc=0.88, aupro=0.818, fit_s=1, ms_per_image=5),  # 0.849: tied, faster
        CandidateResult("vague", "final", 10, image_auroc=0.95, aupro=0.60, fit_s=1, ms_per_image=2),  # 0.775
        CandidateResult("no-maps", "final", 10, image_auroc=0.80, fit_s=1, ms_per_image=1),  # AUROC alone
        CandidateResult("broken", "final", 10, note="failed: x"),
    ]
    assert [r.label for r in rank(results)] == ["fast-precise", "slow-precise", "no-maps", "vague"]
    assert selection.selection_score(results[0]) == pytest.approx(0.85) and selection.selection_score(results[4]) is None


def test_tiling_is_offered_for_large_or_elongated_images_only():
    assert tiling_for([(256, 256)] * 4, 256) is None
    assert tiling_for([(300, 400)] * 4, 256) is None
    large = tiling_for([(640, 640)] * 4, 256)
    assert large == {"tile_size": 256, "scale": 1.0, "overlap": 0.25, "map_size": 256}
    strip = tiling_for([(64, 1024)] * 4, 256)
    assert strip["scale"] == 2.0 and strip["tile_size"] == 128  # a thin strip is enlarged so tiles hold texture


def test_validation_set_pairs_held_out_goods_with_their_synthetic_defects(tiny_dataset):
    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    v = ValidationSet.make(ds.train_good[:4], seed=3, target_defects=12)
    n = 4 + 12 + LOGICAL_DEFECTS
    assert (v.labels == 0).sum() == 4 and (v.labels == 1).sum() == 12 + LOGICAL_DEFECTS
    assert all(m.any() for m, label in zip(v.masks, v.labels, strict=True) if label)
    assert not any(m.any() for m, label in zip(v.masks, v.labels, strict=True) if not label)
    again = ValidationSet.make(ds.train_good[:4], seed=3, target_defects=12)
    assert all(np.array_equal(a, b) for a, b in zip(v.images, again.images, strict=True))
    assert v.masks_at((32, 32)).shape == (n, 32, 32) and v.masks_at((16, 48)).shape == (n, 16, 48)
    # the logical defects come last, apart: the goods are in both sets, each defect in one
    assert v.families[-LOGICAL_DEFECTS:] == [LOGICAL] * LOGICAL_DEFECTS and LOGICAL not in v.families[:-LOGICAL_DEFECTS]
    assert v.local.sum() == 16 and v.logical.sum() == 4 + LOGICAL_DEFECTS and not (v.local & v.logical & (v.labels == 1)).any()


@pytest.mark.slow
def test_held_out_images_never_fit_a_candidate_measured_on_them(tiny_dataset, monkeypatch):
    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    held_by_set, fit_by_set = {}, {}
    real_make, real_measure = ValidationSet.make, selection.measure

    def spy_make(heldout, seed, target_defects=64):
        v = real_make(heldout, seed, target_defects=16)
        held_by_set[id(v)] = {str(p) for p in heldout}
        return v

    def spy_measure(candidate, fit_images, validation, seed, stage, test=None):
        fit_by_set.setdefault(id(validation), set()).update(str(p) for p in fit_images)
        return real_measure(candidate, fit_images, validation, seed, stage, test)

    monkeypatch.setattr(ValidationSet, "make", staticmethod(spy_make))
    monkeypatch.setattr(selection, "measure", spy_measure)
    sel = select_detector(ds.train_good, pool=SMALL_POOL, screen_images=6, final_images=12, seed=0)
    # 16 images: a fifth is 4, so the finalists see 4 disjoint held-out shares, 16 good images in all
    assert sel.n_splits == 4 and len(held_by_set) == 4 and set(fit_by_set) == set(held_by_set)
    assert all(held_by_set[k] and fit_by_set[k] and not held_by_set[k] & fit_by_set[k] for k in held_by_set)
    assert set().union(*held_by_set.values()) == {str(p) for p in ds.train_good}
    assert sel.chosen.label in {"patchcore", "padim"}
    assert {r.stage for r in sel.results} == {"screen", "final"}
    chosen = [r for r in sel.results if r.label == sel.chosen.label and r.stage == "final"][0]
    assert chosen is rank([r for r in sel.results if r.stage == "final" and "+global" not in r.label])[0]  # the term was declined
    assert sel.n_heldout == 16 and sel.n_synthetic == 4 * 16
    assert "**chosen**" in sel.table() and "4 disjoint shares" in sel.describe() and "means over 4 held-out shares" in sel.reason


def test_finalists_are_ranked_by_their_mean_over_the_held_out_shares(monkeypatch):
    """One share of 4 good images favoured "lucky"; over five shares "steady" is better."""
    figures = {"lucky": [0.95, 0.60, 0.60, 0.60, 0.60], "steady": [0.80, 0.80, 0.80, 0.80, 0.80]}
    shares: dict[int, int] = {}  # validation set -> which share

    def fake_make(heldout, seed, target_defects=64):
        v = ValidationSet([np.zeros((8, 8, 3))] * len(heldout), np.zeros(len(heldout), int), [np.zeros((8, 8), bool)] * len(heldout),
                          ["good"] * len(heldout))
        shares[id(v)] = len(shares)
        return v

    def fake_measure(candidate, fit_images, validation, seed, stage, test=None):
        return CandidateResult(candidate.label, stage, len(fit_images), image_auroc=figures[candidate.label][shares[id(validation)]],
                               aupro=0.5, fit_s=0.1, ms_per_image=1.0)

    monkeypatch.setattr(selection, "measure", fake_measure)
    monkeypatch.setattr(ValidationSet, "make", staticmethod(fake_make))
    pool = [Candidate("lucky", "tiled:padim"), Candidate("steady", "tiled:padim")]  # wrapped: no global term
    sel = select_detector([np.zeros((8, 8, 3))] * 20, pool=pool)
    screen = {r.label: r.image_auroc for r in sel.results if r.stage == "screen"}
    final = {r.label: r.image_auroc for r in sel.results if r.stage == "final"}
    assert screen == {"lucky": 0.95, "steady": 0.80}  # the first share alone would pick "lucky"
    assert final == pytest.approx({"lucky": 0.67, "steady": 0.80}) and sel.chosen.label == "steady" and sel.n_splits == 5


def test_held_out_shares_are_disjoint_and_aim_at_twenty_good_images():
    counts = {n: len(selection.held_out_shares(n, 0.2, 0)) for n in (8, 12, 20, 50, 99, 100, 209)}
    assert counts == {8: 2, 12: 3, 20: 5, 50: 2, 99: 1, 100: 1, 209: 1}  # from 100 a fifth is 20: one share, as before
    shares = selection.held_out_shares(20, 0.2, 3)
    assert all(len(s) == 4 for s in shares) and sorted(sum(shares, [])) == list(range(20))
    assert selection.held_out_shares(209, 0.2, 3)[0] == selection.held_out_shares(209, 0.2, 3)[0]


def test_too_few_images_fall_back_to_the_first_candidate_and_say_why(tiny_dataset):
    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    sel = select_detector(ds.train_good[:5], pool=SMALL_POOL)
    assert sel.chosen.label == "patchcore" and not sel.results and "5 good images" in sel.reason


def test_a_failing_candidate_becomes_a_note(tiny_dataset):
    ds = load_dataset(tiny_dataset, validation_fraction=0.0)
    broken = Candidate("broken", "patchcore", {"image_size": 64, "coreset_ratio": 7.0})
    sel = select_detector(ds.train_good, pool=[broken, SMALL_POOL[1]], screen_images=8, final_images=8)
    assert sel.chosen.label in {"padim", "padim+global"}
    assert [r.note for r in sel.results if r.label == "broken"][0].startswith("failed: coreset_ratio")


@pytest.mark.slow
@pytest.mark.parametrize("flags, expect", [([], "auto"), (["--detector", "padim", "--n-features", "20"], "padim")])
def test_fit_chooses_by_default_and_a_named_detector_is_fitted_as_before(flags, expect, tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(selection, "candidates", lambda images, backbone, image_size, weights=None: SMALL_POOL)
    out = tmp_path / "m.dlens"
    assert main(["fit", str(tiny_dataset), "-o", str(out), "--image-size", "64", *flags]) == 0
    bundle = Bundle.load(out)
    printed = capsys.readouterr().out
    if expect == "auto":
        record = bundle.metadata["selection"]
        assert bundle.detector.name == record["chosen"]["spec"] and "detector selection" in printed
        assert {"patchcore", "padim"} <= {r["label"] for r in record["results"]} <= {"patchcore", "padim", "patchcore+global", "padim+global"}
        # the report and the service's model details show how the model was chosen
        assert main(["evaluate", str(out), str(tiny_dataset), "--out", str(tmp_path / "ev.json"), "--report", str(tmp_path / "rep")]) == 0
        html = (tmp_path / "rep" / "report.html").read_text()
        assert "How the detector was chosen" in html and "&#9654; " + record["chosen"]["label"] in html
        assert (tmp_path / "rep" / "figures" / "synthetic.png").is_file() and 'alt="Synthetic defects' in html
        from fastapi.testclient import TestClient

        from defectlens.service.app import InspectionService, ServiceSettings, create_app

        settings = ServiceSettings(db_url=f"sqlite:///{tmp_path / 'h.db'}", model_dir=tmp_path, models=[out])
        details = TestClient(create_app(InspectionService(settings))).get("/api/models/m").json()
        assert details["selection"]["chosen"]["label"] == record["chosen"]["label"]
    else:
        assert bundle.detector.name == "padim" and "selection" not in bundle.metadata


@pytest.mark.parametrize(("auroc", "logical", "kept"), [
    (0.95, 0.70, True),  # a better synthetic score
    (0.903, 0.70, False),  # a tie, and no gain on logical defects
    (0.898, 0.80, True),  # a tie, and logical defects better seen: what the term is for
    (0.85, 0.95, False),  # logical defects better seen, local ones worse: not worth it
])
def test_global_term_is_kept_only_when_it_raises_the_synthetic_score_or_the_logical_one(auroc, logical, kept, monkeypatch):
    tried = []

    def fake_measure(candidate, fit_images, validation, seed, stage, test=None):
        tried.append(candidate)
        return CandidateResult(candidate.label, stage, len(fit_images), image_auroc=auroc, aupro=0.5, fit_s=1.0, ms_per_image=1.0,
                               logical_auroc=logical)

    monkeypatch.setattr(selection, "measure", fake_measure)
    best = CandidateResult("padim/blocks", "final", 12, image_auroc=0.90, aupro=0.5, fit_s=1.0, ms_per_image=1.0, logical_auroc=0.70)
    pool = [Candidate("padim/blocks", "padim", {"features": "blocks"})]
    results: list[CandidateResult] = []
    validation = ValidationSet([np.zeros((8, 8, 3))] * 4, np.array([0, 0, 1, 1]), [np.zeros((8, 8), bool)] * 4, ["good"] * 4)
    ranked, pool = selection._try_global_term([best], pool, [selection.Split(list(range(12)), validation)], 0, 0.0, 1e9, results, lambda _m: None, None)
    assert tried[0].spec == "global:padim" and tried[0].params == {"features": "blocks"}
    assert (ranked[0].label == "padim/blocks+global") is kept and results[-1].label == "padim/blocks+global"
    assert ("kept" if kept else "not kept") in results[-1].note
    assert any(c.spec == "global:padim" for c in pool) is kept


def test_global_term_is_not_tried_on_wrappers(monkeypatch):
    monkeypatch.setattr(selection, "measure", lambda *a, **k: pytest.fail("must not be measured"))
    best = CandidateResult("patchcore+padim", "final", 12, image_auroc=0.9)
    pool = [Candidate("patchcore+padim", "ensemble", {"detector": "patchcore,padim"})]
    ranked, _ = selection._try_global_term([best], pool, [], 0, 0.0, 1e9, [], lambda _m: None, None)
    assert ranked == [best]


def test_the_budget_counts_work_not_waiting():
    """A process waiting for the cores (another job on the machine) spends none of its budget,
    so a loaded machine tries the same finalists as a quiet one."""
    import time

    from defectlens.workflows.selection import work_clock

    t0 = work_clock()
    time.sleep(0.3)
    assert work_clock() - t0 < 0.05
    x, t0 = 0, work_clock()
    while work_clock() - t0 < 0.05:  # busy: the clock moves
        x += 1
    assert x > 0


def test_the_selection_benchmark_compares_the_pick_with_the_real_best_both_fitted_on_all_images():
    from defectlens.evaluation.selection_benchmark import CategorySelection, finalist, markdown_category

    pool = [Candidate("padim/blocks", "padim", {"features": "blocks"}), Candidate("simplenet", "simplenet")]
    assert finalist("simplenet", pool) is pool[1]
    glob = finalist("padim/blocks+global", pool)
    assert (glob.spec, glob.params) == ("global:padim", {"features": "blocks"})
    fit = {"image_auroc": 0.957, "pixel_auroc": 0.76, "aupro": 0.78, "f1_max": 0.9, "fit_s": 60.0, "ms_per_image": 18.0, "train_images": 761}
    rivals = [{**fit, "label": "simplenet", "image_auroc": 0.962}, {**fit, "label": "padim/blocks+global", "image_auroc": 0.969}]
    entry = CategorySelection("magnetic_tile", "padim/blocks", chosen_test_auroc=0.898, best_label="simplenet", best_test_auroc=0.918,
                              full_fit=fit, rivals_full_fit=rivals)
    text = markdown_category(entry)
    assert "gap 0.020." in text and "simplenet 0.962 (fit 60.0 s), padim/blocks+global 0.969" in text
    assert "to the best of them on all training images 0.012" in text
