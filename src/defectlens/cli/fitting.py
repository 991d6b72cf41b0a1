"""`fit` and `calibrate`: a model from good images, and its thresholds chosen again."""

from __future__ import annotations

import argparse

from defectlens.calibration.settings import GOOD_ONLY, SCHEMES, STRATEGIES, SYMMETRY_AXES
from defectlens.cli.options import add_calibration_options, add_detector_options, calibration_settings, make_detector, setting
from defectlens.errors import DefectLensError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a model on good images and save it", description=(
        "Fit a model on the good training images of DATA (MVTec layout, good/ + defect folders, or a folder of good images), "
        "calibrate its threshold on held-out good images, and save one model file."))
    p.add_argument("data", help="data set or category folder")
    p.add_argument("-o", "--output", required=True, help="model file to write (.dlens)")
    p.add_argument("--validation-fraction", type=float, default=0.1, help=(
        "good images held out to calibrate the threshold (default: 0.1; with 100+ images at least 30, "
        "while three quarters remain to fit on; with 396+ at least 99, and with 597+ at least 199 while two thirds remain, "
        "so that one image no longer sets the threshold alone)"))
    p.add_argument("--scheme", choices=SCHEMES, default="auto", help=(
        "where unseen good scores come from: holdout, kfold (few images: k models score the images they did not see), "
        "single-image (one image, augmented); auto picks holdout with 10+ held-out images, else kfold (default: auto)"))
    p.add_argument("--folds", type=int, default=10, help="folds for kfold calibration (default: 10)")
    p.add_argument("--budget", type=float, default=300.0, metavar="SECONDS", help=(
        "--detector auto: time for trying candidates before the chosen one is fitted, counted in CPU work so other jobs "
        "on the machine do not change the choice (default: 300)"))
    add_calibration_options(p, GOOD_ONLY)
    add_detector_options(p, default_detector="auto")
    p.set_defaults(run=run_fit)

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
    p.add_argument("--symmetry", choices=SYMMETRY_AXES, default=None, help=(
        "for symmetric parts: try adding a left-right / top-bottom asymmetry score; kept only if it raises AUROC on the labelled images"))
    p.add_argument("--seed", type=int, default=0, help="seed for the labelled split (default: 0)")
    _add_from_history(p)
    add_calibration_options(p, STRATEGIES)
    p.set_defaults(run=run_calibrate)

    _add_learn(sub)


def _add_from_history(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-history", default=None, metavar="DB_URL", help=(
        "use the defects operators confirmed on the line (the service's 'mark defect', with its defect type) from this history "
        "database, with the model's stored good scores, for the labelled rules and defect typing; needs --images"))
    p.add_argument("--images", default=None, metavar="DIR", help="with --from-history: the folder serve --keep-images kept the images in")
    p.add_argument("--model-name", default=None, help="with --from-history: the model's name in the history (default: the file's name)")


def _add_learn(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learn", help="teach a model confirmed-good images without a refit (a new model version)", description=(
        "Teach MODEL images an operator confirmed as good (e.g. false rejects after a change on the line), without refitting: "
        "PatchCore adds the patches its memory bank does not cover, PaDiM updates its Gaussians. The result is a new version "
        "next to MODEL, <name>.v<N>.dlens, recording its parent; MODEL itself is left as it was. The threshold is kept and "
        "re-checked on the model's calibration images (when they are still where fit found them)."))
    p.add_argument("model", help="model file (.dlens)")
    p.add_argument("inputs", nargs="+", help="image files or folders of confirmed-good images (searched recursively)")
    p.add_argument("--label", choices=("good",), required=True, help=(
        "what the images are; only good images teach a good-only model (confirmed defects go to 'calibrate' with labelled data)"))
    p.set_defaults(run=run_learn)


