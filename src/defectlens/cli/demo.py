"""`demo` and `synth`: the main job end to end on built-in data, and synthetic defects to look at."""

from __future__ import annotations

import argparse
from pathlib import Path

from defectlens.errors import DefectLensError

DEMO_DATA_CANDIDATES = ("../shared/datasets/mvtec_ad/bottle", "shared/datasets/mvtec_ad/bottle")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="fit, evaluate and draw overlays on built-in data", description=(
        "Run the main job end to end: on MVTec bottle when ../shared/datasets is present, otherwise on a generated data set."))
    p.add_argument("--data", default=None, help="use this data set instead of the built-in choice")
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.set_defaults(run=run_demo)

    p = sub.add_parser("synth", help="draw synthetic defects on good images, for a person to check", description=(
        "Make synthetic defects (cut-paste, foreign texture, scratch, spot, missing material, warp, and logical: a region moved, "
        "removed or recoloured) on the good training images of DATA, the kind used to choose detectors without real defect "
        "images, and write each with its mask plus a contact sheet, gallery.png, to look at."))
    p.add_argument("data", help="data set or category folder")
    p.add_argument("--out", required=True, help="folder to write gallery.png, the defects and their masks to")
    p.add_argument("--n", type=int, default=24, help="number of defects (default: 24)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--image-size", type=int, default=256, help="longest image side in pixels; larger images are shrunk to it (default: 256)")
    p.set_defaults(run=run_synth)


def find_demo_data() -> Path | None:
    for candidate in DEMO_DATA_CANDIDATES:
        path = Path(candidate)
        if (path / "train" / "good").is_dir():
            return path.resolve()
    return None


def run_demo(args: argparse.Namespace) -> int:
    from defectlens.batch.outputs import run_batch
    from defectlens.calibration.settings import CalibrationSettings
    from defectlens.cli.fitting import auto_detector
    from defectlens.cli.inspecting import write_report
    from defectlens.data import load_dataset
    from defectlens.data.synthetic import make_synthetic_dataset
    from defectlens.evaluation.evaluate import evaluate
    from defectlens.inference.inspector import Inspector
    from defectlens.inference.loading import load_model
    from defectlens.workflows.fitting import fit_dataset

    out = Path(args.out)
    data = Path(args.data) if args.data else find_demo_data()
    if data is None:
        print("no real data set found beside the project: generating the demo data set (machined discs)")
        data = make_synthetic_dataset(out / "data")
    ds = load_dataset(data)
    print(ds.summary())
    det, selection = auto_detector(ds)
    bundle = fit_dataset(det, ds, CalibrationSettings(), extra={"selection": selection})
    print(bundle.calibration.describe())
    model_path = bundle.save(out / f"{ds.name}.dlens")
    print(f"model saved to {model_path}")
    bundle = load_model(model_path)
    result = evaluate(bundle, ds, progress=True)
    print(result.table())
    result.save_json(out / "evaluation.json")
    write_report(result, bundle, out / "report")
    picks = [p for t in sorted({s.defect_type for s in ds.test}) for p in [s.path for s in ds.test if s.defect_type == t][:3]]  # 3 per type
    good, defect, _, _ = run_batch(Inspector(bundle), picks, out / "inspections", overlays=True, fresh=True)
    print(f"inspected {len(picks)} sample images ({good} good, {defect} defect): overlays in {out / 'inspections' / 'overlays'}")
    print(f"evaluation written to {out / 'evaluation.json'}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    import numpy as np

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
