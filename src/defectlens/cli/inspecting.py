"""`inspect`, `evaluate` and `export`: a fitted model put to work, measured, and carried to ONNX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from defectlens.batch import ENGINES
from defectlens.cli.options import add_overlay_option, add_runtime_option
from defectlens.errors import DefectLensError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="inspect images with a model", description=(
        "Inspect images or folders of images; print one JSON record per image, and with --out write results.jsonl, "
        "summary.csv, stats.json (score statistics per verdict, predicted type and folder) and heat-map overlays."))
    p.add_argument("model", help="model file (.dlens, or one exported to .onnx)")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", default=None, help="folder for results.jsonl and overlays/")
    add_overlay_option(p)
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
    add_runtime_option(p)
    p.set_defaults(run=run_inspect)

    p = sub.add_parser("evaluate", help="measure a model on a labelled test split", description=(
        "Score the test split of DATA and print image AUROC, AUPR, F1-max, pixel AUROC and AUPRO."))
    p.add_argument("model", help="model file (.dlens, or one exported to .onnx)")
    p.add_argument("data", help="data set or category folder with test images")
    p.add_argument("--out", default=None, help="JSON file for metrics and per-image records (default: evaluation_<name>.json)")
    p.add_argument("--report", default=None, metavar="DIR", help="also write report.html (self-contained) and report.md with figures here")
    add_runtime_option(p)
    p.set_defaults(run=run_evaluate)

    p = sub.add_parser("export", help="export a model to ONNX that scores exactly like PyTorch", description=(
        "Write the model as one ONNX graph (normalisation, backbone, nearest-neighbour or Mahalanobis scoring, upsampling, "
        "smoothing, calibration) with its calibration as metadata. 'inspect', 'evaluate' and 'serve' accept the .onnx file "
        "and score it with ONNX Runtime. The export is checked against PyTorch before it is kept."))
    p.add_argument("model", help="model file (.dlens)")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    p.add_argument("-o", "--output", default=None, help="file to write (default: the model's name with .onnx)")
    p.add_argument("--check", nargs="*", default=[], metavar="IMAGE", help="images (or folders) to compare scores on (default: 4 random images)")
    p.set_defaults(run=run_export)


def run_inspect(args: argparse.Namespace) -> int:
    from defectlens.batch.outputs import run_batch
    from defectlens.data.images import flatten_inputs
    from defectlens.inference.inspector import Inspector

    inspector = Inspector.load(args.model, mask_method=args.mask, runtime=args.runtime)
    paths = flatten_inputs(args.inputs)
    print(inspector.bundle.runtime.line(), file=sys.stderr)  # once the inputs are known to exist: an error stays one line
    out = Path(args.out) if args.out else None
    if out is None and (args.save_maps or args.parquet or args.engine != "local"):
        raise DefectLensError("--save-maps, --parquet and --engine ray need --out (results are streamed to files there)")
    good, defect, errors, ran = run_batch(inspector, paths, out, args.overlays, args.save_maps, args.engine, args.address,
                                          args.workers, args.fresh, Path(args.model), args.db, args.parquet)
    summary = f"inspected {ran - errors} images: {good} good, {defect} defect" + (f", {errors} unreadable (skipped)" if errors else "")
    print(summary + (f"; results in {out / 'results.jsonl'}" if out else ""), file=sys.stderr if out is None else sys.stdout)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from defectlens.data import load_dataset
    from defectlens.evaluation.evaluate import evaluate
    from defectlens.inference.loading import load_model

    bundle = load_model(args.model, args.runtime)
    ds = load_dataset(args.data, validation_fraction=0.0)
    print(ds.summary())
    print(bundle.runtime.line())
    result = evaluate(bundle, ds, progress=True)
    print(result.table())
    out = Path(args.out or f"evaluation_{ds.name}.json")
    result.save_json(out)
    print(f"wrote {out}")
    if args.report:
        write_report(result, bundle, Path(args.report))
    return 0


def write_report(result, bundle, folder: Path) -> None:
    from defectlens.evaluation.benchmark import machine_description
    from defectlens.evaluation.report import write_report as write

    html_path, md_path = write(result, bundle, folder, machine_description())
    print(f"report: {html_path} and {md_path}")


def run_export(args: argparse.Namespace) -> int:
    from defectlens.bundle import Bundle
    from defectlens.data.images import flatten_inputs
    from defectlens.export import export_checked

    source = Path(args.model)
    if source.suffix.lower() == ".onnx":
        raise DefectLensError(f"{source}: already an exported model; export the .dlens file it came from")
    bundle = Bundle.load(source)
    out = Path(args.output) if args.output else source.with_suffix(".onnx")
    parity = export_checked(bundle, out, [str(p) for p in flatten_inputs(args.check)] if args.check else [])
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB); on {parity.images} {'given' if args.check else 'random'} images the largest "
          f"difference from PyTorch is {parity.score_diff:.1e} in score and {parity.map_diff:.1e} in the map")
    return 0
