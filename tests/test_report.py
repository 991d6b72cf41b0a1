"""The evaluation report: written by `evaluate --report`, and rendered in a real browser."""

from __future__ import annotations

import json

import pytest

from defectlens.cli import main
from defectlens.evaluation.report import SECTIONS, TITLES

pytestmark = pytest.mark.slow  # browsers, servers and processes: not for the fast lane


@pytest.fixture(scope="module")
def report_dir(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    model = root / "m.dlens"
    assert main(["fit", str(tiny_dataset), "-o", str(model), "--image-size", "64", "--coreset-ratio", "0.1", "--detector", "patchcore"]) == 0
    assert main(["evaluate", str(model), str(tiny_dataset), "--out", str(root / "e.json"), "--report", str(root / "report")]) == 0
    return root / "report"


def test_report_files_are_written(report_dir):
    md = (report_dir / "report.md").read_text()
    for key in SECTIONS:
        assert f"## {TITLES[key]}" in md
    assert "![ROC and precision-recall curves](figures/curves.png)" in md
    for name in ("curves", "histogram", "confusion", "gallery_0"):
        assert (report_dir / "figures" / f"{name}.png").stat().st_size > 1000
    page = (report_dir / "report.html").read_text()
    assert "src=\"file:" not in page and "http" not in page.split("<body>")[1]  # self-contained


def test_report_renders_in_chromium(report_dir, browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto((report_dir / "report.html").as_uri())
    headings = page.eval_on_selector_all("section > h2", "hs => hs.map(h => h.textContent)")
    assert headings == [TITLES[k] for k in SECTIONS]
    # every figure decoded to a real picture
    sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
    assert len(sizes) >= 4 and all(done and width > 100 for done, width in sizes)
    summary = page.inner_text("#summary")
    assert "image AUROC" in summary and "false rejects" in summary
    tradeoff = page.inner_text("#tradeoff")
    assert "guaranteed FRR" in tradeoff and "synthetic recall (estimate)" in tradeoff and "▶" in tradeoff
    calibration = page.inner_text("#calibration")
    assert "conformal FRR 2 %" in calibration and "guaranteed on average" in calibration and "synthetic recall" in calibration
    assert page.locator("#errors figure").count() >= 1
    assert not errors
    page.close()


def test_evaluation_json_has_pixel_overlap_metrics(report_dir):
    result = json.loads((report_dir.parent / "e.json").read_text())
    m = result["metrics"]
    assert 0 <= m["pixel_iou"] <= m["pixel_dice"] <= 1
    assert m["frr"] == m["false_rejects"] / m["n_good"]


def test_gallery_shows_both_kinds_of_mistake_worst_first():
    from pathlib import Path

    import numpy as np

    from defectlens.data.datasets import Sample
    from defectlens.evaluation.evaluate import GALLERY_SIZE, _gallery

    labels = np.array([0] * 10 + [1] * 10)
    scores = np.r_[np.linspace(0.0, 0.9, 10), np.linspace(0.1, 1.0, 10)]  # threshold 0.5: goods 6-9 rejected, defects 0-4 escape
    samples = [Sample(Path(f"{i}.png"), "good" if lab == 0 else "crack") for i, lab in enumerate(labels)]
    maps = np.zeros((20, 4, 4))
    items = _gallery(samples, labels, scores, maps, 0.5)
    kinds = [g.kind for g in items]
    assert len(items) == GALLERY_SIZE and kinds.count("false reject") == 4 and kinds.count("escape") == 4
    assert items[0].score == 0.9 and items[4].score == 0.1  # worst false reject, worst escape first
    clean = _gallery(samples, labels, np.r_[np.zeros(10), np.ones(10)], maps, 0.5)
    assert [g.kind for g in clean] == ["closest good", "closest good", "closest defect", "closest defect"]
