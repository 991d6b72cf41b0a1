"""Choosing the detector for a part from its good images alone (``fit --detector auto``).

No detector wins on every part: PaDiM models each position and suits aligned parts and
textures, PatchCore's position-free nearest neighbour suits loose parts, tiling keeps small
defects on large images, and which backbone features describe a part best depends on the part.
Users have no defect images to tell, so the choice is made the way SWSA (Fung et al., 2023)
validates anomaly detectors: some good images are held out, synthetic defects are made from
them (``data.defects``), every candidate is fitted on the other good images and scored on the
held-out good images and their defective copies, and the candidate that separates and locates
them best (the mean of image AUROC and AUPRO; ties by speed) is kept. Held-out images never
fit a candidate measured on them.

Screening is cheap first: every candidate on a spread of 40 images, then the three finalists
on 120 and, with fewer than about 100 images, on further held-out shares (``held_out_shares``),
within a time budget (counted in CPU work, see ``work_clock``, so a busy machine makes the same
choice as a quiet one). Synthetic logical defects (a component moved, removed or
recoloured; ``data.defects.LOGICAL``) are scored apart: they do not rank candidates, since real
defects are mostly local, but they decide whether the winner takes the global term, which only
they reward. Where synthetic defects mislead (a part whose real defects look
like none of the families) the choice can be wrong; the selection table is kept in the model so
a person can see what was measured.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from defectlens.data.defects import LOGICAL, defects_from, synthesize
from defectlens.data.images import ImageInput, ModelSize, format_size, size_hw, spread
from defectlens.detectors import Detector, available_detectors, create_from_spec, detector_class
from defectlens.detectors.feature_based import FeatureDetector
from defectlens.errors import DefectLensError
from defectlens.metrics import aupro, image_auroc

MIN_IMAGES = 8  # below this, a held-out share is too small to rank candidates on
MAX_SIDE = 1024  # synthetic defects are made at native resolution, capped here (tiling sees them too)
ELONGATED = 1.5  # images this much taller than wide (or wider than tall) also get candidates in their proportions
MAX_ASPECT = 4.0  # the most elongated input tried: at 256, 128 x 512
SCORE_TIE = 0.005  # candidates this close in selection score are tied: the fastest wins
LOGICAL_DEFECTS = 16  # synthetic logical defects, scored apart from the local ones
LOGICAL_GAIN = 0.05  # the logical-defect AUROC gain that earns the global term at an equal local score
MIN_HELD_GOOD = 20  # finalists are measured on further held-out splits until this many good images were held out
MAX_SPLITS = 5  # and at most this many shares: each costs the finalists another fit


@dataclass(frozen=True)
class Candidate:
    """One configuration: a registered detector (or ``wrapper:inner``) and its settings."""

    label: str
    spec: str
    params: dict[str, Any] = field(default_factory=dict)

    def build(self, **extra: Any) -> Detector:
        return create_from_spec(self.spec, {**self.params, **extra})


@dataclass
class CandidateResult:
    label: str
    stage: str  # "screen" (few images) or "final" (more), or "skipped"
    n_fit: int
    image_auroc: float | None = None
    aupro: float | None = None
    fit_s: float | None = None
    ms_per_image: float | None = None
    logical_auroc: float | None = None  # held-out good images against synthetic logical defects
    test_auroc: float | None = None  # real test AUROC: only the selection benchmark measures it, never fit
    note: str = ""


@dataclass
class Selection:
    """What was measured and what was chosen; ``to_dict`` is what the model file keeps."""

    chosen: Candidate
    results: list[CandidateResult]
    n_fit: int
    n_heldout: int
    n_synthetic: int
    seed: int
    budget_s: float
    elapsed_s: float
    reason: str = ""
    n_splits: int = 1  # disjoint held-out shares the finalists were measured on

    def table(self) -> str:
        lines = ["| candidate | stage | fit images | synthetic image AUROC | synthetic AUPRO | logical AUROC | fit s | ms/image | note |",
                 "|---|---|---|---|---|---|---|---|---|"]
        chosen = self._chosen_row()
        for r in self.results:
            mark = " **chosen**" if r is chosen else ""
            figures = [format_figure(r.image_auroc), format_figure(r.aupro), format_figure(r.logical_auroc), format_figure(r.fit_s, 1),
                       format_figure(r.ms_per_image, 1)]
            lines.append(f"| {r.label}{mark} | {r.stage} | {r.n_fit} | {' | '.join(figures)} | {r.note} |")
        return "\n".join(lines)

    def describe(self) -> str:
        shares = f" (in {self.n_splits} disjoint shares; the screen used the first)" if self.n_splits > 1 else ""
        head = (f"detector selection: {len(self.results)} measurements on {self.n_heldout} held-out good images{shares} and "
                f"{self.n_synthetic} synthetic defects made from them, and {LOGICAL_DEFECTS * self.n_splits} logical ones scored apart "
                f"({self.elapsed_s:.0f} s of a {self.budget_s:.0f} s budget)")
        if not self.results:
            return f"{head}\nchose {self.chosen.label}: {self.reason}"
        return f"{head}\n{self.table()}\nchose {self.chosen.label}: {self.reason} (synthetic figures are estimates, not real defects)"

    def _chosen_row(self) -> CandidateResult | None:
        rows = [r for r in self.results if r.label == self.chosen.label and r.image_auroc is not None]
        return max(rows, key=lambda r: r.n_fit) if rows else None

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": asdict(self.chosen), "results": [asdict(r) for r in self.results], "n_fit": self.n_fit,
                "n_heldout": self.n_heldout, "n_synthetic": self.n_synthetic, "seed": self.seed, "budget_s": self.budget_s,
                "elapsed_s": self.elapsed_s, "reason": self.reason, "n_splits": self.n_splits}


def format_figure(v: float | None, digits: int = 3) -> str:
    """A figure for a table; '-' where it was not measured (or is NaN)."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def native_sizes(images: Sequence[ImageInput], sample: int = 16) -> list[tuple[int, int]]:
    """(height, width) of a spread of the images, read from file headers where possible."""
    sizes = []
    for img in spread(images, sample):
        if isinstance(img, np.ndarray):
            sizes.append(img.shape[:2])
        elif isinstance(img, Image.Image):
            sizes.append((img.height, img.width))
        else:
            with Image.open(img) as im:
                sizes.append((im.height, im.width))
    return sizes


