"""The calibration a bundle carries: thresholds, score normalisation and the evidence for them.

A raw anomaly score is a distance in feature space, different for every model and product. The
record turns it into a verdict (threshold), a normalised score in [0, 1] with 0.5 exactly at
the threshold (a logistic in units of the good scores' spread, so 0.5 means "at the limit"
for every model), and a confidence. It also keeps what the threshold was chosen from, so a
report, the dashboard's histogram or a re-calibration can show and reuse it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from scipy.special import expit

from defectlens.calibration.strategies import frr_upper, images_needed, robust_std
from defectlens.calibration.symmetry import asymmetry, asymmetry_torch
from defectlens.errors import DefectLensError

SPREAD_CONFIDENCE = 0.9  # the confidence at which fit says how far one calibration set's FRR may stray from the average


@dataclass(frozen=True)
class DecisionRule:
    """The image decision, written once for NumPy arrays and torch tensors alike (``xp`` is the
    array module), so the ONNX graph runs this very rule and a consumer of the graph's outputs
    gets the verdicts the Inspector gives.

    The decision score is the appearance score, plus the symmetry term when calibration chose it
    (``symmetry_weight`` x the map's largest mirror difference). A part is defective when its
    decision score lies strictly above the threshold (a score on it passes). The normalised score
    is a logistic in units of the good scores' spread, 0.5 at the threshold, written with tanh so
    it never overflows.
    """

    threshold: float
    scale: float
    symmetry_weight: float = 0.0
    symmetry_axes: str = ""

    def combine(self, scores, maps):
        if not self.symmetry_axes:
            return scores
        term = asymmetry_torch(maps, self.symmetry_axes) if isinstance(maps, torch.Tensor) else asymmetry(maps, self.symmetry_axes)
        return scores + self.symmetry_weight * term

    def rejects(self, scores):
        return scores > self.threshold

    def normalise(self, scores, xp=np):
        return 0.5 * (1.0 + xp.tanh((scores - self.threshold) / (2.0 * self.scale)))


@dataclass
class Calibration:
    image_threshold: float
    pixel_threshold: float
    image_scale: float  # spread of good image scores: one unit of the normalised logistic
    pixel_scale: float
    strategy: str
    params: dict = field(default_factory=dict)
    source: str = "holdout"  # where the good scores came from: holdout, kfold-10, single-image-augmented
    n_good: int = 0
    n_defect: int = 0
    expected_frr: dict | None = None  # FrrEstimate.to_dict() at the image threshold
    pixel_expected_frr: dict | None = None  # share of good images with any masked pixel
    table: list[dict] = field(default_factory=list)  # what each rule's threshold would do
    per_type: dict[str, dict] = field(default_factory=dict)
    good_scores: list[float] = field(default_factory=list)
    good_map_max: list[float] = field(default_factory=list)  # kept so re-calibrating needs no images
    defect_scores: list[float] = field(default_factory=list)
    symmetry: dict | None = None  # {"axes", "weight", "auroc_appearance", "auroc_combined", "used"}
    files: list[str] = field(default_factory=list)  # images calibrated on (evaluation leaves them out)
    guarantee: dict | None = None  # strategies.Guarantee.to_dict(): what the threshold promises
    tradeoff: list[dict] = field(default_factory=list)  # lower thresholds: guaranteed / estimated FRR, synthetic recall
    synthetic_scores: list[float] = field(default_factory=list)  # synthetic defects made from the good calibration images
    synthetic_families: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a person should know about this threshold

    # -- scores --------------------------------------------------------------------------------
    def combine(self, scores: np.ndarray, maps: np.ndarray) -> np.ndarray:
        """The score thresholds apply to: appearance, plus symmetry break when calibration chose it."""
        return self.rule().combine(np.asarray(scores, dtype=np.float64), maps)

    def rule(self) -> DecisionRule:
        """The decision rule at this calibration's image threshold (see ``DecisionRule``)."""
        sym = self.symmetry if self.symmetry and self.symmetry.get("used") else None
        return DecisionRule(float(self.image_threshold), float(self.image_scale), float(sym["weight"]) if sym else 0.0, sym["axes"] if sym else "")

    def rejects(self, scores: float | np.ndarray) -> np.ndarray:
        """Which decision scores (see ``combine``) are defects."""
        return self.rule().rejects(np.asarray(scores, dtype=np.float64))

    def normalise(self, score: float | np.ndarray) -> float | np.ndarray:
        return self.rule().normalise(np.asarray(score, dtype=np.float64))

    def normalise_map(self, anomaly_map: np.ndarray) -> np.ndarray:
        return expit((np.asarray(anomaly_map, dtype=np.float32) - self.pixel_threshold) / self.pixel_scale).astype(np.float32)

    def confidence(self, score: float) -> float:
        """How far from the threshold the score lies: 0 at the threshold, towards 1 far from it."""
        return float(abs(2.0 * float(self.normalise(score)) - 1.0))

    # -- text ----------------------------------------------------------------------------------
    def describe(self) -> str:
        lines = [f"calibration: {self.strategy} {self.params} from {self.n_good} good"
                 + (f" and {self.n_defect} defective" if self.n_defect else "") + f" images ({self.source})",
                 f"  image threshold {self.image_threshold:.4f}   pixel threshold {self.pixel_threshold:.4f}"]
        if self.guarantee:
            lines.append(f"  {guarantee_sentence(self.guarantee)}")
        if self.expected_frr:
            e = self.expected_frr
            lines.append(f"  estimated false-reject rate (tail model): {100 * e['expected']:.2f} % "
                         f"(95 % interval {100 * e['ci95'][0]:.2f}-{100 * e['ci95'][1]:.2f} %; "
                         f"{e['observed_rejects']}/{e['n']} calibration images above the threshold)")
        lines += [f"  note: {n}" for n in self.notes]
        if self.table:
            lines.append(threshold_table_text(self.table))
        if self.tradeoff and self.synthetic_scores:
            lines.append(tradeoff_text(self.tradeoff, len(self.synthetic_scores)))
        if self.per_type:
            lines.append(f"  {'defect type':<22} {'n':>4} {'recall':>8}   thresholds that type alone would give: F1-max / recall target / zero FR")
            for name, d in sorted(self.per_type.items()):
                t = d["thresholds"]
                lines.append(f"  {name:<22} {d['n']:>4} {_pct(d['recall_at_threshold']):>8}   "
                             f"{t['f1']:.4f} / {t['target_recall']:.4f} / {t['zero_false_rejects']:.4f}")
        if self.symmetry:
            s = self.symmetry
            lines.append(f"  symmetry break ({s['axes']}): AUROC {s['auroc_appearance']:.4f} appearance only, "
                         f"{s['auroc_combined']:.4f} combined -> {'used' if s['used'] else 'not used'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        if "method" in data:  # records written before strategies existed (mean + k sigma only)
            scores = np.asarray(data.get("good_image_scores") or [data["image_threshold"]])
            data = {"image_threshold": data["image_threshold"], "pixel_threshold": data["pixel_threshold"],
                    "image_scale": robust_std(scores), "pixel_scale": 0.05 * abs(data["pixel_threshold"]) or 1.0,
                    "strategy": "k_sigma", "params": {"k_sigma": data.get("k_sigma", 3.0)},
                    "n_good": data.get("n_images", 0), "good_scores": list(scores)}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DefectLensError(f"calibration record has fields this version does not know: {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise DefectLensError(f"calibration record is not understood ({exc})") from None


def _pct(value: float) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f} %"


def _count(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def guarantee_sentence(g: dict) -> str:
    """e.g. '21 images: FRR <= 4.5 % guaranteed on average (...), <= 10 % for this calibration set
    with 90 % confidence; the 2 % target needs >= 49 images'.

    Where the target is met by the largest score alone (2 % from 49 to 98 images), it says so and
    from how many images a lower threshold keeps the target: the threshold then sits on one
    image, and recall below what the detector could reach is the price of the images' number,
    which the user can only act on if told.

    The average is over calibration sets, and one set of 20 images lands anywhere from about 0 to
    11 % (``strategies.frr_upper``): a user who reads only the average is surprised by a 9 % week
    (Magnetic Tile with 20 images went past 5 % in 4 of 10 draws), so the spread is said beside it.
    """
    kind = "on average" if g.get("confidence") is None else f"with {100 * g['confidence']:g} % confidence"
    text = f"{g['n']} images: FRR <= {100 * g['bound']:.2g} % guaranteed {kind} (for parts like the calibration images)"
    if g.get("confidence") is None:
        text += (f", <= {100 * frr_upper(int(g['rank']), int(g['n']), SPREAD_CONFIDENCE):.2g} % for this calibration set "
                 f"with {100 * SPREAD_CONFIDENCE:g} % confidence")
    if not g["achievable"]:
        text += f"; the {100 * g['target']:g} % target needs >= {g['images_needed']} images"
    elif int(g["rank"]) == 1:  # met, but by the largest score alone
        delta = None if g.get("confidence") is None else 1.0 - g["confidence"]
        text += (f"; only the largest score meets the {100 * g['target']:g} % target, so one image sets the threshold: "
                 f"a lower one needs >= {images_needed(g['target'], delta, rank=2)} images")
    return text


def tradeoff_text(rows: list[dict], n_synthetic: int) -> str:
    """Lower thresholds and what they buy; the recall is an estimate from synthetic defects."""
    lines = [f"  trade-off ({n_synthetic} synthetic defects; their recall is an estimate, not a measurement on real defects):",
             f"  {'threshold':>10} {'guaranteed FRR':>15} {'estimated FRR':>14} {'synthetic recall':>17}"]
    for r in rows:
        mark = "*" if r.get("chosen") else " "
        lines.append(f" {mark}{r['threshold']:>10.4f} {'<= ' + _pct(r['guaranteed_frr']):>15} {_pct(r['estimated_frr']):>14} "
                     f"{_pct(r['synthetic_recall']):>17}")
    return "\n".join(lines)


def threshold_table_text(rows: list[dict]) -> str:
    """The cost of each threshold choice, one line per rule: on the calibration images, what the
    data guarantee, and (where synthetic defects were made) the estimated recall."""
    synthetic = any(r.get("synthetic_recall") is not None for r in rows)
    head = (f"  {'rule':<30} {'threshold':>10} {'precision':>9} {'recall':>8} {'false rejects':>13} {'escapes':>7} {'FRR':>7}"
            f" {'FRR guaranteed':>14}" + (f" {'synthetic recall':>16}" if synthetic else ""))
    lines = [head]
    for r in rows:
        mark = "*" if r.get("chosen") else " "
        bound = r.get("guaranteed_frr")
        line = (f" {mark}{r['rule']:<30} {r['threshold']:>10.4f} {_pct(r.get('precision')):>9} {_pct(r.get('recall')):>8} "
                f"{_count(r.get('false_rejects')):>13} {_count(r.get('escapes')):>7} {_pct(r.get('frr')):>7}"
                f" {('<= ' + _pct(bound)) if bound is not None else 'n/a':>14}")
        if synthetic:
            line += f" {_pct(r.get('synthetic_recall')):>16}"
        lines.append(line)
    return "\n".join(lines)
