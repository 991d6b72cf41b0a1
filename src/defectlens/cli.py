"""`defectlens` command line: fit | calibrate | inspect | evaluate | export | benchmark | serve | loadtest | demo | synth.

Every user-caused failure prints one line `defectlens: error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from defectlens._version import __version__
from defectlens.calibration.calibrate import GOOD_ONLY, STRATEGIES
from defectlens.errors import DefectLensError
from defectlens.jsonutil import finite
from defectlens.workflows.fitting import SCHEMES

EXIT_USAGE = 2
DEMO_DATA_CANDIDATES = ("../shared/datasets/mvtec_ad/bottle", "shared/datasets/mvtec_ad/bottle")


def _add_model_options(p: argparse.ArgumentParser, default_detector: str = "patchcore") -> None:
    # Defaults come from the detector itself, so the CLI and the Python API never disagree.
    from defectlens.backbones import FEATURE_KINDS, available_backbones
    from defectlens.detectors import PaDiM, PatchCore, available_detectors
    from defectlens.detectors.patchcore import BANK_DTYPES, REDUCTIONS, SEARCHES

    d = PatchCore().get_params()
    n_features = PaDiM().get_params()["n_features"]
    choices = ["auto", *available_detectors()] if default_detector == "auto" else available_detectors()
    p.add_argument("--detector", default=default_detector, help=(
        f"detector to fit: {', '.join(choices)} (default: {default_detector})"
        + ("; auto tries several on held-out good images with synthetic defects and keeps the best" if default_detector == "auto" else "")))
    p.add_argument("--backbone", default=d["backbone"], help=f"feature backbone ({', '.join(available_backbones())}; default: {d['backbone']}); "
                   "several, comma-separated, fit an ensemble that averages their standardised maps")
    p.add_argument("--weights", default=None, help="local backbone weights file (default: the installed package's)")
    p.add_argument("--features", choices=FEATURE_KINDS, default=d["features"], help=(
        "what the backbone taps give: expanded (the tap blocks' wide expanded activations) or blocks (the block outputs before "
        f"them, as anomalib embeds; better on Magnetic Tile) (default: {d['features']})"))
    p.add_argument("--image-size", type=int, default=None, help=f"square input size in pixels (default: the detector's own; PatchCore {d['image_size']})")
    p.add_argument("--embed-dim", type=int, default=d["embed_dim"] or 0, help=f"patch embedding size; 0 keeps all channels (default: {d['embed_dim']})")
    p.add_argument("--reduction", choices=REDUCTIONS, default=d["reduction"], help=(
        f"PatchCore: how channels are reduced to --embed-dim: mean of adjacent channels, pca, or a random projection (default: {d['reduction']})"))
    p.add_argument("--bank-dtype", choices=BANK_DTYPES, default=d["bank_dtype"], help=(
        f"PatchCore: memory-bank precision; float16 halves it (default: {d['bank_dtype']})"))
    p.add_argument("--coreset-ratio", type=float, default=d["coreset_ratio"], help=f"PatchCore: share of patches kept (default: {d['coreset_ratio']})")
    p.add_argument("--coreset-global-max", type=int, default=d["coreset_global_max"], help=(
        "PatchCore: most patches chosen from in one coreset pass; above it each image is thinned first "
        f"(0: always one pass; default: {d['coreset_global_max']})"))
    p.add_argument("--search", choices=SEARCHES, default=d["search"], help=(
        f"PatchCore: nearest-neighbour index; ivf (approximate) for large memory banks (default: {d['search']})"))
    p.add_argument("--n-features", type=int, default=n_features, help=f"PaDiM: channels modelled per position (default: {n_features})")
    p.add_argument("--batch-size", type=int, default=None, help=f"images per forward pass (default: the detector's own; PatchCore {d['batch_size']})")
    p.add_argument("--seed", type=int, default=d["random_state"], help=f"random seed (default: {d['random_state']})")
    p.add_argument("--tile", type=int, default=0, metavar="SIZE", help=(
        "score high-resolution images in overlapping SIZE-pixel tiles at native resolution (small defects on large parts); "
        "--image-size then sets the size of the stitched map kept for evaluation"))
    p.add_argument("--tile-overlap", type=float, default=0.25, help="share of a tile overlapping its neighbour (default: 0.25)")
    p.add_argument("--tile-scale", type=float, default=1.0, help="resize factor before tiling, e.g. 0.5 for 4K images (default: 1)")


def _add_calibration_options(p: argparse.ArgumentParser, strategies: Sequence[str]) -> None:
    from defectlens.calibration import CalibrationSettings

    d = CalibrationSettings()
    p.add_argument("--strategy", choices=strategies, default=d.strategy, help=(
        f"threshold rule (default: {d.strategy}). Good images only: target_frr (conformal: the k-th largest good score, "
        "guaranteed to reject at most the target share of good parts; with too few images, the largest, and it says so), "
        "tail (the Gumbel tail model's quantile: an estimate that may sit above every good score), k_sigma (mean + k std), "
        "cost (the threshold with the least expected cost, recall estimated from synthetic defects). "
        "With labelled defects: f1, target_recall, zero_false_rejects"))
    p.add_argument("--target-frr", type=float, default=d.target_frr, help=f"false-reject rate to aim for (default: {d.target_frr})")
    p.add_argument("--confidence", type=float, default=d.confidence, help=(
        "target_frr: guarantee the rate with this probability for this calibration set (e.g. 0.9), instead of on average"))
    p.add_argument("--escape-cost", type=float, default=d.escape_cost, help=(
        f"cost rule: what one escaped defect costs, in false rejects (default: {d.escape_cost:g})"))
    p.add_argument("--defect-rate", type=float, default=d.defect_rate, help=(
        f"cost rule: share of defective parts expected on the line (default: {d.defect_rate:g})"))
    p.add_argument("--k-sigma", type=float, default=d.k_sigma, help=f"k for the k_sigma rule (default: {d.k_sigma})")
    p.add_argument("--target-recall", type=float, default=d.target_recall, help=f"defect recall to reach (default: {d.target_recall})")


def _settings(args: argparse.Namespace, symmetry: str | None = None):
    from defectlens.calibration import CalibrationSettings

    return CalibrationSettings(strategy=args.strategy, target_frr=args.target_frr, confidence=args.confidence, k_sigma=args.k_sigma,
                               escape_cost=args.escape_cost, defect_rate=args.defect_rate, target_recall=args.target_recall,
                               symmetry=symmetry, seed=getattr(args, "seed", 0))


def _make_detector(args: argparse.Namespace):
    """The chosen detector, wrapped in tiling at native resolution when --tile is given."""
    from defectlens.detectors import create_detector

    params = _detector_params(args)
    if "," in args.backbone:  # several backbones: an ensemble of the detector, one member each
        if args.weights:
            raise DefectLensError("--weights names one backbone's file; an ensemble of several backbones uses their installed weights")
        shared = {k: v for k, v in params.items() if k not in ("backbone", "image_size", "batch_size")}
        return create_detector("ensemble", detector=args.detector, backbones=args.backbone, detector_params=shared,
                               image_size=args.image_size or 256, batch_size=args.batch_size or 2, verbose=True)
    if not args.tile:
        return create_detector(args.detector, verbose=True, **params)
    params.pop("image_size", None)
    return create_detector("tiled", detector=args.detector, detector_params=params, tile_size=args.tile,
                           overlap=args.tile_overlap, scale=args.tile_scale, map_size=args.image_size or 512, verbose=True)


def _detector_params(args: argparse.Namespace) -> dict:
    """The options the chosen detector takes (each detector has its own settings)."""
    from defectlens.detectors import detector_class

    accepted = detector_class(args.detector)().get_params()
    return {k: v for k, v in _given_params(args).items() if k in accepted}


def _given_params(args: argparse.Namespace) -> dict:
    """Every model option from the command line; sizes left unset keep each detector's own."""
    given = {
        "backbone": args.backbone,
        "weights": args.weights,
        "features": args.features,
        "embed_dim": args.embed_dim or None,
        "reduction": args.reduction,
        "bank_dtype": args.bank_dtype,
        "coreset_ratio": args.coreset_ratio,
        "coreset_global_max": args.coreset_global_max or None,
        "search": args.search,
        "n_features": args.n_features,
        "random_state": args.seed,
    }
    given.update({k: v for k, v in (("image_size", args.image_size), ("batch_size", args.batch_size)) if v is not None})
    if args.tile:  # what a tiled detector of a comparison takes
        given.update(tile_size=args.tile, overlap=args.tile_overlap, scale=args.tile_scale)
    return given