def geometry_for(sizes: Sequence[tuple[int, int]], image_size: ModelSize) -> tuple[int, int] | None:
    """A (height, width) input with the proportions of elongated images and the pixels of the
    square one, so a tall or wide part is not squashed at no extra cost; None for images near
    square, and where a (height, width) was given. Proportions past MAX_ASPECT are capped: the
    short side keeps enough rows of features (128 px at 256) and a line scan is left to tiling."""
    if not isinstance(image_size, int):
        return None
    aspect = float(np.median([h / w for h, w in sizes]))  # above 1: tall
    if max(aspect, 1.0 / aspect) < ELONGATED:
        return None
    aspect = float(np.clip(aspect, 1.0 / MAX_ASPECT, MAX_ASPECT))
    side = lambda v: max(64, int(round(v / 16)) * 16)  # noqa: E731 -- both sides divisible by the backbone strides
    return side(image_size * np.sqrt(aspect)), side(image_size / np.sqrt(aspect))


def tiling_for(sizes: Sequence[tuple[int, int]], image_size: ModelSize) -> dict[str, Any] | None:
    """Tile settings when resizing to ``image_size`` would shrink small defects away: images whose
    long side is at least twice the model input, or elongated ones (squashed into a square);
    None when the images are small and square enough that resizing loses little."""
    image_size = max(size_hw(image_size))
    short = float(np.median([min(s) for s in sizes]))
    long = float(np.median([max(s) for s in sizes]))
    if long < 2 * image_size and long < 2 * short:
        return None
    scale = 1.0 if short >= 128 else min(4.0, 128.0 / short)  # thin strips are enlarged so a tile has texture to model
    tile = int(min(image_size, short * scale)) // 16 * 16
    return {"tile_size": max(64, tile), "scale": round(scale, 3), "overlap": 0.25, "map_size": image_size}


