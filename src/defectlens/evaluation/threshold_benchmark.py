"""Which threshold rule and which calibration scores to use, measured: `defectlens benchmark ROOT --thresholds`.

For every category, with the training images subsampled (20, 50, all), it fits one detector as
``fit`` would and sets the threshold by each rule from each source of unseen good scores:

* holdout (10 % of the good images never fitted on, at least 30, 99 from 396 and 199 from 597 images: what
  ``fit`` does with 100+ images);
* k-fold with 5 and 10 folds, and leave-one-out up to 20 images (what ``fit`` does with fewer):
  each fold's model scores the images it did not see; the deployed model is then fitted on all,
  so fold scores come from models that saw fewer images and run high.

The real test split, which no rule sees, then gives each threshold's false-reject rate on good
parts and its recall on defects, beside the oracle: the best recall any threshold reaches at
the same false-reject rate, and at 5 %. Recall / oracle near 1 is a tight threshold.

With ``--draws N`` each size is drawn N times and calibrated only as ``fit`` calibrates, to show
how one threshold's false-reject rate spreads around the average that the guarantee speaks of.

Where a run calibrates on held-out images (100+), the held-out and the good test scores come from
the one deployed model, so they can be pooled and split again at the same sizes: how often a rule
meets the acceptance (test FRR <= 5 % and recall >= 0.9 of the oracle's at that FRR) over such
re-splits is that rule's pass rate, of which one holdout's pass or fail is a single draw.

With ``--group-by REGEX`` the good test images are grouped by their file names (DeepPCB's first
five digits are the board design) and the default threshold's false-reject rate is given per
group, and on the groups with and without training images: a promise made on good images says
nothing of a kind of part it never saw, and a test split with such parts shows it here.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defectlens.errors import DefectLensError
from defectlens.evaluation.comparison import KILLED, each_category
from defectlens.workflows.selection import format_figure, select_detector

# the default first; the others are what it was chosen against
RULES = {"conformal 2 %": {"strategy": "target_frr"}, "conformal 1 %": {"strategy": "target_frr", "target_frr": 0.01},
         "conformal 5 %": {"strategy": "target_frr", "target_frr": 0.05},
         "PAC 5 % at 90 %": {"strategy": "target_frr", "target_frr": 0.05, "confidence": 0.9},
         "tail model 1 % (old default)": {"strategy": "tail", "target_frr": 0.01}, "cost (escape 10, 5 % defects)": {"strategy": "cost"}}
DEFAULT_RULE = "conformal 2 %"
ORACLE_FRR = 0.05
ORACLE_SHARE = 0.9  # the acceptance: recall at least this share of the oracle's at the same test FRR
RESPLITS = 500  # re-splits per holdout run and rule: the pass rate to within about 2 points


@dataclass
class ThresholdRow:
    category: str
    n_train: int
    scheme: str
    rule: str
    n_calibration: int = 0
    threshold: float | None = None
    largest_good: float | None = None  # largest calibration good score
    bound: float | None = None  # guaranteed FRR on average
    frr: float | None = None  # on test/good
    recall: float | None = None  # on test defects
    synthetic_recall: float | None = None
    oracle_same: float | None = None  # best recall at test FRR <= frr
    oracle_5: float | None = None  # best recall at test FRR <= 5 %
    default: bool = False  # what plain `fit` does with this many images
    standard: bool = False  # the calibration scores plain `fit` would use (any rule)
    pick: str = ""  # with --detector auto: the configuration the selection chose at this size
    draw: int = 0  # with --draws N: which of the N seeded draws of the training images and their split
    resplit_pass: float | None = None  # holdout runs: share of re-splits of held-out + test good scores that pass
    resplit_frr95: float | None = None  # and the 95th percentile of their test FRR
    groups: dict[str, dict] = field(default_factory=dict)  # with --group-by, the default rule only: per group of good test
    # images, its training images ("train"), good test images ("test_good") and test FRR ("frr")


@dataclass
class FoldRow:
    """What the fold models of plain `fit`'s k-fold say about the deployed model, on a probe of the test split."""

    category: str
    n_train: int
    folds: int
    probe_good: int = 0
    probe_defect: int = 0
    bias_median: float | None = None  # median over probe goods of mean fold-model score / deployed score
    bias_top: float | None = None  # the same at the probe goods' 95th percentile
    deployed_frr: float | None = None  # the default threshold (deployed model) on the probe
    deployed_recall: float | None = None
    extrapolated_frr: float | None = None  # the default rule on extrapolated fold scores
    extrapolated_recall: float | None = None
    cross_frr: float | None = None  # the k fold models deployed together (cross-conformal)
    cross_recall: float | None = None


