"""Proof that the automatic choice is sound: synthetic against real AUROC, per candidate.

`defectlens benchmark ROOT --selection` runs the selection of ``fit --detector auto`` on every
category with every candidate carried to the final stage, scores each finalist on the real
labelled test split too (which the choice never sees), and reports per category the rank
correlation between synthetic and real image AUROC, the real AUROC of the pick against the
real best, and then the real figures of the pick fitted on all training images, which is
what a user who runs plain ``fit`` gets. The finalists within RIVAL_MARGIN of the real best are
fitted on all training images as well: finalists are fitted on a sample (120 images), which may
rank them otherwise, and the gap a user meets is between the models ``fit`` could have deployed.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from defectlens.errors import DefectLensError
from defectlens.evaluation.comparison import KILLED, each_category
from defectlens.workflows.selection import Candidate, format_figure

RIVAL_MARGIN = 0.02  # the allowed gap: a finalist this close at the sample size may be the best on all images


@dataclass
class CategorySelection:
    category: str
    chosen: str = ""
    results: list[dict] = field(default_factory=list)
    spearman: float | None = None
    chosen_test_auroc: float | None = None  # the pick, as measured in the final stage
    best_label: str = ""
    best_test_auroc: float | None = None
    full_fit: dict = field(default_factory=dict)  # the pick fitted on all training images, evaluated
    rivals_full_fit: list[dict] = field(default_factory=list)  # the finalists within RIVAL_MARGIN of the real best, likewise
    selection_s: float | None = None
    peak_mb: float | None = None
    error: str = ""


def _run_category(category: str, label: str, budget_s: float, seed: int) -> CategorySelection:
    """Runs in a fresh child process."""
    from defectlens.data import load_dataset
    from defectlens.workflows.selection import TestSet, candidates, select_detector

    out = CategorySelection(label)
    try:
        ds = load_dataset(category, validation_fraction=0.0)
        test = TestSet([s.path for s in ds.test], np.array([s.label for s in ds.test]))
        pool = candidates(ds.train_good)
        t0 = time.perf_counter()
        sel = select_detector(ds.train_good, budget_s=budget_s, finalists=len(pool), seed=seed, pool=pool, test=test,
                              progress=lambda msg: print(f"  {label}: {msg.strip()}", flush=True))
        out.selection_s = time.perf_counter() - t0
        out.chosen = sel.chosen.label
        out.results = [asdict(r) for r in sel.results]
        finals = [r for r in sel.results if r.stage == "final" and r.test_auroc is not None and r.image_auroc is not None]
        if len(finals) >= 3:
            out.spearman = float(spearmanr([r.image_auroc for r in finals], [r.test_auroc for r in finals]).statistic)
        if finals:
            best = max(finals, key=lambda r: r.test_auroc)
            out.best_label, out.best_test_auroc = best.label, best.test_auroc
            out.chosen_test_auroc = next((r.test_auroc for r in finals if r.label == sel.chosen.label), None)
        out.full_fit = _fit_all(sel.chosen, ds, seed)
        rivals = [r.label for r in finals if r.label != sel.chosen.label and r.test_auroc >= out.best_test_auroc - RIVAL_MARGIN]
        out.rivals_full_fit = [{"label": label, **_fit_all(finalist(label, pool), ds, seed)} for label in dict.fromkeys(rivals)]
    except DefectLensError as exc:
        out.error = str(exc)
    except Exception as exc:  # noqa: BLE001 -- one broken category must not lose the others
        out.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    out.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


def finalist(label: str, pool: list[Candidate]) -> Candidate:
    """The candidate behind a result's label: one of the pool, or the winner with the global term."""
    by_label = {c.label: c for c in pool}
    if label in by_label:
        return by_label[label]
    base = by_label[label.removesuffix("+global")]
    return Candidate(label, f"global:{base.spec}", dict(base.params))


def _fit_all(candidate: Candidate, ds, seed: int) -> dict:
    """Fit on all training images, as plain `fit` deploys, and evaluate on the test split."""
    from defectlens.bundle import Bundle
    from defectlens.evaluation.evaluate import evaluate

    det = candidate.build(random_state=seed)
    t1 = time.perf_counter()
    det.fit(ds.train_good)
    fit_s = time.perf_counter() - t1
    result = evaluate(Bundle(det), ds)
    return {**{k: result.metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")},
            "fit_s": fit_s, "ms_per_image": result.timings["ms_per_image"], "train_images": len(ds.train_good)}


def run_selection_benchmark(root: str | Path, budget_s: float = 3600.0, seed: int = 0, progress=print) -> list[CategorySelection]:
    return each_category(root, "selection benchmark", _run_category, (budget_s, seed), lambda label: CategorySelection(label, error=KILLED),
                         markdown_category, progress)


def markdown_category(c: CategorySelection) -> str:
    if c.error:
        return f"### {c.category}\n\nfailed: {c.error}\n"
    lines = [f"### {c.category}", "", ("| candidate | stage | fit images | synthetic AUROC | synthetic AUPRO | logical AUROC | real test AUROC "
                                       "| fit s | ms/image |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in c.results:
        mark = " **picked**" if r["label"] == c.chosen and r["stage"] == "final" else ""
        lines.append(f"| {r['label']}{mark} | {r['stage']} | {r['n_fit']} | {format_figure(r['image_auroc'])} | {format_figure(r['aupro'])} | "
                     f"{format_figure(r.get('logical_auroc'))} | {format_figure(r['test_auroc'])} | {format_figure(r['fit_s'], 1)} | "
                     f"{format_figure(r['ms_per_image'], 1)} |")
    gap = None if c.best_test_auroc is None or c.chosen_test_auroc is None else c.best_test_auroc - c.chosen_test_auroc
    lines += ["", f"Spearman rank correlation of synthetic and real AUROC over the finalists: {format_figure(c.spearman, 2)}. "
              f"Picked {c.chosen} (real {format_figure(c.chosen_test_auroc)}); real best {c.best_label} ({format_figure(c.best_test_auroc)}); "
              f"gap {format_figure(gap)}. Selection took {format_figure(c.selection_s, 0)} s."]
    if c.full_fit:
        f = c.full_fit
        lines.append(f"The pick fitted on all {f['train_images']} training images: image AUROC {format_figure(f['image_auroc'])}, "
                     f"pixel AUROC {format_figure(f['pixel_auroc'])}, AUPRO {format_figure(f['aupro'])}, fit {format_figure(f['fit_s'], 1)} s, "
                     f"{format_figure(f['ms_per_image'], 1)} ms/image; peak {format_figure(c.peak_mb, 0)} MB.")
    if c.rivals_full_fit and c.full_fit:
        best = max(c.rivals_full_fit, key=lambda r: r["image_auroc"])
        each = ", ".join(f"{r['label']} {format_figure(r['image_auroc'])} (fit {format_figure(r['fit_s'], 1)} s)" for r in c.rivals_full_fit)
        lines.append(f"The finalists within {RIVAL_MARGIN} of the real best, fitted on all training images too: {each}; "
                     f"gap of the pick to the best of them on all training images {format_figure(max(0.0, best['image_auroc'] - c.full_fit['image_auroc']))}.")
    return "\n".join(lines) + "\n"


def markdown(entries: list[CategorySelection], machine: str) -> str:
    return "\n".join([f"Machine: {machine}", "", *[markdown_category(e) for e in entries]])
