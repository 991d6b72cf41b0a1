"""Options shared by commands: every detector setting, the calibration rule, and what they build.

Detector options are derived from the detectors themselves: each registered detector's
``__init__`` parameters become flags, with the help taken from its docstring's Parameters
section, so a new detector needs no edit here. They are read from the source with ``ast``, not
imported, because importing a detector imports torch, and ``defectlens VERB --help`` must answer
at once. ``tests/test_cli.py`` checks the derived parameters against the imported classes.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from defectlens.calibration.settings import CalibrationSettings
from defectlens.errors import DefectLensError

DETECTORS_DIR = Path(__file__).resolve().parents[1] / "detectors"
# settings no flag stands for: a wrapper's inner detector is --detector, several backbones are
# --backbone a,b, the seed is --seed (it also seeds the data split and calibration)
NOT_FLAGS = {"verbose", "detector", "detector_params", "member_params", "backbones", "random_state"}
FLAG_NAMES = {"tile_size": "--tile", "overlap": "--tile-overlap", "scale": "--tile-scale"}  # the tiling flags users know
_ENTRY = re.compile(r"^(\w+(?:\s*,\s*\w+)*)\s*:\s*(.*)$")


@dataclass
class Parameter:
    """One detector setting as the source declares it."""

    name: str
    annotation: str
    defaults: dict[str, Any] = field(default_factory=dict)  # detector name -> default
    doc: str = ""

    @property
    def optional(self) -> bool:
        return "None" in self.annotation

    @property
    def kind(self) -> str:
        return next((t for t in ("size", "bool", "int", "float", "str") if re.search(rf"\b{t}\b", self.annotation)), "str")


def _doc_entries(doc: str) -> dict[str, str]:
    """``name, other : text`` entries of a numpy-style Parameters section (continuations indented)."""
    section = doc.split("----------", 1)[1] if "----------" in doc else ""
    entries: dict[str, str] = {}
    current: list[str] = []
    for line in section.splitlines():
        match = _ENTRY.match(line)
        if match and not line.startswith(" "):
            current = [n.strip() for n in match.group(1).split(",")]
            for n in current:
                entries[n] = match.group(2).strip()
        elif line.strip() and current:
            for n in current:
                entries[n] += " " + line.strip()
    return {k: v for k, v in entries.items() if not v.lower().startswith("as for ")}


def _literal(node: ast.expr, constants: dict[str, Any]) -> Any:
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def _module_parameters(path: Path) -> dict[str, tuple[dict[str, tuple[str, Any]], dict[str, str]]]:
    """detector name -> ({parameter: (annotation, default)}, {parameter: doc}) for one module."""
    tree = ast.parse(path.read_text())
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):
                constants[node.targets[0].id] = ast.literal_eval(node.value)
    found = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        if not any(getattr(d, "id", None) == "register_detector" for d in cls.decorator_list):
            continue
        name = next(_literal(s.value, constants) for s in cls.body if isinstance(s, ast.Assign) and getattr(s.targets[0], "id", "") == "name")
        init = next(s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name == "__init__")
        args = init.args.args[1:]
        defaults = [None] * (len(args) - len(init.args.defaults)) + list(init.args.defaults)
        params = {a.arg: (ast.unparse(a.annotation) if a.annotation else "", _literal(d, constants) if d is not None else None)
                  for a, d in zip(args, defaults, strict=True)}
        found[name] = (params, _doc_entries(ast.get_docstring(cls) or ""))
    return found


@cache
def _declared() -> dict[str, tuple[dict[str, tuple[str, Any]], dict[str, str]]]:
    """Every registered detector's parameters and their docs, the detector modules parsed once."""
    return {name: found for path in sorted(DETECTORS_DIR.glob("*.py")) for name, found in _module_parameters(path).items()}


def detector_parameters() -> dict[str, dict[str, tuple[str, Any]]]:
    """Every registered detector's ``__init__`` parameters: {detector: {name: (annotation, default)}}."""
    return {name: params for name, (params, _) in _declared().items()}