CARRIED = "10 folds carried to all images"
VIEWS = "augmented views, deployed model"
PROBE = 200  # test images every fold model scores: enough to see a bias, cheap at 10 folds


def _probe(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == v))[: max(1, round(n * (labels == v).mean()))] for v in (0, 1)]
    return np.sort(np.concatenate(picked))


@dataclass
class CategoryThresholds:
    category: str
    rows: list[ThresholdRow] = field(default_factory=list)
    folds: list[FoldRow] = field(default_factory=list)
    seconds: float | None = None
    error: str = ""


def oracle_recall(good: np.ndarray, defect: np.ndarray, frr: float) -> float:
    """Best recall of any threshold that rejects at most ``frr`` of these good scores."""
    ranked = np.sort(np.asarray(good))[::-1]
    allowed = int(math.floor(frr * ranked.size + 1e-9))
    t = ranked[allowed] if allowed < ranked.size else -np.inf
    return float((np.asarray(defect) > t).mean())


def within_frr(frr: float) -> bool:
    """The acceptance's bound on false rejects (to float rounding: 1 of 20 is exactly 5 %)."""
    return frr <= ORACLE_FRR + 1e-12


def passes(frr: float, recall: float, oracle: float) -> bool:
    """The acceptance for one threshold on one test split; where no threshold at that false-reject
    rate catches anything, recall cannot fall short of the oracle's."""
    return within_frr(frr) and (oracle <= 0 or recall >= ORACLE_SHARE * oracle - 1e-12)


def _passing(rows: list[ThresholdRow]) -> int:
    """How many of these runs pass the acceptance as drawn."""
    return sum(passes(r.frr, r.recall, r.oracle_same) for r in rows)


def resplit_pass(threshold_of, calibration: np.ndarray, test_good: np.ndarray, test_defect: np.ndarray,
                 resplits: int = RESPLITS, seed: int = 0) -> tuple[float, float]:
    """Share of re-splits on which ``threshold_of(calibration scores)`` passes, and the 95th
    percentile of their test FRR.

    The held-out and the good test scores are pooled and split again at their own sizes, as if
    another holdout and another test split had been drawn from the same good parts. Valid where
    both come from one model (holdout calibration), not for fold models' scores; where the test
    parts differ from the training ones (DeepPCB's new board designs), pooling spreads the
    difference over both sides.
    """
    rng = np.random.default_rng(seed)
    pool, n = np.concatenate([calibration, test_good]), calibration.size
    ok, frrs = 0, np.empty(resplits)
    for i in range(resplits):
        shuffled = rng.permutation(pool)
        good = shuffled[n:]
        t = threshold_of(shuffled[:n])
        frrs[i], recall = float((good > t).mean()), float((test_defect > t).mean())
        ok += passes(frrs[i], recall, oracle_recall(good, test_defect, frrs[i]))
    return ok / resplits, float(np.quantile(frrs, 0.95))


NO_GROUP = "(no match)"


def group_of(path: str | Path, pattern: re.Pattern) -> str:
    """The group a file belongs to: the pattern's first group in the file's stem, else its whole match."""
    found = pattern.search(Path(path).stem)
    if found is None:
        return NO_GROUP
    return found.group(1) if pattern.groups and found.group(1) is not None else found.group(0)


def group_rejects(rows: list[ThresholdRow], pattern: re.Pattern | None, train: Sequence[Path], test_paths: Sequence[Path],
                  labels: np.ndarray, test_scores: np.ndarray) -> None:
    """The default row's false-reject rate per group of good test images, each group with its
    count of training images: what separates a threshold's spread from parts it never saw."""
    if pattern is None:
        return
    seen = Counter(group_of(p, pattern) for p in train)
    good_scores = test_scores[labels == 0]
    groups = np.array([group_of(p, pattern) for p, label in zip(test_paths, labels, strict=True) if label == 0])
    for row in rows:
        if row.default and row.threshold is not None:
            row.groups = {g: {"train": seen.get(g, 0), "test_good": int((groups == g).sum()),
                              "frr": float((good_scores[groups == g] > row.threshold).mean())} for g in sorted(set(groups.tolist()))}