def candidates(images: Sequence[ImageInput], backbone: str = "mobilenet_v2", image_size: ModelSize = 256,
               weights: str | None = None) -> list[Candidate]:
    """The configurations worth trying on these images.

    Two detector families (memory bank, per-position Gaussian), their combination, the
    discriminative detector when registered, each on the wide (expanded) and the narrow (block
    output) taps of the backbone, and where the images call for it, both families on an input
    with the images' proportions and tiling at native resolution.
    """
    base: dict[str, Any] = {"backbone": backbone, "image_size": image_size, **({"weights": weights} if weights else {})}
    out = [
        Candidate("patchcore", "patchcore", dict(base)),
        Candidate("patchcore/blocks", "patchcore", {**base, "features": "blocks", "embed_dim": None}),
        Candidate("padim", "padim", dict(base)),
        Candidate("padim/blocks", "padim", {**base, "features": "blocks"}),
        Candidate("patchcore+padim", "ensemble", {"detector": "patchcore,padim", "backbones": backbone, "image_size": image_size,
                                                  **({"detector_params": {"weights": weights}} if weights else {})}),
    ]
    if "simplenet" in available_detectors():
        out.append(Candidate("simplenet", "simplenet", dict(base)))
    sizes = native_sizes(images)
    geometry = geometry_for(sizes, image_size)
    if geometry is not None:
        tag = format_size(geometry)
        out += [Candidate(f"padim@{tag}", "padim", {**base, "image_size": geometry}),
                Candidate(f"patchcore@{tag}", "patchcore", {**base, "image_size": geometry})]
    tiles = tiling_for(sizes, image_size)
    if tiles is not None:
        out.append(Candidate(f"tiled:padim/{tiles['tile_size']}px", "tiled:padim", {**base, **tiles}))
    return out


@dataclass
class ValidationSet:
    """Held-out good images plus synthetic defects made from them, with their masks; the logical
    defects come last and count only for ``logical``, the rest only for ``local``."""

    images: list[np.ndarray]
    labels: np.ndarray
    masks: list[np.ndarray]
    families: list[str]

    @classmethod
    def make(cls, heldout: Sequence[ImageInput], seed: int, target_defects: int = 64) -> ValidationSet:
        goods, defects = defects_from(heldout, target_defects, seed, MAX_SIDE)
        defects += synthesize(goods, LOGICAL_DEFECTS, seed + 1, families=[LOGICAL])  # seed + 1: a stream of their own
        images = goods + [d.image for d in defects]
        masks = [np.zeros(g.shape[:2], bool) for g in goods] + [d.mask for d in defects]
        labels = np.r_[np.zeros(len(goods)), np.ones(len(defects))].astype(int)
        return cls(images, labels, masks, ["good"] * len(goods) + [d.family for d in defects])

    @property
    def local(self) -> np.ndarray:
        return np.array([f != LOGICAL for f in self.families])

    @property
    def logical(self) -> np.ndarray:
        return np.array([f in ("good", LOGICAL) for f in self.families])

    def masks_at(self, shape: tuple[int, int]) -> np.ndarray:
        """Masks resized as the detectors resize images: to the map's (height, width)."""
        h, w = shape
        return np.stack([np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
                         for m in self.masks])


@dataclass
class Split:
    """One held-out share of the good images with its synthetic defects, and the images left to fit on."""

    fit_pool: list[ImageInput]
    validation: ValidationSet


