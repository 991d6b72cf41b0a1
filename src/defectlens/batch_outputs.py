"""Where a batch of inspections goes: JSON lines, a CSV summary, overlays, maps, statistics.

Files are written as results arrive, so a run over a huge folder keeps memory flat and a
crash keeps everything inspected up to it. Statistics keep only score lists per group.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from types import TracebackType

import numpy as np

from .data.images import load_rgb
from .errors import ImageError
from .inspection import Inspection
from .jsonutil import finite
from .overlay import save_overlay

CSV_COLUMNS = ["source", "verdict", "score", "normalised_score", "confidence", "severity", "regions", "max_region_area_px",
               "max_region_area_pct", "main_type", "total_ms", "decode_ms", "backbone_ms", "search_ms", "postprocess_ms",
               "decide_ms", "error"]


def score_stats(scores: list[float]) -> dict:
    a = np.asarray(scores, dtype=np.float64)
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "max": float(a.max()),
            "p90": float(np.percentile(a, 90))}


def base_record(path: Path, result: Inspection | ImageError) -> dict:
    """The JSON record of one image: its inspection, or the reason it could not be read."""
    if isinstance(result, ImageError):
        return {"source": str(path), "error": str(result)}
    return result.to_record()


def csv_row(source: str, result: Inspection | ImageError) -> dict:
    if isinstance(result, ImageError):
        return {"source": source, "verdict": "error", "error": str(result)}
    biggest = max(result.regions, key=lambda r: r.area_px, default=None)
    t = result.timings_ms
    return {
        "source": source, "verdict": result.verdict, "score": f"{result.score:.6f}",
        "normalised_score": "" if result.normalised_score is None else f"{result.normalised_score:.4f}",
        "confidence": "" if result.confidence is None else f"{result.confidence:.4f}",
        "severity": f"{result.severity:.4f}", "regions": len(result.regions),
        "max_region_area_px": biggest.area_px if biggest else 0, "max_region_area_pct": f"{biggest.area_pct:.4f}" if biggest else "0",
        "main_type": biggest.defect_type if biggest else "", "total_ms": f"{sum(t.values()):.2f}",
        **{f"{k}_ms": f"{t[k]:.2f}" for k in ("decode", "backbone", "search", "postprocess", "decide") if k in t}, "error": "",
    }


class BatchWriter:
    """results.jsonl + summary.csv (+ overlays/, maps/) as results come, stats.json at the end."""

    def __init__(self, out: Path, overlays: bool = True, save_maps: bool = False, pixel_threshold: float | None = None) -> None:
        self.out = Path(out)
        self.overlays = overlays
        self.save_maps = save_maps
        self.pixel_threshold = pixel_threshold
        self._used: set[str] = set()
        self._groups: dict[str, dict[str, list[float]]] = {"verdict": defaultdict(list), "type": defaultdict(list), "folder": defaultdict(list)}

    def __enter__(self) -> BatchWriter:
        self.out.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.out / "results.jsonl", "w")  # noqa: SIM115 -- closed in __exit__
        self._csv_file = open(self.out / "summary.csv", "w", newline="")  # noqa: SIM115
        self._csv = csv.DictWriter(self._csv_file, CSV_COLUMNS)
        self._csv.writeheader()
        return self

    def _name(self, path: Path) -> str:
        name = f"{path.parent.name}_{path.stem}"  # test/<type>/000.png -> <type>_000: unique within MVTec folders
        base, n = name, 1
        while name in self._used:
            n += 1
            name = f"{base}-{n}"
        self._used.add(name)
        return name

    def write(self, path: Path, result: Inspection | ImageError) -> dict:
        record = base_record(path, result)
        if not isinstance(result, ImageError):
            name = self._name(path) if (self.overlays or self.save_maps) else ""
            if self.overlays:
                record["overlay"] = str(save_overlay(self.out / "overlays" / f"{name}.png", load_rgb(path), result, self.pixel_threshold))
            if self.save_maps:
                (self.out / "maps").mkdir(exist_ok=True)
                map_path = self.out / "maps" / f"{name}.npy"
                np.save(map_path, result.anomaly_map.astype(np.float16))  # 3 significant digits: ample for a heat map
                record["map"] = str(map_path)
            self._groups["verdict"][result.verdict].append(result.score)
            self._groups["folder"][path.parent.name].append(result.score)
            main = max(result.regions, key=lambda r: r.area_px, default=None)
            self._groups["type"][main.defect_type if main else "(no region)"].append(result.score)
        self._jsonl.write(json.dumps(finite(record)) + "\n")
        self._jsonl.flush()
        self._csv.writerow(csv_row(str(path), result))
        return record

    def stats(self) -> dict:
        return {f"by_{key}": {g: score_stats(v) for g, v in sorted(groups.items())} for key, groups in self._groups.items()}

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._jsonl.close()
        self._csv_file.close()
        (self.out / "stats.json").write_text(json.dumps(finite(self.stats()), indent=2))