@cache
def parameters() -> list[Parameter]:
    """The union of all detectors' settings, each documented by the first detector that describes it."""
    merged: dict[str, Parameter] = {}
    for detector, (params, docs) in _declared().items():
        for name, (annotation, default) in params.items():
            p = merged.setdefault(name, Parameter(name, annotation))
            if "ModelSize" in annotation:  # some detectors take (height, width) where others take a side: the flag takes both
                p.annotation = annotation.replace("ModelSize", "size")
                p.doc = docs.get(name) or p.doc
            p.defaults[detector] = default
            p.doc = p.doc or docs.get(name, "")
    return [p for p in merged.values() if p.name not in NOT_FLAGS]


def _converter(p: Parameter) -> Callable[[str], Any]:
    base = {"int": int, "float": float, "str": str, "size": _size}[p.kind]

    def convert(text: str) -> Any:
        if p.optional and text.lower() in ("none", "0"):
            return None  # 0 also means "none" for optional sizes: --embed-dim 0 keeps all channels
        try:
            return base(text)
        except ValueError:
            if p.kind != "str" and re.search(r"\bstr\b", p.annotation):
                return text  # a number or a word, as SimpleNet's --pooling 0.25 or auto: the detector checks the word
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {p.kind}") from None

    convert.__name__ = p.kind  # argparse names the type in its error message
    return convert


def _size(text: str) -> Any:
    from defectlens.data.images import parse_size  # numpy and Pillow, not torch: --help stays quick

    try:
        return parse_size(text)
    except DefectLensError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _defaults_text(p: Parameter) -> str:
    by_value: dict[str, list[str]] = {}
    for detector, value in sorted(p.defaults.items()):
        by_value.setdefault(repr(value) if isinstance(value, str) else str(value), []).append(detector)
    return "; ".join(f"{', '.join(names)} {value}" for value, names in by_value.items())


def add_detector_options(parser: argparse.ArgumentParser, default_detector: str) -> None:
    """--detector, --seed, and one flag per detector setting; a flag left out keeps each detector's own default."""
    names = sorted(detector_parameters())
    choices = ["auto", *names] if default_detector == "auto" else names
    parser.add_argument("--detector", default=default_detector, help=(
        f"detector to fit: {', '.join(choices)} (default: {default_detector})"
        + ("; auto tries several on held-out good images with synthetic defects and keeps the best" if default_detector == "auto" else "")
        + ". --backbone a,b fits an ensemble, one member per backbone; --tile SIZE scores tiles at native resolution"))
    parser.add_argument("--seed", type=int, default=0, help="random seed for the detector, the data split and calibration (default: 0)")
    group = parser.add_argument_group("detector settings", "each applies to the detectors that have it (named with their defaults)")
    for p in parameters():
        flag = FLAG_NAMES.get(p.name, "--" + p.name.replace("_", "-"))
        if flag in parser._option_string_actions:  # a command option of the same name (e.g. fit's --validation-fraction)
            flag = "--detector-" + p.name.replace("_", "-")
        help_text = f"{p.doc or p.name.replace('_', ' ')} [{_defaults_text(p)}]".replace("%", "%%")
        # left out, a setting is absent from the namespace (not None: --embed-dim 0 asks for None)
        if p.kind == "bool":
            group.add_argument(flag, dest=p.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=p.name, type=_converter(p), default=argparse.SUPPRESS, metavar=p.kind.upper(), help=help_text)


def setting(args: argparse.Namespace, name: str, fallback: Any = None) -> Any:
    """A detector setting as given, or ``fallback`` when it was left out."""
    return getattr(args, name, fallback)


def given_params(args: argparse.Namespace) -> dict[str, Any]:
    """The detector settings given on the command line, plus the seed."""
    given = {p.name: getattr(args, p.name) for p in parameters() if hasattr(args, p.name)}
    return {**given, "random_state": args.seed}


def detector_params(args: argparse.Namespace, detector: str | None = None) -> dict[str, Any]:
    """The given settings that ``detector`` (default: --detector) takes."""
    accepted = detector_parameters().get(detector or args.detector)
    if accepted is None:
        raise DefectLensError(f"unknown detector '{detector or args.detector}' (available: {', '.join(sorted(detector_parameters()))})")
    return {k: v for k, v in given_params(args).items() if k in accepted}