def build_parser() -> argparse.ArgumentParser:
    from defectlens.batch.engines import ENGINES

    parser = argparse.ArgumentParser(prog="defectlens", description="Visual defect detection trained on good parts only.")
    parser.add_argument("--version", action="version", version=f"defectlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="fit a model on good images and save it", description=(
        "Fit a model on the good training images of DATA (MVTec layout, good/ + defect folders, or a folder of good images), "
        "calibrate its threshold on held-out good images, and save one model file."))
    p.add_argument("data", help="data set or category folder")
    p.add_argument("-o", "--output", required=True, help="model file to write (.dlens)")
    p.add_argument("--validation-fraction", type=float, default=0.1, help=(
        "good images held out to calibrate the threshold (default: 0.1; with 100+ images at least 30, "
        "while three quarters remain to fit on)"))
    p.add_argument("--scheme", choices=SCHEMES, default="auto", help=(
        "where unseen good scores come from: holdout, kfold (few images: k models score the images they did not see), "
        "single-image (one image, augmented); auto picks holdout with 10+ held-out images, else kfold (default: auto)"))
    p.add_argument("--folds", type=int, default=10, help="folds for kfold calibration (default: 10)")
    p.add_argument("--budget", type=float, default=300.0, metavar="SECONDS", help=(
        "--detector auto: time for trying candidates before the chosen one is fitted (default: 300)"))
    _add_calibration_options(p, GOOD_ONLY)
    _add_model_options(p, default_detector="auto")

    p = sub.add_parser("calibrate", help="re-calibrate a model's threshold without refitting", description=(
        "Choose a model's thresholds again. Without DATA, good-only rules reuse the good scores stored in the model. "
        "With DATA, its good images the model was not fitted on are scored; labelled rules (f1, target_recall, "
        "zero_false_rejects) also use a share of its labelled test images, which evaluation then leaves out. "
        "Labelled images also teach the model to name defect types."))
    p.add_argument("model", help="model file (.dlens); rewritten in place unless --output is given")
    p.add_argument("data", nargs="?", default=None, help="data set or category folder (optional for good-only rules)")
    p.add_argument("-o", "--output", default=None, help="write the re-calibrated model here instead")
    p.add_argument("--labelled-fraction", type=float, default=0.5, help=(
        "share of the labelled test images (per defect type) used to calibrate; the rest stay for evaluation (default: 0.5)"))
    p.add_argument("--symmetry", choices=("lr", "tb", "lrtb"), default=None, help=(
        "for symmetric parts: try adding a left-right / top-bottom asymmetry score; kept only if it raises AUROC on the labelled images"))
    p.add_argument("--seed", type=int, default=0, help="seed for the labelled split (default: 0)")
    _add_calibration_options(p, STRATEGIES)

    p = sub.add_parser("inspect", help="inspect images with a model", description=(
        "Inspect images or folders of images; print one JSON record per image, and with --out write results.jsonl, "
        "summary.csv, stats.json (score statistics per verdict, predicted type and folder) and heat-map overlays."))
    p.add_argument("model", help="model file (.dlens, or one exported to .onnx)")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", default=None, help="folder for results.jsonl and overlays/")
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay PNGs")
    p.add_argument("--save-maps", action="store_true", help="also write each anomaly map as maps/<name>.npy (float16, image size)")
    p.add_argument("--mask", choices=("threshold", "otsu"), default="threshold", help=(
        "how defect masks are cut: the calibrated pixel threshold, or Otsu on each map (never below the threshold) (default: threshold)"))
    p.add_argument("--engine", choices=ENGINES, default="local", help=(
        "local: this process (default); ray: Ray workers on this machine, or on the cluster at --address"))
    p.add_argument("--address", default=None, help="Ray cluster address, e.g. ray://head:10001 (default: a local Ray)")
    p.add_argument("--workers", type=int, default=0, help="Ray workers (default: one per CPU)")
    p.add_argument("--fresh", action="store_true", help="start --out over instead of resuming what it holds")
    p.add_argument("--parquet", action="store_true", help=(
        "also write the records as a Parquet data set, results.parquet/ under --out (one table for pandas, DuckDB, Spark)"))
    p.add_argument("--db", default=None, help="also record every inspection in this history database (SQLAlchemy URL, as for serve)")

    p = sub.add_parser("evaluate", help="measure a model on a labelled test split", description=(
        "Score the test split of DATA and print image AUROC, AUPR, F1-max, pixel AUROC and AUPRO."))
    p.add_argument("model", help="model file (.dlens, or one exported to .onnx)")
    p.add_argument("data", help="data set or category folder with test images")
    p.add_argument("--out", default=None, help="JSON file for metrics and per-image records (default: evaluation_<name>.json)")
    p.add_argument("--report", default=None, metavar="DIR", help="also write report.html (self-contained) and report.md with figures here")

    p = sub.add_parser("benchmark", help="measure speed, memory and accuracy; compare detectors", description=(
        "On one category: fit on all training images, then print fit seconds, batched images/s, single-image latency, "
        "per-stage times, peak memory and accuracy. With --detectors/--backbones, or a folder of several categories: "
        "fit every combination on every category found and write one comparison table (Markdown and JSON)."))
    p.add_argument("data", help="category folder, or a root holding several categories")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file (single-category mode)")
    p.add_argument("--detectors", default=None, help=(
        "comma-separated detectors to compare (e.g. patchcore,padim); a wrapper names what it wraps: "
        "tiled:padim, ensemble:padim (default: patchcore inside)"))
    p.add_argument("--backbones", default=None, help="comma-separated backbones to compare (default: --backbone)")
    p.add_argument("--out", default="benchmark_results", help="folder for benchmark.md and benchmark.json (comparison mode)")
    p.add_argument("--scaling", action="store_true", help=(
        "measure how fit and inspect grow with training images (--train-sizes, at 256 px) and image size (--image-sizes, "
        "100 training images), and inspect throughput of the local engine against Ray"))
    p.add_argument("--train-sizes", default="50,100,200,400,800", help="training-set sizes for --scaling")
    p.add_argument("--image-sizes", default="256,512,1024", help="image sizes for --scaling")
    p.add_argument("--selection", action="store_true", help=(
        "check the choice of --detector auto on every category: each candidate's synthetic AUROC beside its real test AUROC, "
        "their rank correlation, the pick against the real best, and the pick fitted on all training images"))
    p.add_argument("--thresholds", action="store_true", help=(
        "measure the threshold rules on every category: with the training images subsampled (--sizes), each rule's "
        "false-reject rate and recall on the real test split beside the best any threshold reaches (the oracle), for "
        "holdout, k-fold and leave-one-out calibration scores (--detector, default patchcore)"))
    p.add_argument("--sizes", default="10,20,50,100,all", help="training-set sizes for --thresholds (default: 10,20,50,100,all)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS", help=(
        "time for trying candidates per category (default: 3600 with --selection, which carries every candidate to the "
        "final stage; 300, as fit, for --detectors auto)"))
    _add_model_options(p)

    p = sub.add_parser("demo", help="fit, evaluate and draw overlays on built-in data", description=(
        "Run the main job end to end: on MVTec bottle when ../shared/datasets is present, otherwise on a generated data set."))
    p.add_argument("--data", default=None, help="use this data set instead of the built-in choice")
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")

    p = sub.add_parser("synth", help="draw synthetic defects on good images, for a person to check", description=(
        "Make synthetic defects (cut-paste, foreign texture, scratch, spot, missing material, warp) on the good training images "
        "of DATA, the kind used to choose detectors without real defect images, and write each with its mask plus a contact "
        "sheet, gallery.png, to look at."))
    p.add_argument("data", help="data set or category folder")
    p.add_argument("--out", required=True, help="folder to write gallery.png, the defects and their masks to")
    p.add_argument("--n", type=int, default=24, help="number of defects (default: 24)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--image-size", type=int, default=256, help="longest image side in pixels; larger images are shrunk to it (default: 256)")

    p = sub.add_parser("export", help="export a model to ONNX that scores exactly like PyTorch", description=(
        "Write the model as one ONNX graph (normalisation, backbone, nearest-neighbour or Mahalanobis scoring, upsampling, "
        "smoothing, calibration) with its calibration as metadata. 'inspect', 'evaluate' and 'serve' accept the .onnx file "
        "and score it with ONNX Runtime. The export is checked against PyTorch before it is kept."))
    p.add_argument("model", help="model file (.dlens)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    p.add_argument("-o", "--output", default=None, help="file to write (default: the model's name with .onnx)")
    p.add_argument("--check", nargs="*", default=[], metavar="IMAGE", help="images (or folders) to compare scores on (default: 4 random images)")

    p = sub.add_parser("serve", help="run the inspection service: REST API, dashboard, history", description=(
        "Serve models over HTTP with a web dashboard at / and the API schema at /docs. Every inspection is kept in the "
        "history database. Clients load further models by name from --model-dir, never by path."))
    p.add_argument("models", nargs="*", help="model files (.dlens or .onnx) to load at start; named by their file stem")
    p.add_argument("--model-dir", default=None, help="folder clients may load models from (default: the first model's folder, else ./models)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--db", default=os.environ.get("DEFECTLENS_DB", "sqlite:///defectlens_history.db"), help=(
        "history database: any SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db (default: $DEFECTLENS_DB or "
        "sqlite:///defectlens_history.db)"))
    p.add_argument("--api-key", action="append", default=[], help=(
        "a key that may change state (load/unload models, thresholds); repeat for several; also $DEFECTLENS_API_KEYS "
        "(comma-separated). Without one, the service is read-and-inspect only"))
    p.add_argument("--protect-inspect", action="store_true", help="require an API key to inspect too")
    p.add_argument("--max-upload-mb", type=float, default=16.0, help="largest request body in MB (default: 16)")
    p.add_argument("--max-megapixels", type=float, default=64.0, help="largest image in megapixels (default: 64)")
    p.add_argument("--keep-images", default=None, metavar="DIR", help="keep a copy of every inspected image here")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])

    p = sub.add_parser("loadtest", help="load a running service and check its history kept every answer", description=(
        "Send REQUESTS inspections from CONCURRENCY threads to a running 'defectlens serve', print requests/s and "
        "p50/p99 latency, then check through the history API that every answered request has exactly one row."))
    p.add_argument("url", help="service address, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="loaded model to inspect with")
    p.add_argument("--images", nargs="+", required=True, help="image files or folders to send (cycled)")
    p.add_argument("--requests", type=int, default=2000, help="number of requests (default: 2000)")
    p.add_argument("--concurrency", type=int, default=8, help="parallel clients (default: 8)")
    p.add_argument("--api-key", default=os.environ.get("DEFECTLENS_API_KEY"), help="key, when the service guards inspection")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return parser


def _fit_bundle(det, ds, settings, scheme: str = "auto", folds: int = 10, extra: dict | None = None):
    """Fit and calibrate, recording which files the model saw so re-calibration can avoid them."""
    from defectlens.workflows.fitting import fit_calibrated, resolve_scheme

    if getattr(det, "needs_labels", False):
        return _fit_supervised_bundle(det, ds, settings)
    scheme = resolve_scheme(scheme, len(ds.train_good), len(ds.validation))
    fitted_on = ds.train_good if scheme == "holdout" else ds.train_good + ds.validation
    meta = {"name": ds.name, "data": str(ds.root), "train_images": len(fitted_on),
            "train_files": [str(p.resolve()) for p in fitted_on], "calibration_scheme": scheme, **(extra or {})}
    return fit_calibrated(det, ds.train_good, ds.validation, settings, scheme=scheme, folds=folds, metadata=meta)


def _fit_supervised_bundle(det, ds, settings):
    """A classifier learns from half the labelled test images (split per defect type); they are
    recorded, so `evaluate` judges it only on the other half."""
    from defectlens.data.datasets import GOOD, labelled_split
    from defectlens.workflows import calibrate_detector

    goods, defects = labelled_split(ds, 0.5, 0)
    images = ds.train_good + [s.path for s in goods] + [s.path for s in defects]
    labels = [0] * (len(ds.train_good) + len(goods)) + [1] * len(defects)
    if not ds.validation:
        raise DefectLensError(f"{ds.root}: no held-out good images to calibrate on (raise --validation-fraction)")
    det.fit(images, labels)
    meta = {"name": ds.name, "data": str(ds.root), "train_images": len(images), "train_files": [str(Path(p).resolve()) for p in images],
            "calibration_scheme": "holdout", "labelled_defects": {t: sum(s.defect_type == t for s in defects) for t in ds.defect_types if t != GOOD}}
    bundle = calibrate_detector(det, ds.validation, settings, metadata=meta)
    bundle.calibration.files += [str(Path(s.path).resolve()) for s in goods + defects]
    return bundle


def _cmd_fit(args: argparse.Namespace) -> int:
    from defectlens.data import load_dataset

    ds = load_dataset(args.data, validation_fraction=args.validation_fraction, seed=args.seed)
    print(ds.summary())
    extra = {}
    if args.detector == "auto":
        det, extra["selection"] = _select(args, ds)
    else:
        det = _make_detector(args)
    bundle = _fit_bundle(det, ds, _settings(args), args.scheme, args.folds, extra)
    print(bundle.calibration.describe())
    path = bundle.save(args.output)
    print(f"saved {path} ({path.stat().st_size / 2**20:.1f} MiB, checksum {bundle.checksum[:12]})")
    return 0


def _select(args: argparse.Namespace, ds):
    """--detector auto: the chosen detector (unfitted) and the selection record for the model file."""
    if args.tile or "," in args.backbone:
        raise DefectLensError("--detector auto chooses tiling and detectors itself: name a detector to use --tile or several backbones")
    return _auto_detector(ds, args.backbone, args.weights, args.image_size or 256, args.budget, args.seed)


def _auto_detector(ds, backbone: str = "mobilenet_v2", weights: str | None = None, image_size: int = 256, budget: float = 300.0, seed: int = 0):
    from defectlens.workflows import select_detector

    selection = select_detector(ds.train_good, backbone=backbone, weights=weights, image_size=image_size, budget_s=budget,
                                seed=seed, progress=print)
    print(selection.describe())
    return selection.chosen.build(verbose=True, random_state=seed), selection.to_dict()


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from defectlens.calibration import LABELLED
    from defectlens.data import load_dataset
    from defectlens.data.datasets import labelled_split
    from defectlens.errors import DatasetError
    from defectlens.inference.loading import load_model
    from defectlens.workflows.fitting import SYNTHETIC_DEFECTS, ScoredImages, SyntheticScores, calibrate_bundle, score_images, synthetic_scores

    bundle = load_model(args.model)
    settings = _settings(args, args.symmetry)
    if args.data is None:
        if settings.strategy in LABELLED or args.symmetry:
            raise DatasetError(f"strategy '{settings.strategy}'{' with symmetry' if args.symmetry else ''} needs DATA with labelled defect images")
        old = bundle.calibration
        if old is None or not old.good_map_max:
            raise DatasetError(f"{args.model}: holds no stored good scores to re-calibrate from: give DATA")
        good = ScoredImages(np.asarray(old.good_scores), np.asarray(old.good_map_max), np.zeros(old.n_good), np.zeros(old.n_good))
        n_syn = len(old.synthetic_scores)
        syn = SyntheticScores(ScoredImages(np.asarray(old.synthetic_scores), np.zeros(n_syn), np.zeros(n_syn), np.zeros(n_syn)),
                              list(old.synthetic_families)) if n_syn else None
        calibrate_bundle(bundle, good, settings, source=old.source.replace("+labelled", ""), files=[f for f in old.files if f], synthetic=syn)
        bundle.calibration.symmetry = old.symmetry  # the stored scores already include it, when it was chosen
    else:
        ds = load_dataset(args.data, validation_fraction=0.0)
        print(ds.summary())
        fitted = set(bundle.metadata.get("train_files", []))
        unseen = [p for p in ds.train_good + ds.validation if str(p.resolve()) not in fitted]
        good_test, defects = [], []
        if settings.strategy in LABELLED or args.symmetry:
            good_test, defects = labelled_split(ds, args.labelled_fraction, args.seed)
        good_paths = unseen + [s.path for s in good_test]
        if not good_paths:
            raise DatasetError(f"{ds.root}: every good image was used to fit this model; add unseen good images, or re-calibrate without DATA")
        bundle.detector.verbose = True
        good = score_images(bundle.detector, good_paths, progress=True)
        syn = synthetic_scores(bundle.detector, good_paths, SYNTHETIC_DEFECTS, settings.seed)
        # resolved paths, so evaluation recognises these images however the data folder is named
        calibrate_bundle(bundle, good, settings, [s.path.resolve() for s in defects], [s.defect_type for s in defects], source="holdout",
                         files=[str(p.resolve()) for p in good_paths], synthetic=syn)
        bundle.detector.verbose = False
    print(bundle.calibration.describe())
    if bundle.typer is not None:
        print(bundle.typer.summary())
    path = bundle.save(args.output or args.model)
    print(f"saved {path} (checksum {bundle.checksum[:12]})")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from defectlens.batch.outputs import run_batch
    from defectlens.data.images import flatten_inputs
    from defectlens.inference.inspector import Inspector

    inspector = Inspector.load(args.model, mask_method=args.mask)
    paths = flatten_inputs(args.inputs)
    out = Path(args.out) if args.out else None
    if out is None and (args.save_maps or args.parquet or args.engine != "local"):
        raise DefectLensError("--save-maps, --parquet and --engine ray need --out (results are streamed to files there)")
    good, defect, errors, ran = run_batch(inspector, paths, out, not args.no_overlay, args.save_maps, args.engine, args.address,
                                          args.workers, args.fresh, Path(args.model), args.db, args.parquet)
    summary = f"inspected {ran - errors} images: {good} good, {defect} defect" + (f", {errors} unreadable (skipped)" if errors else "")
    print(summary + (f"; results in {out / 'results.jsonl'}" if out else ""), file=sys.stderr if out is None else sys.stdout)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from defectlens.data import load_dataset
    from defectlens.evaluation.evaluate import evaluate
    from defectlens.inference.loading import load_model

    bundle = load_model(args.model)
    ds = load_dataset(args.data, validation_fraction=0.0)
    print(ds.summary())
    result = evaluate(bundle, ds, progress=True)
    print(result.table())
    out = Path(args.out or f"evaluation_{ds.name}.json")
    result.save_json(out)
    print(f"wrote {out}")
    if args.report:
        _write_report(result, bundle, Path(args.report))
    return 0


def _write_report(result, bundle, folder: Path) -> None:
    from defectlens.evaluation.benchmark import machine_description
    from defectlens.evaluation.report import write_report

    html_path, md_path = write_report(result, bundle, folder, machine_description())
    print(f"report: {html_path} and {md_path}")


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from defectlens.evaluation.benchmark import machine_description, result_dict, run_benchmark
    from defectlens.evaluation.comparison import compare, find_categories, markdown, write

    if args.scaling:
        return _scaling(args)
    if args.thresholds:
        return _thresholds(args)
    if args.selection:
        from defectlens.evaluation.selection_benchmark import markdown as selection_markdown
        from defectlens.evaluation.selection_benchmark import run_selection_benchmark

        entries = run_selection_benchmark(args.data, args.budget or 3600.0, args.seed)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "selection.md").write_text(selection_markdown(entries, machine_description()))
        print(f"wrote {out / 'selection.md'}")
        return 0
    if args.detectors or args.backbones or len(find_categories(args.data)) > 1:
        detectors = (args.detectors or args.detector).split(",")
        backbones = (args.backbones or args.backbone).split(",")
        given = {k: v for k, v in _given_params(args).items() if k != "backbone"}  # each run names its own
        given["budget_s"] = args.budget or 300.0  # what an 'auto' run may spend choosing
        rows = compare(args.data, detectors, backbones, given)
        machine = machine_description()
        md, js = write(rows, Path(args.out), machine)
        print(markdown(rows, machine).splitlines()[-1])
        print(f"wrote {md} and {js}")
        return 0

    result = run_benchmark(args.data, args.detector, **_detector_params(args))
    print(result.text())
    if args.json:
        Path(args.json).write_text(json.dumps(result_dict(result), indent=2))
        print(f"wrote {args.json}")
    return 0