def held_out_shares(n: int, heldout_fraction: float, seed: int) -> list[list[int]]:
    """Disjoint held-out shares of ``n`` good images (indices): the first for every candidate, all
    of them for the finalists.

    With 20 good images a fifth is 4, and an image AUROC over 4 good images moves by 0.25 with each
    one: on Magnetic Tile at 20 images, five disjoint shares of 4 ranked the same candidates
    0.02-0.05 apart (their spread, one share to the next), which is about the gap the choice turns on,
    and one share picked SimpleNet, whose recall at 1 % false rejects was 2 % against PaDiM's 31-49 %.
    So the finalists are measured on further disjoint shares until MIN_HELD_GOOD good images were
    held out (at most MAX_SPLITS shares), and ranked by their mean figures. From about 100 images a
    fifth is already 20 and there is one share, as before.
    """
    order = np.random.default_rng(seed).permutation(n)
    n_held = int(np.clip(round(n * heldout_fraction), 4, 30))
    count = max(1, min(MAX_SPLITS, math.ceil(MIN_HELD_GOOD / n_held), n // n_held))
    return [sorted(order[k * n_held:(k + 1) * n_held].tolist()) for k in range(count)]


def held_out_splits(images: Sequence[ImageInput], heldout_fraction: float, seed: int) -> list[Split]:
    """A Split for each of ``held_out_shares``, its synthetic defects seeded apart."""
    splits = []
    for k, held in enumerate(held_out_shares(len(images), heldout_fraction, seed)):
        kept_out = set(held)
        fit_pool = [img for i, img in enumerate(images) if i not in kept_out]
        splits.append(Split(fit_pool, ValidationSet.make([images[i] for i in held], seed + 2 * k)))  # 2 k: make uses seed and seed + 1
    return splits


@dataclass
class TestSet:
    """Labelled real test images, scored only by the selection benchmark to show whether the
    synthetic validation ranks candidates as real defects do; fit never sees one."""

    images: list[ImageInput]
    labels: np.ndarray


def work_clock() -> float:
    """Seconds of work: this process's CPU time per compute thread.

    The budget and the speeds that break ties are counted in it rather than in wall time, so the
    same images give the same search whether or not other jobs share the cores (under wall time,
    a loaded machine skipped finalists a quiet one tried). On a quiet machine it runs at about the
    pace of the wall clock.
    """
    import torch

    return time.process_time() / max(1, torch.get_num_threads())


def measure(candidate: Candidate, fit_images: Sequence[ImageInput], validation: ValidationSet, seed: int, stage: str,
            test: TestSet | None = None) -> CandidateResult:
    """Fit on ``fit_images``, score the validation set; a candidate that fails becomes a note."""
    result = CandidateResult(candidate.label, stage, len(fit_images))
    try:
        det = candidate.build(random_state=seed)  # each part of a wrapped spec takes the settings it has
        t0 = work_clock()
        det.fit(list(fit_images))
        t1 = work_clock()
        scores, maps = det.score(validation.images)
        t2 = work_clock()
    except (DefectLensError, ValueError, RuntimeError, MemoryError) as exc:
        result.note = f"failed: {str(exc).splitlines()[0][:120]}"
        return result
    result.fit_s = t1 - t0
    result.ms_per_image = 1000.0 * (t2 - t1) / len(validation.images)
    local, logical = validation.local, validation.logical
    result.image_auroc = image_auroc(validation.labels[local], scores[local])
    result.aupro = aupro(validation.masks_at(maps.shape[1:])[local], maps[local])
    if validation.labels[logical].any():
        result.logical_auroc = image_auroc(validation.labels[logical], scores[logical])
    if test is not None:
        result.test_auroc = image_auroc(test.labels, det.score(test.images)[0])
    return result


def measure_splits(candidate: Candidate, splits: Sequence[Split], n_images: int, seed: int, stage: str,
                   test: TestSet | None = None, known: CandidateResult | None = None) -> CandidateResult:
    """``measure`` on every split, each fitted on up to ``n_images`` of its own fit pool; the figures
    are the means over the splits (the real test AUROC, for the benchmark, only on the first).
    ``known``: the candidate already measured so on the first split (the screen, when the final
    stage fits no more images than it did), not measured again."""
    runs = [known] if known is not None else []
    for k, split in enumerate(splits[len(runs):], start=len(runs)):
        runs.append(measure(candidate, spread(split.fit_pool, n_images), split.validation, seed, stage, test if k == 0 else None))
        if runs[-1].note:  # failed
            return runs[-1]
    mean = lambda name: _mean([getattr(r, name) for r in runs])  # noqa: E731
    return CandidateResult(candidate.label, stage, runs[0].n_fit, mean("image_auroc"), mean("aupro"), mean("fit_s"), mean("ms_per_image"),
                           mean("logical_auroc"), runs[0].test_auroc)


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if _finite(v)]
    return float(np.mean(finite)) if finite else None


def _finite(v: float | None) -> bool:
    return v is not None and not math.isnan(v)


def selection_score(r: CandidateResult) -> float | None:
    """The mean of synthetic image AUROC and AUPRO (image AUROC alone where AUPRO is missing).

    Image AUROC rests on a few dozen held-out good images and is noisy; AUPRO integrates the pixel
    evidence of every synthetic defect. Ranked by image AUROC alone, the choice missed the real best
    on AITEX (picked PaDiM 0.78 over tiled PaDiM 0.88, which led on AUPRO by 0.10); the mean picks
    the same as before on bottle, Magnetic Tile and DeepPCB and the real best on AITEX.
    """
    if not _finite(r.image_auroc):
        return None
    return (r.image_auroc + r.aupro) / 2.0 if _finite(r.aupro) else r.image_auroc


def rank(results: Sequence[CandidateResult]) -> list[CandidateResult]:
    """Best first by selection score; among those within SCORE_TIE of the best, the fastest."""
    scored = [(selection_score(r), r) for r in results]
    scored = [(v, r) for v, r in scored if v is not None]
    if not scored:
        return []
    top = max(v for v, _ in scored)
    head = sorted((r for v, r in scored if v >= top - SCORE_TIE), key=lambda r: (r.ms_per_image or 0.0, r.fit_s or 0.0))
    rest = [r for v, r in sorted(scored, key=lambda vr: -vr[0]) if r not in head]
    return head + rest


def _try_global_term(ranked: list[CandidateResult], pool: list[Candidate], splits: list[Split], seed: int, start: float,
                     budget_s: float, results: list[CandidateResult], say: Callable[[str], None],
                     test: TestSet | None) -> tuple[list[CandidateResult], list[Candidate]]:
    """The winner with the global term (detectors.global_term) added, kept if that raises the
    selection score by more than a tie, or keeps it within a tie and raises the logical-defect
    AUROC by LOGICAL_GAIN: local synthetic defects seldom reward the term, logical ones are what it is for."""
    if not ranked or selection_score(ranked[0]) is None:
        return ranked, pool
    best = ranked[0]
    base = next(c for c in pool if c.label == best.label)
    if ":" in base.spec or not issubclass(detector_class(base.spec), FeatureDetector):
        return ranked, pool
    used = splits if best.stage == "final" else splits[:1]
    estimate = ((best.fit_s or 0.0) * 1.2 + (best.ms_per_image or 0.0) * len(splits[0].validation.images) / 1000.0) * len(used)
    label = f"{base.label}+global"
    if work_clock() - start + estimate > budget_s:
        results.append(CandidateResult(label, "skipped", best.n_fit, note="over the time budget"))
        return ranked, pool
    say(f"selection: {label} (the winner with a global term) on {best.n_fit} images")
    candidate = Candidate(label, f"global:{base.spec}", dict(base.params))
    r = measure_splits(candidate, used, best.n_fit, seed, best.stage, test)
    results.append(r)
    if selection_score(r) is None:
        return ranked, pool
    gain = selection_score(r) - selection_score(best)
    logical = f"logical-defect AUROC {format_figure(best.logical_auroc)} -> {format_figure(r.logical_auroc)}"
    if gain > SCORE_TIE:
        r.note = f"global term kept: it raised the synthetic score ({logical})"
    elif gain >= -SCORE_TIE and _finite(r.logical_auroc) and _finite(best.logical_auroc) and r.logical_auroc >= best.logical_auroc + LOGICAL_GAIN:
        r.note = f"global term kept: {logical} at an equal synthetic score"
    else:
        r.note = f"global term not kept: synthetic score {gain:+.3f}, {logical}"
        return ranked, pool
    return [r, *ranked], [*pool, candidate]


def select_detector(
    images: Sequence[ImageInput],
    *,
    backbone: str = "mobilenet_v2",
    weights: str | None = None,
    image_size: ModelSize = 256,
    budget_s: float = 300.0,
    screen_images: int = 40,
    final_images: int = 120,
    finalists: int = 3,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    pool: Sequence[Candidate] | None = None,
    progress: Callable[[str], None] | None = None,
    test: TestSet | None = None,
) -> Selection:
    """Choose a detector configuration for these good images (see the module docstring).

    ``images`` are good training images only; a share of them is held out for validation and
    never fits a candidate measured on it. Returns the Selection; build the chosen detector with
    ``selection.chosen.build()`` and fit it on all the images. ``test`` (real labelled images)
    is for the selection benchmark only: finalists are also scored on it, and it changes nothing
    of the choice.
    """
    say = progress or (lambda _msg: None)
    start = work_clock()
    images = list(images)
    pool = list(pool) if pool is not None else candidates(images, backbone, image_size, weights)
    if not pool:
        raise DefectLensError("no candidate detectors to choose among")
    if len(images) < MIN_IMAGES:
        return Selection(pool[0], [], len(images), 0, 0, seed, budget_s, 0.0,
                         f"only {len(images)} good images (selection needs {MIN_IMAGES}+): the first candidate, {pool[0].label}, is used")
    splits = held_out_splits(images, heldout_fraction, seed)
    first = splits[0]
    n_held = sum(int((s.validation.labels == 0).sum()) for s in splits)
    n_syn = sum(int(s.validation.labels[s.validation.local].sum()) for s in splits)
    say(f"selection: synthetic defects made from {n_held} held-out good images" + (f" in {len(splits)} disjoint shares" if len(splits) > 1 else ""))

    results: list[CandidateResult] = []
    n_screen = min(screen_images, len(first.fit_pool))
    for c in pool:
        if work_clock() - start > budget_s and results:
            results.append(CandidateResult(c.label, "skipped", 0, note="over the time budget"))
            continue
        say(f"selection: screening {c.label} on {n_screen} images")
        results.append(measure(c, spread(first.fit_pool, n_screen), first.validation, seed, "screen"))
        say(f"  synthetic AUROC {format_figure(results[-1].image_auroc)}, AUPRO {format_figure(results[-1].aupro)} {results[-1].note}")

    n_final = min(final_images, len(first.fit_pool))
    ranked = rank(results)
    if (n_final > n_screen or len(splits) > 1 or test is not None) and ranked:
        by_label = {c.label: c for c in pool}
        for r in ranked[:finalists]:
            known = r if n_final == r.n_fit and test is None else None  # its first share is measured already
            per_split = (r.fit_s or 0.0) * n_final / n_screen + (r.ms_per_image or 0.0) * len(first.validation.images) / 1000.0
            estimate = per_split * (len(splits) - (known is not None))
            if r is not ranked[0] and work_clock() - start + estimate > budget_s:
                results.append(CandidateResult(r.label, "skipped", n_final, note=f"final measurement would take ~{estimate:.0f} s, over the budget"))
                continue
            say(f"selection: finalist {r.label} on {n_final} images" + (f", {len(splits)} held-out shares" if len(splits) > 1 else ""))
            results.append(measure_splits(by_label[r.label], splits, n_final, seed, "final", test, known))
            say(f"  synthetic AUROC {format_figure(results[-1].image_auroc)}, AUPRO {format_figure(results[-1].aupro)} {results[-1].note}")
        finals = [r for r in results if r.stage == "final"]
        ranked = rank(finals) or ranked
    ranked, pool = _try_global_term(ranked, pool, splits, seed, start, budget_s, results, say, test)
    if not ranked:
        return Selection(pool[0], results, len(first.fit_pool), n_held, n_syn, seed, budget_s, work_clock() - start,
                         f"no candidate could be measured: the first, {pool[0].label}, is used")
    best = ranked[0]
    chosen = next(c for c in pool if c.label == best.label)
    shares = f", means over {len(splits)} held-out shares" if best.stage == "final" and len(splits) > 1 else ""
    reason = (f"best synthetic score {format_figure(selection_score(best))} (mean of image AUROC {format_figure(best.image_auroc)} "
              f"and AUPRO {format_figure(best.aupro)}) on {best.n_fit} fit images{shares}")
    if len(ranked) > 1 and selection_score(ranked[1]) >= selection_score(best) - SCORE_TIE:
        reason += f"; tied with {ranked[1].label}, and faster"
    return Selection(chosen, results, len(first.fit_pool), n_held, n_syn, seed, budget_s, work_clock() - start, reason, len(splits))


__all__ = [
    "Candidate",
    "CandidateResult",
    "Selection",
    "TestSet",
    "ValidationSet",
    "candidates",
    "rank",
    "select_detector",
    "format_figure",
    "geometry_for",
    "tiling_for",
]