def subsample(paths: Sequence[Path], n: int | None, seed: int) -> list[Path]:
    paths = list(paths)
    if n is None or n >= len(paths):
        return paths
    return sorted(random.Random(seed).sample(paths, n))


def _rows(label: str, n_train: int, scheme: str, calibration_scores, synthetic, test_good: np.ndarray, test_defect: np.ndarray,
          default: bool, pick: str = "") -> list[ThresholdRow]:
    from defectlens.calibration.calibrate import calibrate_scores
    from defectlens.calibration.settings import CalibrationSettings

    rows = []
    syn = synthetic.scored.scores if synthetic is not None else None
    for rule, settings in RULES.items():
        if syn is None and settings["strategy"] == "cost":
            continue  # the cost rule weighs synthetic recall: not made for this source of scores
        row = ThresholdRow(label, n_train, scheme, rule, int(calibration_scores.scores.size), default=default and rule == DEFAULT_RULE, pick=pick)
        try:
            cal = calibrate_scores(calibration_scores.scores, calibration_scores.map_max, CalibrationSettings(**settings), synthetic_scores=syn)
        except DefectLensError as exc:
            print(f"  {label}: {rule}: {exc}")
            rows.append(row)
            continue
        row.threshold, row.largest_good, row.bound = cal.image_threshold, float(calibration_scores.scores.max()), cal.guarantee["bound"]
        row.frr, row.recall = float(cal.rejects(test_good).mean()), float(cal.rejects(test_defect).mean())
        row.synthetic_recall = None if syn is None else float(cal.rejects(syn).mean())
        row.oracle_same, row.oracle_5 = oracle_recall(test_good, test_defect, row.frr), oracle_recall(test_good, test_defect, ORACLE_FRR)
        row.standard = default
        if scheme == "holdout":
            row.resplit_pass, row.resplit_frr95 = resplit_pass(
                lambda scores, settings=settings: calibrate_scores(scores, scores, CalibrationSettings(**settings), synthetic_scores=syn).image_threshold,
                calibration_scores.scores, test_good, test_defect, RESPLITS)
        rows.append(row)
    return rows


def extrapolate(fewer: np.ndarray, more: np.ndarray, n: int, folds_fewer: int, folds_more: int) -> np.ndarray:
    """Each image's out-of-fold score carried on to a model fitted on all ``n`` images.

    A score falls with the training set roughly as a + b / m (more normal variation seen): the
    image's scores from models of m1 = n (k1-1)/k1 and m2 = n (k2-1)/k2 images fix a and b, so the
    line through them gives the deployed model's score at m = n: the jackknife's bias correction.
    """
    m1, m2 = n * (folds_fewer - 1) / folds_fewer, n * (folds_more - 1) / folds_more
    c = (1 / n - 1 / m2) / (1 / m2 - 1 / m1)
    return more + c * (more - fewer)


def cross_conformal_rejects(fold_scores: np.ndarray, held_scores: np.ndarray, held_fold: np.ndarray, alpha: float) -> np.ndarray:
    """Verdicts of the k fold models deployed together (cross-conformal, Vovk 2015).

    ``fold_scores[k, j]`` is fold model k's score of new image j; each calibration image is
    compared only with the model that did not see it. Image j is rejected when fewer than
    max(1, floor(alpha (n + 1))) calibration images score at least as high under their own model:
    the conformal rule with the fold models in place of one deployed model.
    """
    from defectlens.calibration.strategies import conformal_rank

    at_least = sum((held_scores[held_fold == k][:, None] >= fold_scores[k][None, :]).sum(axis=0) for k in range(fold_scores.shape[0]))
    return at_least < max(1, conformal_rank(held_scores.size, alpha))


