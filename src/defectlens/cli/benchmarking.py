"""`benchmark`: speed, memory and accuracy on one category; detector comparisons over many; and
the checks behind `fit`'s choices (--selection, --thresholds) and its growth (--scaling)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from defectlens.cli.options import RUNTIMES, add_detector_options, detector_params, given_params, setting
from defectlens.errors import DefectLensError


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    _add_modes(p)
    p.add_argument("--sizes", default="10,20,50,100,all", help="training-set sizes for --thresholds (default: 10,20,50,100,all)")
    p.add_argument("--draws", type=int, default=1, help=(
        "--thresholds: draw each size this many times (seeds --seed, --seed + 1, ...), each calibrated only as fit calibrates, "
        "and tabulate how the default threshold's false-reject rate spreads over the draws (default: 1, with every source "
        "of calibration scores)"))
    p.add_argument("--group-by", default=None, metavar="REGEX", help=(
        "--thresholds: group the good test images by this regular expression on the file name (its first group, else the "
        "whole match) and give the default threshold's false-reject rate per group, and on groups with and without "
        "training images (e.g. '^\\d{5}' for DeepPCB's board designs)"))
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS", help=(
        "time for trying candidates per category (default: 3600 with --selection, which carries every candidate to the "
        "final stage; 300, as fit, for --detectors auto)"))
    add_detector_options(p, default_detector="patchcore")
    p.set_defaults(run=run_benchmark)


def _add_modes(p: argparse.ArgumentParser) -> None:
    """The benchmark's modes besides the plain one: each measures what one of fit's or inspect's choices rests on."""
    p.add_argument("--scaling", action="store_true", help=(
        "measure how fit and inspect grow with training images (--train-sizes, at 256 px) and image size (--image-sizes, "
        "100 training images), and inspect throughput of the local engine against Ray"))
    p.add_argument("--train-sizes", default="50,100,200,400,800", help="training-set sizes for --scaling")
    p.add_argument("--image-sizes", default="256,512,1024", help="image sizes for --scaling")
    p.add_argument("--address", default=None, help=(
        "a running Ray cluster (HEAD:6379, or ray://HEAD:10001) for --scaling's Ray figure (default: a Ray started on this machine)"))
    p.add_argument("--selection", action="store_true", help=(
        "check the choice of --detector auto on every category: each candidate's synthetic AUROC beside its real test AUROC, "
        "their rank correlation, the pick against the real best, and the pick fitted on all training images"))
    p.add_argument("--thresholds", action="store_true", help=(
        "measure the threshold rules on every category: with the training images subsampled (--sizes), each rule's "
        "false-reject rate and recall on the real test split beside the best any threshold reaches (the oracle), for "
        "holdout, k-fold and leave-one-out calibration scores (--detector, default patchcore; auto: each size's pick, "
        "calibrated as fit does); holdout runs also give each rule's pass rate (test FRR <= 5 %%, recall >= 0.9 of the "
        "oracle's) over re-splits of their held-out and good test scores"))
    p.add_argument("--end-to-end", action="store_true", help=(
        "on one category: images/s of the detector's scoring, the Inspector, and inspect --out with records, overlays and a "
        "history database, in one run on the same test images, with the model loaded as inspect loads it"))
    p.add_argument("--runtime", choices=RUNTIMES, default="auto", help=(
        "what scores the model for --end-to-end, as inspect's option (default: auto, ONNX Runtime where its graphs match)"))
    p.add_argument("--int8", action="store_true", help=(
        "on every category: PatchCore with its backbone quantised to int8 (ONNX Runtime, static, calibrated on the good "
        "training images, the memory bank rebuilt through it) against float32: embedding and map correlation, image "
        "AUROC, images/s, and whether the rule for keeping int8 holds (AUROC within 0.005, maps correlating 0.99+)"))
    p.add_argument("--line-loop", action="store_true", help=(
        "on every category: move the line (brighter, flatter light, part shifted), confirm 5 false rejects as good through "
        "the service's feedback API, and print the false-reject rate and recall before and after, the rollback check, "
        "and the drift watch on unmoved and moved streams (--detector, default patchcore)"))
    p.add_argument("--tune", action="store_true", help=(
        "on one category: measure threads, batch size, decoding threads and search threads for the default runtime on this "
        "machine, and store the fastest for inspect, evaluate, watch and serve (in $DEFECTLENS_TUNING, else "
        "~/.cache/defectlens/tuning.json; DEFECTLENS_TUNING=off ignores it)"))


def run_benchmark(args: argparse.Namespace) -> int:
    from defectlens.evaluation.comparison import find_categories

    if args.scaling:
        return _scaling(args)
    if args.thresholds:
        return _thresholds(args)
    if args.selection:
        return _selection(args)
    if args.end_to_end:
        return _end_to_end(args)
    if args.line_loop:
        return _line_loop(args)
    if args.int8:
        return _int8(args)
    if args.tune:
        return _tune(args)
    if args.detectors or args.backbones or len(find_categories(args.data)) > 1:
        return _comparison(args)
    return _one_category(args)


def _one_category(args: argparse.Namespace) -> int:
    from defectlens.evaluation.benchmark import result_dict, run_benchmark

    result = run_benchmark(args.data, args.detector, **detector_params(args))
    print(result.text())
    if args.json:
        Path(args.json).write_text(json.dumps(result_dict(result), indent=2))
        print(f"wrote {args.json}")
    return 0


