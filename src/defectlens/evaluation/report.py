"""The evaluation report an engineer signs a model off with: Markdown and one self-contained
HTML page (figures inlined, no network, opens from a USB stick on the line PC).

Sections: summary, calibration (the threshold table: what each rule would cost), ROC and PR
curves, score histograms with the threshold, confusion matrix, per-defect-type table, pixel
metrics, the worst-judged images with their heat maps, timings.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jinja2 import Environment, select_autoescape
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_curve

from defectlens._version import __version__
from defectlens.bundle import Bundle
from defectlens.calibration.record import Calibration, guarantee_sentence
from defectlens.data.defects import contact_sheet, resize_longest, synthesize
from defectlens.data.images import load_rgb, resize_rgb, spread
from defectlens.errors import ImageError
from defectlens.evaluation.evaluate import Evaluation, fmt, load_mask
from defectlens.inference.overlay import colourise

SECTIONS = ("summary", "selection", "synthetic", "calibration", "tradeoff", "curves", "histogram", "confusion", "per-type", "pixel", "errors", "timings")
TITLES = {"summary": "Summary", "selection": "How the detector was chosen (synthetic defects: estimates)",
          "synthetic": "Synthetic defects made from the training images (what selection is measured on)",
          "calibration": "Calibration",
          "tradeoff": "Lower thresholds and what they buy (recall on synthetic defects: an estimate)", "curves": "ROC and precision-recall curves",
          "histogram": "Score distributions", "confusion": "Confusion matrix", "per-type": "Per defect type",
          "pixel": "Pixel-level metrics", "errors": "Error analysis: worst-judged images", "timings": "Timings"}


@dataclass
class Figures:
    """PNG bytes by name."""

    png: dict[str, bytes]

    def data_uri(self, name: str) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png[name]).decode()


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _curves(ev: Evaluation) -> bytes:
    fig = Figure(figsize=(9, 3.8))
    roc_ax, pr_ax = fig.subplots(1, 2)
    labels, scores = ev.labels, ev.scores
    if labels.min() != labels.max():
        fpr, tpr, _ = roc_curve(labels, scores)
        roc_ax.plot(fpr, tpr, lw=2, label=f"AUROC {fmt(ev.metrics['image_auroc'])}")
        precision, recall, _ = precision_recall_curve(labels, scores)
        pr_ax.plot(recall, precision, lw=2, label=f"AUPR {fmt(ev.metrics['image_aupr'])}")
        if ev.threshold is not None:
            m = ev.metrics
            roc_ax.plot([m["frr"]], [m["recall"]], "o", color="crimson", label="model threshold")
            caught = m["n_defect"] - m["escapes"]
            flagged = caught + m["false_rejects"]
            pr_ax.plot([m["recall"]], [caught / flagged if flagged else 1.0], "o", color="crimson", label="model threshold")
    roc_ax.plot([0, 1], [0, 1], ls=":", color="grey")
    roc_ax.set(xlabel="false-reject rate (good called defect)", ylabel="recall (defects caught)", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    pr_ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    for ax in (roc_ax, pr_ax):
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    return _png(fig)


def _histogram(ev: Evaluation, cal: Calibration | None) -> bytes:
    """Test scores; beside them, what the threshold was set from: the good calibration scores and
    the synthetic defects made from them (an estimate of recall, not real defects)."""
    side = cal is not None and bool(cal.synthetic_scores)
    fig = Figure(figsize=(9, 3.6) if not side else (12, 3.6))
    axes = fig.subplots(1, 2 if side else 1, squeeze=False)[0]
    ax = axes[0]
    bins = np.histogram_bin_edges(ev.scores, bins=40)
    ax.hist(ev.scores[ev.labels == 0], bins=bins, alpha=0.6, color="seagreen", label=f"good ({int((ev.labels == 0).sum())})")
    types = sorted({t for t, lab in zip(ev.types, ev.labels, strict=True) if lab})
    if types:
        stacks = [ev.scores[np.array([t == u for t in ev.types])] for u in types]
        ax.hist(stacks, bins=bins, stacked=True, alpha=0.6, label=[f"{u} ({len(s)})" for u, s in zip(types, stacks, strict=True)])
    if ev.threshold is not None:
        ax.axvline(ev.threshold, color="crimson", lw=2, ls="--", label=f"threshold {ev.threshold:.3f}")
    ax.set(xlabel="anomaly score", ylabel="images", title="Scores of good and defective test images")
    ax.legend(fontsize=8)
    if side:
        ax = axes[1]
        good, syn = np.asarray(cal.good_scores), np.asarray(cal.synthetic_scores)
        bins = np.histogram_bin_edges(np.r_[good, syn], bins=30)
        ax.hist(good, bins=bins, alpha=0.6, color="seagreen", label=f"good, calibration ({good.size})")
        ax.hist(syn, bins=bins, alpha=0.6, color="darkorange", label=f"synthetic defects ({syn.size}; estimate)")
        ax.axvline(cal.image_threshold, color="crimson", lw=2, ls="--", label=f"threshold {cal.image_threshold:.3f}")
        ax.set(xlabel="anomaly score", title="What the threshold was set from")
        ax.legend(fontsize=8)
    return _png(fig)


def _confusion(ev: Evaluation) -> bytes | None:
    if ev.threshold is None:
        return None
    m = ev.metrics
    cells = np.array([[m["n_good"] - m["false_rejects"], m["false_rejects"]], [m["escapes"], m["n_defect"] - m["escapes"]]])
    fig = Figure(figsize=(3.8, 3.4))
    ax = fig.subplots()
    ax.imshow(cells, cmap="Blues")
    for (r, c), v in np.ndenumerate(cells):
        ax.text(c, r, str(v), ha="center", va="center", fontsize=14, color="black" if v < cells.max() / 2 else "white")
    ax.set_xticks([0, 1], ["called good", "called defect"])
    ax.set_yticks([0, 1], ["good", "defect"])
    ax.set_title("at the model threshold")
    return _png(fig)


def _gallery_image(item, pixel_threshold: float | None, size: int) -> bytes:
    rgb = resize_rgb(load_rgb(item.sample.path), size)
    base = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    amap = item.anomaly_map if item.anomaly_map.shape == (size, size) else np.asarray(Image.fromarray(item.anomaly_map).resize((size, size)))
    heat = colourise(amap, None if pixel_threshold is None else 2.0 * pixel_threshold)
    canvas = Image.new("RGB", (2 * size, size))
    canvas.paste(Image.fromarray(base), (0, 0))
    blended = Image.fromarray((base * 0.5 + heat * 0.5).astype(np.uint8))
    if item.sample.mask_path is not None:  # outline the true defect so misses are visible
        mask = load_mask(item.sample.mask_path, size)
        edge = mask & ~ndimage.binary_erosion(mask)
        arr = np.asarray(blended).copy()
        arr[edge] = (255, 255, 255)
        blended = Image.fromarray(arr)
    canvas.paste(blended, (size, 0))
    ImageDraw.Draw(canvas).rectangle((0, 0, 2 * size - 1, size - 1), outline=(80, 80, 80))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def build_figures(ev: Evaluation, bundle: Bundle, thumb: int = 192) -> Figures:
    png = {"curves": _curves(ev), "histogram": _histogram(ev, bundle.calibration)}
    confusion = _confusion(ev)
    if confusion is not None:
        png["confusion"] = confusion
    pixel_threshold = bundle.calibration.pixel_threshold if bundle.calibration else None
    for i, item in enumerate(ev.gallery):
        png[f"gallery_{i}"] = _gallery_image(item, pixel_threshold, thumb)
    synthetic = _synthetic_sheet(bundle)
    if synthetic is not None:
        png["synthetic"] = synthetic
    return Figures(png)


def _synthetic_sheet(bundle: Bundle, n: int = 8) -> bytes | None:
    """A few of the synthetic defects a model is chosen (and its recall estimated) on, made from
    its own training images, so a reader can judge whether they resemble the part's real ones."""
    files = [Path(f) for f in bundle.metadata.get("train_files", [])]
    files = [f for f in spread(files, 4) if f.is_file()]
    if not files:
        return None
    try:
        goods = [resize_longest(load_rgb(f), 256) for f in files]
    except ImageError:
        return None
    buf = io.BytesIO()
    contact_sheet(synthesize(goods, n, seed=0), tile=160).save(buf, format="PNG")
    return buf.getvalue()