def _fold_row(label: str, n: int, folds: int, fold_scores: np.ndarray, deployed: np.ndarray, labels: np.ndarray,
              held_scores: np.ndarray, held_fold: np.ndarray, carried_scores: np.ndarray) -> FoldRow:
    """The fold models against the deployed one on a probe of the test split: their score ratio on
    good parts, and the probe's FRR and recall under the default rule set on the fold scores, on the
    carried scores, and with the fold models deployed together."""
    from defectlens.calibration.calibrate import calibrate_scores
    from defectlens.calibration.settings import CalibrationSettings

    good = labels == 0
    row = FoldRow(label, n, folds, int(good.sum()), int((~good).sum()))
    fold_mean = fold_scores.mean(axis=0)
    row.bias_median = float(np.median(fold_mean[good] / np.maximum(deployed[good], 1e-12)))
    row.bias_top = float(np.quantile(fold_mean[good], 0.95) / np.quantile(deployed[good], 0.95))
    rule = CalibrationSettings(**RULES[DEFAULT_RULE])
    verdicts = {"deployed": calibrate_scores(held_scores, held_scores, rule).rejects(deployed),
                "extrapolated": calibrate_scores(carried_scores, carried_scores, rule).rejects(deployed),
                "cross": cross_conformal_rejects(fold_scores, held_scores, held_fold, rule.target_frr)}
    for name, rejected in verdicts.items():
        setattr(row, f"{name}_frr", float(rejected[good].mean()))
        setattr(row, f"{name}_recall", float(rejected[~good].mean()) if (~good).any() else None)
    return row


def _fit_split(train: list, seed: int) -> tuple[list, list, bool]:
    """The images plain `fit` would fit on and hold out, and whether it calibrates on the holdout
    (True) or on 10-fold scores of all of them."""
    from defectlens.data.datasets import _split_validation
    from defectlens.workflows.fitting import resolve_scheme

    fit_part, held = _split_validation(train, 0.1, seed)
    return fit_part, held, resolve_scheme("auto", len(fit_part), len(held)) == "holdout"


def _as_fit(proto, label: str, train: list, seed: int, test_paths: list, labels: np.ndarray, pick: str, draw: int,
            pattern: re.Pattern | None = None) -> list[ThresholdRow]:
    """Rows for ``train`` calibrated exactly as plain `fit` calibrates it: a holdout from 100
    images, 10-fold scores below, the deployed model judged on the test split."""
    from sklearn.base import clone

    from defectlens.workflows.fitting import FOLDS, SYNTHETIC_DEFECTS, fold_prototype, kfold_scores, score_images, synthetic_scores

    fit_part, held, holdout = _fit_split(train, seed)
    if holdout:
        det = clone(proto).fit(fit_part)
        good, syn, scheme = score_images(det, held), synthetic_scores(det, held, SYNTHETIC_DEFECTS, seed), "holdout"
    else:
        det = clone(proto).fit(train)
        good, syn = kfold_scores(fold_prototype(det), train, min(FOLDS, len(train)), seed, SYNTHETIC_DEFECTS)
        scheme = f"kfold-{min(FOLDS, len(train))}"
    test = score_images(det, test_paths).scores
    rows = _rows(label, len(train), scheme, good, syn, test[labels == 0], test[labels == 1], True, pick)
    group_rejects(rows, pattern, train, test_paths, labels, test)
    for r in rows:
        r.draw = draw
    return rows


