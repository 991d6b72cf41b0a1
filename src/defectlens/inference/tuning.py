"""Threads, batch size and decoding threads as measured on this machine, applied where a model loads.

The defaults (as many threads as cores, PatchCore's batch of 2, two decoding threads) were chosen
on one 2-core machine. The best setting depends on the cores, their caches and memory bandwidth,
and on the model: a batch that stays in cache on one CPU spills on another, and decoding threads
steal cores from the backbone on a small machine. So ``defectlens benchmark DATA --tune`` measures
them once per machine and stores the winner in :func:`tuning_file`; ``inspect``, ``evaluate``,
``watch`` and ``serve`` load it through :func:`defectlens.inference.loading.load_model`. A tuning
measured on another CPU, or with another number of usable cores, is ignored. The settings change
speed only: scores are the same to float rounding whatever the batch and thread counts.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from defectlens.errors import DefectLensError
from defectlens.machine import machine_key

TUNING_ENV = "DEFECTLENS_TUNING"  # the tuning file's path; "off" ignores any stored tuning


@dataclass(frozen=True)
class Tuning:
    """One machine's measured settings, and the figures that chose them."""

    threads: int  # intra-op threads of PyTorch and of ONNX Runtime's sessions
    batch_size: int  # images per forward pass
    decode_workers: int  # threads decoding images ahead of the model
    faiss_threads: int  # threads of PatchCore's nearest-neighbour search, where faiss runs it
    machine: str = field(default_factory=machine_key)
    measured: str = ""  # when, and with which model
    images_per_s: float = 0.0  # batched throughput at these settings
    default_images_per_s: float = 0.0  # at the untuned defaults, in the same run

    def line(self) -> str:
        gain = f", {self.images_per_s / self.default_images_per_s:.2f}x the defaults" if self.default_images_per_s else ""
        return (f"tuned: {self.threads} threads, batch {self.batch_size}, {self.decode_workers} decoding threads, "
                f"{self.faiss_threads} search threads (benchmark --tune, {self.measured}{gain})")


def tuning_file() -> Path | None:
    """Where the tuning is kept: ``$DEFECTLENS_TUNING``, else the user's cache folder; None when off."""
    given = os.environ.get(TUNING_ENV, "")
    if given.lower() == "off":
        return None
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "defectlens" / "tuning.json"


def stored_tuning(path: Path | None = None) -> tuple[Tuning | None, str]:
    """The stored tuning for this machine, or None and why not (nothing stored, or tuning switched
    off, is no reason to speak of)."""
    path = path or tuning_file()
    if path is None:
        return None, ""
    if not path.is_file():
        return None, ""
    try:
        raw = json.loads(path.read_text())
        tuning = Tuning(**{f.name: raw[f.name] for f in fields(Tuning) if f.name in raw})
        if min(tuning.threads, tuning.batch_size, tuning.decode_workers, tuning.faiss_threads) < 1:
            raise ValueError("a setting below 1")
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        return None, f"{path}: not a tuning file ({exc}); run defectlens benchmark DATA --tune again"
    if tuning.machine != machine_key():
        return None, f"{path}: measured on another machine ({tuning.machine}); run defectlens benchmark DATA --tune here"
    return tuning, ""


def save_tuning(tuning: Tuning, path: Path | None = None) -> Path:
    """Write the tuning whole or not at all: a service starting meanwhile reads the old one or the new."""
    path = path or tuning_file()
    if path is None:
        raise DefectLensError(f"{TUNING_ENV}=off: set it to a file path to store a tuning")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(asdict(tuning), indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def apply_threads(threads: int, faiss_threads: int) -> None:
    """Set the process's thread counts. Before a model's ONNX Runtime sessions are made: they take
    PyTorch's count when they are created."""
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(faiss_threads)


__all__ = ["TUNING_ENV", "Tuning", "apply_threads", "save_tuning", "stored_tuning", "tuning_file"]