def make_detector(args: argparse.Namespace):
    """The chosen detector; several backbones make an ensemble, --tile wraps it in tiling at native resolution."""
    from defectlens.detectors import create_detector

    params = detector_params(args)
    backbone = setting(args, "backbone", "")
    if "," in backbone:
        if setting(args, "weights"):
            raise DefectLensError("--weights names one backbone's file; an ensemble of several backbones uses their installed weights")
        shared = {k: v for k, v in params.items() if k not in ("backbone", "image_size", "batch_size")}
        return create_detector("ensemble", detector=args.detector, backbones=backbone, detector_params=shared,
                               image_size=setting(args, "image_size", 256), batch_size=setting(args, "batch_size", 2), verbose=True)
    if not setting(args, "tile_size"):
        return create_detector(args.detector, verbose=True, **params)
    params.pop("image_size", None)  # the tile size is the inner detector's input; --image-size sets the stitched map
    tiling = {"map_size": setting(args, "image_size", 512), **detector_params(args, "tiled")}
    return create_detector("tiled", detector=args.detector, detector_params=params, verbose=True, **tiling)


def add_calibration_options(parser: argparse.ArgumentParser, strategies: tuple[str, ...]) -> None:
    d = CalibrationSettings()
    parser.add_argument("--strategy", choices=strategies, default=d.strategy, help=(
        f"threshold rule (default: {d.strategy}). Good images only: target_frr (conformal: the k-th largest good score, "
        "guaranteed to reject at most the target share of good parts; with too few images, the largest, and it says so), "
        "tail (the Gumbel tail model's quantile: an estimate that may sit above every good score), k_sigma (mean + k std), "
        "cost (the threshold with the least expected cost, recall estimated from synthetic defects). "
        "With labelled defects: f1, target_recall, zero_false_rejects"))
    parser.add_argument("--target-frr", type=float, default=d.target_frr, help=f"false-reject rate to aim for (default: {d.target_frr})")
    parser.add_argument("--confidence", type=float, default=d.confidence, help=(
        "target_frr: guarantee the rate with this probability for this calibration set (e.g. 0.9), instead of on average"))
    parser.add_argument("--escape-cost", type=float, default=d.escape_cost, help=(
        f"cost rule: what one escaped defect costs, in false rejects (default: {d.escape_cost:g})"))
    parser.add_argument("--defect-rate", type=float, default=d.defect_rate, help=(
        f"cost rule: share of defective parts expected on the line (default: {d.defect_rate:g})"))
    parser.add_argument("--k-sigma", type=float, default=d.k_sigma, help=f"k for the k_sigma rule (default: {d.k_sigma})")
    parser.add_argument("--target-recall", type=float, default=d.target_recall, help=f"defect recall to reach (default: {d.target_recall})")


def calibration_settings(args: argparse.Namespace, symmetry: str | None = None) -> CalibrationSettings:
    return CalibrationSettings(strategy=args.strategy, target_frr=args.target_frr, confidence=args.confidence, k_sigma=args.k_sigma,
                               escape_cost=args.escape_cost, defect_rate=args.defect_rate, target_recall=args.target_recall,
                               symmetry=symmetry, seed=getattr(args, "seed", 0))


RUNTIMES = ("auto", "onnx", "torch")  # export.runtime.RUNTIMES, written out so --help never imports torch (tests check they agree)


OVERLAYS = ("all", "rejected", "none")  # batch.outputs.OVERLAY_MODES, written out for the same reason


def add_overlay_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overlays", choices=OVERLAYS, default="all", help=(
        "heat-map overlays to write: for every image, only for the images not judged good (rejected, and any an "
        "uncalibrated model gives no verdict for; what a person looks at on a line, at near the speed of none), "
        "or none (default: all)"))
    parser.add_argument("--no-overlay", dest="overlays", action="store_const", const="none", help="the same as --overlays none")


def add_runtime_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto", help=(
        "what scores a .dlens model: auto runs it in ONNX Runtime when its graphs match PyTorch there (checked at load, "
        "graphs cached beside the model), else PyTorch, and says which; onnx insists; torch keeps PyTorch (default: auto)"))