def _run_category(category: str, label: str, detector: str, params: dict, sizes: list[int | None], seed: int,
                  draws: int = 1, group_by: str | None = None) -> CategoryThresholds:
    """Runs in a fresh child process. With ``draws`` > 1 each size is drawn that many times (seeds
    seed, seed + 1, ...: the subsample, the holdout, the folds, the synthetic defects and, with
    auto, the pick), each calibrated only as plain `fit` calibrates: one draw says little about a
    threshold set on 20 images, whose false-reject rate is itself a random variable."""
    import warnings

    from sklearn.base import clone

    from defectlens.data import load_dataset
    from defectlens.detectors import create_detector
    from defectlens.workflows.fitting import (
        FOLDS,
        SYNTHETIC_DEFECTS,
        ScoredImages,
        fold_prototype,
        kfold_scores,
        score_images,
        single_image_views,
    )

    out = CategoryThresholds(label)
    t0 = time.perf_counter()
    warnings.simplefilter("ignore")
    pattern = re.compile(group_by) if group_by else None
    try:
        ds = load_dataset(category, validation_fraction=0.0)
        test_paths = [s.path for s in ds.test]
        labels = np.array([s.label for s in ds.test])
        probe = _probe(labels, PROBE, seed)
        auto = detector == "auto"
        proto, pick = None if auto else create_detector(detector, **params), ""
        for size, draw in ((size, draw) for size in sizes for draw in range(draws)):
            train = subsample(ds.train_good, size, seed + draw)
            n = len(train)
            if auto:  # choose from this many good images, then calibrate the pick as fit does. Unlike fit, the
                # choice sees the holdout images too (as its own held-out images: they never fit the pick)
                chosen = select_detector(train, seed=seed + draw, **params).chosen
                proto, pick = chosen.build(verbose=False, random_state=seed + draw), chosen.label
            print(f"  {label}: {n} training images" + (f", draw {draw + 1} of {draws}" if draws > 1 else "")
                  + (f", auto picks {pick}" if auto else ""), flush=True)
            if draws > 1 or auto or _fit_split(train, seed + draw)[2]:  # only what fit does (auto:
                # the other sources of scores were measured on fixed detectors)
                out.rows += _as_fit(proto, label, train, seed + draw, test_paths, labels, pick, draw, pattern)
                continue
            det = clone(proto).fit(train)  # the deployed model of every k-fold variant
            test = score_images(det, test_paths).scores
            test_good, test_defect = test[labels == 0], test[labels == 1]
            standard = min(FOLDS, n)
            by_folds, fold_probe, held_fold = {}, [], np.zeros(n, int)

            def on_fold(model, left_out, fold_probe=fold_probe, held_fold=held_fold):
                held_fold[left_out] = len(fold_probe)
                fold_probe.append(score_images(model, [test_paths[i] for i in probe]).scores)

            for folds in sorted({min(5, n), standard} | ({n} if n <= 20 else set())):
                good, syn = kfold_scores(fold_prototype(det), train, folds, seed, SYNTHETIC_DEFECTS,
                                         on_fold=on_fold if folds == standard else None)
                by_folds[folds] = good
                scheme = "leave-one-out" if folds == n else f"kfold-{folds}"
                rows = _rows(label, n, scheme, good, syn, test_good, test_defect, folds == standard)
                group_rejects(rows, pattern, train, test_paths, labels, test)
                out.rows += rows
                print(f"  {label}: {n} images, {scheme} done", flush=True)
            fewer = min(by_folds)
            corrected = by_folds[standard].scores
            if fewer < standard:
                corrected = extrapolate(by_folds[fewer].scores, corrected, n, fewer, standard)
                carried_scores = ScoredImages(corrected, corrected, np.zeros(n), np.zeros(n))  # map maxima only set the pixel threshold
                out.rows += _rows(label, n, CARRIED, carried_scores, None, test_good, test_defect, False)
            views = ScoredImages.concat([score_images(det, single_image_views(image, seed)[1]) for image in train])  # one image's views at a time
            out.rows += _rows(label, n, VIEWS, views, None, test_good, test_defect, False)
            out.folds.append(_fold_row(label, n, standard, np.stack(fold_probe), test[probe], labels[probe], by_folds[standard].scores,
                                       held_fold, corrected))
    except DefectLensError as exc:
        out.error = str(exc)
    except Exception as exc:  # noqa: BLE001 -- one broken category must not lose the others
        out.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    out.seconds = time.perf_counter() - t0
    return out