def _rows(ev: Evaluation, bundle: Bundle) -> dict[str, list[list[str]]]:
    m = ev.metrics
    cal = bundle.calibration
    det = bundle.detector
    summary = [["model", bundle.metadata.get("name", det.name) + f" ({det.name}, {getattr(det, 'backbone', '-')})"],
               ["model checksum", bundle.checksum[:16]], ["data set", ev.dataset],
               ["test images", f"{m['n_good']} good, {m['n_defect']} defective"
                + (f" ({ev.excluded} left out: used for calibration)" if ev.excluded else "")],
               ["image AUROC", fmt(m["image_auroc"])], ["image AUPR", fmt(m["image_aupr"])],
               ["F1-max (at score)", f"{fmt(m['f1_max'])} ({fmt(m['f1_threshold'])})"]]
    if ev.threshold is not None:
        rule = " ".join([cal.strategy] + [f"{k}={v}" for k, v in cal.params.items()])
        summary += [["threshold", f"{ev.threshold:.4f} ({rule})"],
                    ["accuracy at threshold", fmt(m["accuracy_at_threshold"])],
                    ["false rejects", f"{m['false_rejects']} of {m['n_good']} ({100 * m['frr']:.1f} %)"],
                    ["escapes", f"{m['escapes']} of {m['n_defect']} (recall {100 * m['recall']:.1f} %)"
                     if m["n_defect"] else "n/a"]]
    calibration = []
    if cal is not None:
        for r in cal.table:
            calibration.append([("&#9654; " if r["chosen"] else "") + html.escape(r["rule"]), f"{r['threshold']:.4f}",
                                "n/a" if r.get("precision") is None else f"{100 * r['precision']:.1f} %",
                                "n/a" if r.get("recall") is None else f"{100 * r['recall']:.1f} %",
                                str(r["false_rejects"]), "n/a" if r.get("escapes") is None else str(r["escapes"]),
                                f"{100 * r['expected_frr']:.2f} %",
                                "n/a" if r.get("guaranteed_frr") is None else f"≤ {100 * r['guaranteed_frr']:.1f} %",
                                "n/a" if r.get("synthetic_recall") is None else f"{100 * r['synthetic_recall']:.1f} % (estimate)"])
    tradeoff = [[("&#9654; " if r["chosen"] else "") + f"{r['threshold']:.4f}", f"≤ {100 * r['guaranteed_frr']:.1f} %",
                 f"{100 * r['estimated_frr']:.1f} %", "n/a" if r.get("synthetic_recall") is None else f"{100 * r['synthetic_recall']:.1f} %"]
                for r in (cal.tradeoff if cal is not None and cal.synthetic_scores else [])]
    per_type = [[t, str(d["n"]), fmt(d["auroc"]), fmt(d.get("recall_at_threshold")), fmt(d["mean_score"])] for t, d in sorted(ev.per_type.items())]
    pixel = [["pixel AUROC", fmt(m["pixel_auroc"])], ["AUPRO (FPR <= 0.3)", fmt(m["aupro"])],
             ["IoU at pixel threshold", fmt(m.get("pixel_iou"))], ["Dice at pixel threshold", fmt(m.get("pixel_dice"))],
             ["pixel threshold", fmt(m.get("pixel_threshold"))]]
    timings = [["images scored", str(len(ev.scores))], ["scoring time", f"{ev.timings['score_s']:.2f} s"],
               ["throughput", f"{ev.timings['images_per_s']:.1f} images/s"], ["per image", f"{ev.timings['ms_per_image']:.1f} ms"]]
    selection = bundle.metadata.get("selection") or {}
    chosen = selection.get("chosen", {}).get("label")
    picked = [r for r in selection.get("results", []) if r["label"] == chosen and r["stage"] != "skipped"]
    picked_row = max(picked, key=lambda r: r["n_fit"]) if picked else None
    choice = [[("&#9654; " if r is picked_row else "") + html.escape(r["label"]), r["stage"], str(r["n_fit"]), fmt(r["image_auroc"]),
               fmt(r["aupro"]), fmt(r["fit_s"]), fmt(r["ms_per_image"]), r["note"]] for r in selection.get("results", [])]
    return {"summary": summary, "selection": choice, "calibration": calibration, "tradeoff": tradeoff, "per-type": per_type, "pixel": pixel, "timings": timings}


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>DefectLens evaluation: {{ name }}</title>
<style>
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:1.8em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f0f0f0}img{max-width:100%}.gallery{display:grid;grid-template-columns:repeat(2,1fr);gap:1em}
figure{margin:0}figcaption{font-size:.85em;color:#444}.note{color:#555;font-size:.9em}
</style></head><body>
<h1>DefectLens evaluation: {{ name }}</h1>
<p class="note">DefectLens {{ version }} &middot; {{ machine }}</p>
{% for key in sections %}<section id="{{ key }}"><h2>{{ titles[key] }}</h2>
{% if key in tables and tables[key] %}<table>{% if key in heads %}<tr>{% for h in heads[key] %}<th>{{ h }}</th>{% endfor %}</tr>{% endif %}
{% for row in tables[key] %}<tr>{% for cell in row %}
<td>{{ cell | safe if key in ('calibration', 'selection', 'tradeoff') and loop.first else cell }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% if key == 'calibration' %}<p class="note">{{ calibration_note }}</p>{% endif %}
{% if key in images %}<img alt="{{ titles[key] }}" src="{{ images[key] }}">{% endif %}
{% if key == 'errors' %}<p class="note">Left: the image. Right: heat map (colour scale fixed by the calibrated pixel threshold),
true defect outlined in white.</p>
<div class="gallery">{% for g in gallery %}
<figure><img alt="{{ g.caption }}" src="{{ g.src }}"><figcaption>{{ g.caption }}</figcaption></figure>{% endfor %}</div>
{% if not gallery %}<p>No images to show.</p>{% endif %}{% endif %}
{% if key in tables and not tables[key] and key not in images and key != 'errors' %}<p>Not available for this model or data set.</p>{% endif %}
</section>
{% endfor %}</body></html>
"""

HEADS = {"calibration": ["rule", "threshold", "precision", "recall", "false rejects", "escapes", "estimated FRR (tail model)",
                         "guaranteed FRR", "synthetic recall"],
         "per-type": ["defect type", "n", "AUROC", "recall at threshold", "mean score"],
         "tradeoff": ["threshold", "guaranteed FRR", "estimated FRR (tail model)", "synthetic recall (estimate)"],
         "selection": ["candidate", "stage", "fit images", "synthetic image AUROC", "synthetic AUPRO", "fit s", "ms/image", "note"]}


def write_report(ev: Evaluation, bundle: Bundle, out_dir: Path, machine: str = "") -> tuple[Path, Path]:
    """Write report.html (self-contained) and report.md with figures/ beside it."""
    out_dir = Path(out_dir)
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    figs = build_figures(ev, bundle)
    for name, data in figs.png.items():
        (figures_dir / f"{name}.png").write_bytes(data)
    tables = _rows(ev, bundle)
    cal = bundle.calibration
    note = "The model has no calibrated threshold." if cal is None else (
        f"Chosen rule marked. Calibrated on {cal.n_good} good" + (f" and {cal.n_defect} defective" if cal.n_defect else "")
        + f" images ({cal.source}). " + (f"{guarantee_sentence(cal.guarantee)}. " if cal.guarantee else "")
        + f"Estimated false-reject rate on new good parts (tail model): {100 * cal.expected_frr['expected']:.2f} % "
        f"(95 % interval {100 * cal.expected_frr['ci95'][0]:.2f}-{100 * cal.expected_frr['ci95'][1]:.2f} %)."
        + "".join(f" Note: {n}." for n in cal.notes)
        + (f" Synthetic recall is measured on {len(cal.synthetic_scores)} synthetic defects made from the good calibration images: "
           "an estimate, not real defects." if cal.synthetic_scores else ""))
    captions = [f"{g.kind}: {g.sample.defect_type}/{g.sample.path.name}, score {g.score:.4f}" for g in ev.gallery]
    images = {k: figs.data_uri(k) for k in ("synthetic", "curves", "histogram", "confusion") if k in figs.png}
    env = Environment(autoescape=select_autoescape(default=True))
    page = env.from_string(_HTML).render(
        name=ev.dataset, version=__version__, machine=machine, sections=SECTIONS, titles=TITLES, tables=tables, heads=HEADS,
        images=images, calibration_note=note,
        gallery=[{"src": figs.data_uri(f"gallery_{i}"), "caption": c} for i, c in enumerate(captions)])
    html_path = out_dir / "report.html"
    html_path.write_text(page)
    md_path = out_dir / "report.md"
    md_path.write_text(_markdown(ev, tables, note, captions, machine, set(figs.png)))
    return html_path, md_path


def _md_table(rows: list[list[str]], head: list[str] | None = None) -> str:
    if not rows:
        return "Not available for this model or data set.\n"
    head = head or ["", ""]
    clean = [[c.replace("&#9654; ", "**>** ").replace("|", "\\|") for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in clean]) + "\n"


def _markdown(ev: Evaluation, tables: dict, note: str, captions: list[str], machine: str, figures: set[str]) -> str:
    parts = [f"# DefectLens evaluation: {ev.dataset}\n", f"DefectLens {__version__} · {machine}\n"]
    for key in SECTIONS:
        parts.append(f"\n## {TITLES[key]}\n")
        if key in tables:
            parts.append(_md_table(tables[key], HEADS.get(key, ["", ""])))
        if key == "calibration":
            parts.append(f"\n{note}\n")
        if key in figures:
            parts.append(f"\n![{TITLES[key]}](figures/{key}.png)\n")
        if key == "errors":
            parts += [f"\n![{c}](figures/gallery_{i}.png)\n\n{c}\n" for i, c in enumerate(captions)] or ["No images to show.\n"]
    return "".join(parts)