def _thresholds(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from defectlens.evaluation.benchmark import machine_description
    from defectlens.evaluation.threshold_benchmark import markdown, run_threshold_benchmark

    detector = "patchcore" if args.detector == "auto" else args.detector
    try:
        sizes = [None if s.strip() == "all" else int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise DefectLensError(f"--sizes takes comma-separated image counts or 'all', got {args.sizes!r}") from None
    args.detector = detector
    entries = run_threshold_benchmark(args.data, detector, _detector_params(args), sizes, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "thresholds.md").write_text(markdown(entries, machine_description(), detector))
    (out / "thresholds.json").write_text(json.dumps([asdict(e) for e in entries], indent=1))
    print(f"wrote {out / 'thresholds.md'} and thresholds.json")
    return 0


def _scaling(args: argparse.Namespace) -> int:
    from defectlens.evaluation.benchmark import machine_description
    from defectlens.evaluation.scaling import HEADER, as_dict, engine_throughput, run_scaling

    try:
        train_sizes = [int(v) for v in args.train_sizes.split(",")]
        image_sizes = [int(v) for v in args.image_sizes.split(",")]
    except ValueError:
        raise DefectLensError("--train-sizes and --image-sizes are comma-separated whole numbers") from None
    params = {k: v for k, v in _detector_params(args).items() if k != "image_size"}
    print(f"scaling of {args.detector} on {args.data}; machine: {machine_description()}")
    print(HEADER + "\n|" + "---|" * 8)
    points = run_scaling(args.data, args.detector, params, train_sizes, image_sizes)
    engines = engine_throughput(args.data, args.detector, params)
    print(f"inspect --out over {engines['images']} test images: local engine {engines['local_images_per_s']:.1f} images/s, "
          f"Ray {engines['ray_images_per_s']:.1f} images/s (start-up included)")
    if args.json:
        Path(args.json).write_text(json.dumps(finite({"machine": machine_description(), "points": as_dict(points), "engines": engines}), indent=2))
    return 0


def _find_demo_data() -> Path | None:
    for candidate in DEMO_DATA_CANDIDATES:
        path = Path(candidate)
        if (path / "train" / "good").is_dir():
            return path.resolve()
    return None


PARITY = 1e-4


def _cmd_export(args: argparse.Namespace) -> int:
    from defectlens.bundle import Bundle
    from defectlens.data.images import flatten_inputs
    from defectlens.export import export_onnx
    from defectlens.inference.loading import load_model

    source = Path(args.model)
    if source.suffix.lower() == ".onnx":
        raise DefectLensError(f"{source}: already an exported model; export the .dlens file it came from")
    bundle = Bundle.load(source)
    out = Path(args.output) if args.output else source.with_suffix(".onnx")
    export_onnx(bundle, out)
    exported = load_model(out)
    size = bundle.detector.image_size
    images = [str(p) for p in flatten_inputs(args.check)] if args.check else list(np.random.default_rng(0).random((4, size, size, 3), dtype=np.float32))
    cal = bundle.calibration
    s_ref, m_ref = bundle.detector.score(images)
    s_onnx, m_onnx = exported.detector.score(images)
    score_diff = float(np.abs(bundle.detector.decision_scores(s_ref, m_ref, cal) - exported.detector.decision_scores(s_onnx, m_onnx, cal)).max())
    map_diff = float(np.abs(m_ref - m_onnx).max())
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); on {len(images)} {'given' if args.check else 'random'} images the largest "
          f"difference from PyTorch is {score_diff:.1e} in score and {map_diff:.1e} in the map")
    if max(score_diff, map_diff) > PARITY:
        out.unlink()
        raise DefectLensError(f"{out}: the export disagrees with PyTorch by more than {PARITY:g}; not kept")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from defectlens.evaluation.benchmark import machine_description
    from defectlens.service.app import InspectionService, ServiceSettings, create_app

    models = [Path(m) for m in args.models]
    model_dir = Path(args.model_dir) if args.model_dir else models[0].parent if models else Path("models")
    keys = args.api_key + [k for k in os.environ.get("DEFECTLENS_API_KEYS", "").split(",") if k.strip()]
    if args.max_upload_mb <= 0 or args.max_megapixels <= 0:
        raise DefectLensError("--max-upload-mb and --max-megapixels must be positive")
    settings = ServiceSettings(db_url=args.db, model_dir=model_dir, models=models, api_keys=keys, protect_inspect=args.protect_inspect,
                               max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=int(args.max_megapixels * 1e6),
                               image_dir=Path(args.keep_images) if args.keep_images else None)
    if args.protect_inspect and not keys:
        raise DefectLensError("--protect-inspect needs an API key (--api-key or $DEFECTLENS_API_KEYS)")
    service = InspectionService(settings)
    loaded = ", ".join(m.name for m in service.registry.loaded()) or "none"
    print(f"defectlens {__version__} on {machine_description()}")
    print(f"models: {loaded} (model folder {model_dir.resolve()}); history: {service.status()['database']['url']}")
    if not keys:
        print("no API key configured: loading models and changing thresholds are refused (--api-key to allow them)")
    print(f"dashboard http://{args.host}:{args.port}/  API schema http://{args.host}:{args.port}/docs", flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level == "debug")
    service.store.close()
    return 0


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from defectlens.data.images import flatten_inputs
    from defectlens.service.loadtest import check_history, history_rows, run_load

    if args.requests < 1 or args.concurrency < 1:
        raise DefectLensError("--requests and --concurrency must be at least 1")
    images = [p.read_bytes() for p in flatten_inputs(args.images)]
    result = run_load(args.url, args.model, images, args.requests, args.concurrency, args.api_key)
    try:
        result.check = check_history(history_rows(args.url, result.run_id), result.acknowledged, result.requests)
    except Exception as exc:  # noqa: BLE001 -- a server gone after the load is a finding to print, not a traceback
        result.check = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    summary = result.summary()
    print(f"{summary['ok']}/{summary['requests']} answered in {summary['seconds']} s: {summary['requests_per_s']} requests/s, "
          f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, concurrency {summary['concurrency']}")
    if summary["failures"]:
        print(f"failures: {summary['failures']}")
    check = result.check
    print("history: " + (f"{check['rows']} rows, {check.get('n_missing', 0)} missing, {len(check.get('duplicated', []))} duplicated"
                         if "rows" in check else check.get("error", "not checked")))
    if args.json:
        Path(args.json).write_text(json.dumps(finite(summary), indent=2))
    return 0 if result.lost == 0 and check.get("ok") else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from defectlens.batch.outputs import run_batch
    from defectlens.data import load_dataset
    from defectlens.data.synthetic import make_synthetic_dataset
    from defectlens.evaluation.evaluate import evaluate
    from defectlens.inference.inspector import Inspector
    from defectlens.inference.loading import load_model

    out = Path(args.out)
    data = Path(args.data) if args.data else _find_demo_data()
    if data is None:
        print("no real data set found beside the project: generating the demo data set (machined discs)")
        data = make_synthetic_dataset(out / "data")
    ds = load_dataset(data)
    print(ds.summary())
    from defectlens.calibration import CalibrationSettings

    det, selection = _auto_detector(ds)
    bundle = _fit_bundle(det, ds, CalibrationSettings(), extra={"selection": selection})
    print(bundle.calibration.describe())
    model_path = bundle.save(out / f"{ds.name}.dlens")
    print(f"model saved to {model_path}")
    bundle = load_model(model_path)
    result = evaluate(bundle, ds, progress=True)
    print(result.table())
    result.save_json(out / "evaluation.json")
    _write_report(result, bundle, out / "report")
    # overlays for a few images of each test type
    picks = []
    for t in sorted({s.defect_type for s in ds.test}):
        picks += [s.path for s in ds.test if s.defect_type == t][:3]
    good, defect, _, _ = run_batch(Inspector(bundle), picks, out / "inspections", overlays=True, fresh=True)
    print(f"inspected {len(picks)} sample images ({good} good, {defect} defect): overlays in {out / 'inspections' / 'overlays'}")
    print(f"evaluation written to {out / 'evaluation.json'}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from defectlens.data import load_dataset
    from defectlens.data.defects import resize_longest, write_gallery
    from defectlens.data.images import load_rgb

    if args.n < 1 or args.image_size < 16:
        raise DefectLensError("--n must be at least 1 and --image-size at least 16")
    ds = load_dataset(args.data, validation_fraction=0.0)
    # one image per defect, spread over the whole training set (names often follow capture order)
    picks = np.unique(np.linspace(0, len(ds.train_good) - 1, min(args.n, len(ds.train_good))).round().astype(int))
    images = [resize_longest(load_rgb(ds.train_good[i]), args.image_size) for i in picks]
    paths = write_gallery(images, Path(args.out), n=args.n, seed=args.seed)
    print(f"wrote {args.n} synthetic defects on {len(images)} good images of {ds.name} to {Path(args.out)}: "
          f"contact sheet {paths[0]}, each defect with its mask as defect_XXX_<family>.png and defect_XXX_mask.png")
    return 0


COMMANDS = {"fit": _cmd_fit, "calibrate": _cmd_calibrate, "inspect": _cmd_inspect, "evaluate": _cmd_evaluate, "benchmark": _cmd_benchmark,
            "export": _cmd_export, "serve": _cmd_serve, "loadtest": _cmd_loadtest, "demo": _cmd_demo,
            "synth": _cmd_synth}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"defectlens: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # scoped: callers of main() (tests, scripts) keep their own warning display afterwards
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command](args)
    except DefectLensError as exc:
        print(f"defectlens: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("defectlens: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