def auto_detector(ds, backbone: str | None = None, weights: str | None = None, image_size: int | None = None, budget: float = 300.0,
                  seed: int = 0):
    """--detector auto: the chosen detector (unfitted) and the selection record for the model file."""
    from defectlens.workflows import select_detector

    given = {k: v for k, v in (("backbone", backbone), ("image_size", image_size)) if v}  # left out: select_detector's own
    selection = select_detector(ds.train_good, weights=weights, budget_s=budget, seed=seed, progress=print, **given)
    print(selection.describe())
    return selection.chosen.build(verbose=True, random_state=seed), selection.to_dict()


def run_fit(args: argparse.Namespace) -> int:
    from defectlens.data import load_dataset
    from defectlens.workflows.fitting import fit_dataset

    ds = load_dataset(args.data, validation_fraction=args.validation_fraction, seed=args.seed)
    print(ds.summary())
    extra = {}
    if args.detector == "auto":
        if setting(args, "tile_size") or "," in setting(args, "backbone", ""):
            raise DefectLensError("--detector auto chooses tiling and detectors itself: name a detector to use --tile or several backbones")
        det, extra["selection"] = auto_detector(ds, setting(args, "backbone"), setting(args, "weights"), setting(args, "image_size"), args.budget,
                                                args.seed)
    else:
        det = make_detector(args)
    bundle = fit_dataset(det, ds, calibration_settings(args), args.scheme, args.folds, extra)
    print(bundle.calibration.describe())
    path = bundle.save(args.output)
    print(f"saved {path} ({path.stat().st_size / 2**20:.1f} MiB, checksum {bundle.checksum[:12]})")
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from defectlens.data import load_dataset
    from defectlens.inference.loading import load_model
    from defectlens.workflows.recalibration import recalibrate_on, recalibrate_stored

    bundle = load_model(args.model)
    settings = calibration_settings(args, args.symmetry)
    if args.from_history:
        _from_history(args, bundle, settings)
    elif args.data is None:
        recalibrate_stored(bundle, settings, args.model)
    else:
        ds = load_dataset(args.data, validation_fraction=0.0)
        print(ds.summary())
        recalibrate_on(bundle, ds, settings, args.labelled_fraction, args.seed)
    print(bundle.calibration.describe())
    if bundle.typer is not None:
        print(bundle.typer.summary())
    path = bundle.save(args.output or args.model)
    print(f"saved {path} (checksum {bundle.checksum[:12]})")
    return 0


def _from_history(args: argparse.Namespace, bundle, settings) -> None:
    from pathlib import Path

    from defectlens.history.store import HistoryStore
    from defectlens.workflows.learning import split_version
    from defectlens.workflows.recalibration import recalibrate_from_history

    if args.data is not None or not args.images:
        raise DefectLensError("--from-history takes no DATA, and needs --images (the folder serve --keep-images kept them in)")
    import sqlalchemy as sa

    name = args.model_name or split_version(Path(args.model).stem)[0]
    url = sa.make_url(args.from_history) if "://" in args.from_history else None
    if url is None or (url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file()):
        raise DefectLensError(f"{args.from_history}: no history database there")
    store = HistoryStore(args.from_history)
    try:
        if store.revision() is None:
            raise DefectLensError(f"{args.from_history}: holds no DefectLens history")
        confirmed = store.confirmed(name, "defect")
    except sa.exc.SQLAlchemyError as exc:
        raise DefectLensError(f"{args.from_history}: cannot read the history ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    finally:
        store.close()
    print(f"{len(confirmed)} defects confirmed on the line for model '{name}'")
    recalibrate_from_history(bundle, confirmed, Path(args.images), settings, args.model)


def run_learn(args: argparse.Namespace) -> int:
    from pathlib import Path

    from defectlens.bundle import Bundle
    from defectlens.data.images import flatten_inputs
    from defectlens.workflows.learning import learn_good

    path = Path(args.model)
    bundle = Bundle.load(path)
    _, report = learn_good(bundle, [str(p) for p in flatten_inputs(args.inputs)], path)
    print(report.describe())
    return 0