def run_threshold_benchmark(root: str | Path, detector: str = "patchcore", params: dict | None = None,
                            sizes: Sequence[int | None] = (10, 20, 50, 100, None), seed: int = 0, progress=print,
                            draws: int = 1, group_by: str | None = None) -> list[CategoryThresholds]:
    if draws < 1:
        raise DefectLensError(f"--draws must be 1 or more, got {draws}")
    if group_by is not None:
        try:
            re.compile(group_by)
        except re.error as exc:
            raise DefectLensError(f"--group-by {group_by!r} is not a regular expression: {exc}") from None
    return each_category(root, f"threshold benchmark ({detector})", _run_category, (detector, dict(params or {}), list(sizes), seed, draws, group_by),
                         lambda label: CategoryThresholds(label, error=KILLED), markdown_category, progress)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def markdown_category(c: CategoryThresholds) -> str:
    if c.error:
        return f"### {c.category}\n\nfailed: {c.error}\n"
    lines = [f"### {c.category}", "",
             "| train images | calibration scores | rule | threshold | largest good | guaranteed FRR | test FRR | recall | synthetic recall "
             "| oracle recall, same FRR | recall / oracle | oracle recall, FRR 5 % | pass rate over re-splits (FRR, 95th pct.) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    repeated = any(r.draw for r in c.rows)
    for r in c.rows:
        mark = " **default**" if r.default else ""
        ratio = None if r.recall is None or not r.oracle_same else r.recall / r.oracle_same
        pick = f" [{r.pick}]" if r.pick else ""
        draw = f" (draw {r.draw + 1})" if repeated else ""
        lines.append(f"| {r.n_train}{draw}{pick} | {r.scheme} ({r.n_calibration}) | {r.rule}{mark} | {format_figure(r.threshold, 4)} | "
                     f"{format_figure(r.largest_good, 4)} | <= {_pct(r.bound)} | {_pct(r.frr)} | {_pct(r.recall)} | {_pct(r.synthetic_recall)} | "
                     f"{_pct(r.oracle_same)} | {format_figure(ratio, 2)} | {_pct(r.oracle_5)} | {_resplits(r)} |")
    lines += ["", f"{format_figure(c.seconds, 0)} s."]
    return "\n".join(lines) + "\n"


def _resplits(r: ThresholdRow) -> str:
    return "-" if r.resplit_pass is None else f"{format_figure(r.resplit_pass, 2)} ({_pct(r.resplit_frr95)})"


def _mean_pass(rows: list[ThresholdRow]) -> str:
    """The mean pass rate over re-splits of the rows that have one (holdout runs), with their count."""
    rates = [r.resplit_pass for r in rows if r.resplit_pass is not None]
    return f"{format_figure(float(np.mean(rates)), 2)} ({len(rates)})" if rates else "-"


def summary(entries: list[CategoryThresholds]) -> str:
    """Each rule on the calibration scores plain `fit` uses, over every category and size: the
    criterion the default was chosen by (test FRR <= 5 %, recall close to the oracle's)."""
    lines = ["| rule | runs | test FRR <= 5 % | worst test FRR | mean recall / oracle (same FRR) | mean recall / oracle (FRR 5 %) "
             "| runs passing (FRR <= 5 %, recall / oracle >= 0.9) | holdout runs: pass rate over re-splits, mean |",
             "|---|---|---|---|---|---|---|---|"]
    for rule in RULES:
        rows = [r for e in entries for r in e.rows if r.rule == rule and r.standard and r.frr is not None]
        if not rows:
            continue
        same = [r.recall / r.oracle_same for r in rows if r.oracle_same]
        at5 = [r.recall / r.oracle_5 for r in rows if r.oracle_5]
        ok = sum(within_frr(r.frr) for r in rows)
        mark = " **default**" if rule == DEFAULT_RULE else ""
        lines.append(f"| {rule}{mark} | {len(rows)} | {ok} of {len(rows)} | {_pct(max(r.frr for r in rows))} | "
                     f"{format_figure(float(np.mean(same)) if same else None, 2)} ({len(same)}) | "
                     f"{format_figure(float(np.mean(at5)) if at5 else None, 2)} ({len(at5)}) | "
                     f"{_passing(rows)} of {len(rows)} | {_mean_pass(rows)} |")
    return "\n".join(lines) + "\n"


def scheme_summary(entries: list[CategoryThresholds]) -> str:
    """The default rule on each source of calibration scores, over the runs small enough for
    k-fold: what the choice of `fit`'s k-fold set-up rests on."""
    def kind(r: ThresholdRow) -> str:
        if r.standard:
            return "10 folds (leave-one-out below 10 images): **fit's default**"
        return "5 folds" if r.scheme == "kfold-5" else r.scheme

    rows = [r for e in entries for r in e.rows if r.rule == DEFAULT_RULE and r.scheme != "holdout" and r.frr is not None]
    lines = ["| calibration scores | runs | test FRR <= 5 % | worst test FRR | mean recall / oracle (same FRR) |", "|---|---|---|---|---|"]
    for name in dict.fromkeys(kind(r) for r in rows):
        group = [r for r in rows if kind(r) == name]
        same = [r.recall / r.oracle_same for r in group if r.oracle_same]
        ok = sum(within_frr(r.frr) for r in group)
        lines.append(f"| {name} | {len(group)} | {ok} of {len(group)} | {_pct(max(r.frr for r in group))} | "
                     f"{format_figure(float(np.mean(same)) if same else None, 2)} ({len(same)}) |")
    return "\n".join(lines) + "\n"


def fold_table(entries: list[CategoryThresholds]) -> str:
    """The fold models against the deployed model on a probe of the test split."""
    lines = ["| category | train images | folds | probe good / defect | fold / deployed score, median | at 95th percentile "
             "| default: FRR, recall | carried: FRR, recall | fold models deployed together (cross-conformal): FRR, recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in (f for e in entries for f in e.folds):
        lines.append(f"| {f.category} | {f.n_train} | {f.folds} | {f.probe_good} / {f.probe_defect} | {format_figure(f.bias_median, 3)} | "
                     f"{format_figure(f.bias_top, 3)} | {_pct(f.deployed_frr)}, {_pct(f.deployed_recall)} | "
                     f"{_pct(f.extrapolated_frr)}, {_pct(f.extrapolated_recall)} | {_pct(f.cross_frr)}, {_pct(f.cross_recall)} |")
    return "\n".join(lines) + "\n"


def draws_table(entries: list[CategoryThresholds]) -> str:
    """The default rule over repeated draws, per category and size: how its false-reject rate
    spreads, which one seed per size cannot show."""
    lines = ["| category | train images | calibration | draws | test FRR, mean | worst | draws over 5 % | recall / oracle at the same FRR, mean (worst) "
             "| draws passing | pass rate over re-splits, mean |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [r for e in entries for r in e.rows if r.default and r.frr is not None]
    for key in dict.fromkeys((r.category, r.n_train) for r in rows):
        group = [r for r in rows if (r.category, r.n_train) == key]
        frr = np.array([r.frr for r in group])
        ratio = [r.recall / r.oracle_same for r in group if r.oracle_same]  # as in summary: no ratio where no threshold catches any
        schemes = ", ".join(sorted({f"{r.scheme} ({r.n_calibration})" for r in group}))
        lines.append(f"| {key[0]} | {key[1]} | {schemes} | {len(group)} | {_pct(float(frr.mean()))} | {_pct(float(frr.max()))} | "
                     f"{sum(not within_frr(f) for f in frr)} | {format_figure(float(np.mean(ratio)) if ratio else None, 2)} "
                     f"({format_figure(float(np.min(ratio)) if ratio else None, 2)}) | "
                     f"{_passing(group)} | {_mean_pass(group)} |")
    return "\n".join(lines) + "\n"


def groups_table(entries: list[CategoryThresholds]) -> str:
    """The default threshold's false-reject rate per group of good test images (--group-by), and
    pooled over the groups with and without training images."""
    lines = ["| category | train images | groups with training images: good test images, FRR | groups without: good test images, FRR "
             "| each group: FRR (training / good test images) |", "|---|---|---|---|---|"]

    def pooled(groups: list[dict]) -> str:
        n = sum(g["test_good"] for g in groups)
        return f"{n}, {_pct(sum(g['frr'] * g['test_good'] for g in groups) / n)}" if n else "-"

    repeated = any(r.draw for e in entries for r in e.rows)
    for r in (r for e in entries for r in e.rows if r.groups):
        each = "; ".join(f"{name}: {_pct(g['frr'])} ({g['train']} / {g['test_good']})" for name, g in r.groups.items())
        draw = f" (draw {r.draw + 1})" if repeated else ""
        lines.append(f"| {r.category} | {r.n_train}{draw} | {pooled([g for g in r.groups.values() if g['train']])} | "
                     f"{pooled([g for g in r.groups.values() if not g['train']])} | {each} |")
    return "\n".join(lines) + "\n"


def markdown(entries: list[CategoryThresholds], machine: str, detector: str) -> str:
    repeated = any(r.draw for e in entries for r in e.rows)
    grouped = any(r.groups for e in entries for r in e.rows)
    return "\n".join([f"Machine: {machine}. Detector: {detector}. Synthetic recall is an estimate from synthetic defects; "
                      "test FRR, recall and the oracle come from the real test split, which no rule sees.", "",
                      *(["### The default rule over repeated draws (each calibrated as plain `fit` calibrates)", "", draws_table(entries)]
                        if repeated else []),
                      *(["### The default threshold's false-reject rate per group of good test images (--group-by)", "",
                         groups_table(entries)] if grouped else []),
                      "### Summary: each rule on the calibration scores plain `fit` uses", "", summary(entries),
                      "### Summary: the default rule on each source of k-fold calibration scores", "", scheme_summary(entries),
                      "### The fold models against the deployed model (a probe of the test split)", "", fold_table(entries),
                      *[markdown_category(e) for e in entries]])