def _end_to_end(args: argparse.Namespace) -> int:
    from defectlens.evaluation.benchmark import machine_description
    from defectlens.evaluation.end_to_end import run_end_to_end

    detector = "patchcore" if args.detector == "auto" else args.detector
    result = run_end_to_end(args.data, detector, detector_params(args, detector), machine_description(), runtime=args.runtime)
    print(result.text())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _int8(args: argparse.Namespace) -> int:
    from defectlens.evaluation.benchmark import machine_description
    from defectlens.evaluation.comparison import find_categories
    from defectlens.evaluation.int8 import HEADER, run_int8

    machine = machine_description()
    print(f"int8 backbone against float32, PatchCore; machine: {machine}\n{HEADER}")
    results = []
    for category in find_categories(args.data):
        results.append(run_int8(category, detector_params(args, "patchcore"), machine))
        print(results[-1].row(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2))
        print(f"wrote {args.json}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from defectlens.evaluation.tune import run_tune
    from defectlens.inference.tuning import save_tuning, tuning_file

    detector = "patchcore" if args.detector == "auto" else args.detector
    result = run_tune(args.data, detector, detector_params(args, detector))
    print(result.text())
    if tuning_file() is None:
        print("DEFECTLENS_TUNING=off: the tuning is not stored")
    else:
        print(f"stored in {save_tuning(result.chosen)}: inspect, evaluate, watch and serve load it on this machine")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _line_loop(args: argparse.Namespace) -> int:
    from defectlens.evaluation.benchmark import machine_description
    from defectlens.evaluation.comparison import find_categories
    from defectlens.evaluation.line_loop import HEADER, as_dicts, markdown, row, run_line_loop

    detector = "patchcore" if args.detector == "auto" else args.detector
    machine = machine_description()
    print(f"line loop, {detector}; machine: {machine}\n{HEADER}")
    results = []
    for category in find_categories(args.data):
        results.append(run_line_loop(category, detector, detector_params(args, detector), seed=args.seed))
        print(row(results[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "line_loop.md").write_text(markdown(results, machine))
    (out / "line_loop.json").write_text(json.dumps(as_dicts(results), indent=1))
    print(f"wrote {out / 'line_loop.md'} and line_loop.json")
    return 0


def _comparison(args: argparse.Namespace) -> int:
    from defectlens.evaluation.benchmark import machine_description
    from defectlens.evaluation.comparison import compare, markdown, write

    detectors = (args.detectors or args.detector).split(",")
    backbones = (args.backbones or setting(args, "backbone", "mobilenet_v2")).split(",")
    given = {k: v for k, v in given_params(args).items() if k != "backbone"}  # each run names its own
    given["budget_s"] = args.budget or 300.0  # what an 'auto' run may spend choosing
    rows = compare(args.data, detectors, backbones, given)
    machine = machine_description()
    md, js = write(rows, Path(args.out), machine)
    print(markdown(rows, machine).splitlines()[-1])
    print(f"wrote {md} and {js}")
    return 0


def _selection(args: argparse.Namespace) -> int:
    from defectlens.evaluation.benchmark import machine_description
    from defectlens.evaluation.selection_benchmark import markdown, run_selection_benchmark

    entries = run_selection_benchmark(args.data, args.budget or 3600.0, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.md").write_text(markdown(entries, machine_description()))
    print(f"wrote {out / 'selection.md'}")
    return 0


def _thresholds(args: argparse.Namespace) -> int:
    from defectlens.evaluation.benchmark import machine_description
    from defectlens.evaluation.threshold_benchmark import markdown, run_threshold_benchmark

    detector = args.detector  # auto: each size's pick, chosen from its good images as `fit` chooses
    try:
        sizes = [None if s.strip() == "all" else int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise DefectLensError(f"--sizes takes comma-separated image counts or 'all', got {args.sizes!r}") from None
    params = {"budget_s": args.budget or 300.0} if detector == "auto" else detector_params(args, detector)
    entries = run_threshold_benchmark(args.data, detector, params, sizes, args.seed, draws=args.draws, group_by=args.group_by)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "thresholds.md").write_text(markdown(entries, machine_description(), detector))
    (out / "thresholds.json").write_text(json.dumps([asdict(e) for e in entries], indent=1))
    print(f"wrote {out / 'thresholds.md'} and thresholds.json")
    return 0


def _scaling(args: argparse.Namespace) -> int:
    from defectlens.evaluation.benchmark import machine_description
    from defectlens.evaluation.scaling import HEADER, as_dict, engine_throughput, run_scaling
    from defectlens.jsonutil import finite

    try:
        train_sizes = [int(v) for v in args.train_sizes.split(",")]
        image_sizes = [int(v) for v in args.image_sizes.split(",")]
    except ValueError:
        raise DefectLensError("--train-sizes and --image-sizes are comma-separated whole numbers") from None
    params = {k: v for k, v in detector_params(args).items() if k != "image_size"}
    print(f"scaling of {args.detector} on {args.data}; machine: {machine_description()}")
    print(HEADER + "\n|" + "---|" * 8)
    points = run_scaling(args.data, args.detector, params, train_sizes, image_sizes)
    engines = engine_throughput(args.data, args.detector, params, address=args.address)
    print(f"inspect --out over {engines['images']} test images: local engine {engines['local_images_per_s']:.1f} images/s, "
          f"Ray {f'at {args.address} ' if args.address else ''}{engines['ray_images_per_s']:.1f} images/s (start-up included)")
    if args.json:
        Path(args.json).write_text(json.dumps(finite({"machine": machine_description(), "points": as_dict(points), "engines": engines}), indent=2))
    return 0
