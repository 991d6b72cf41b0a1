"""One self-contained model file: settings, learned state, calibration, versions, checksums.

A bundle is a zip of ``manifest.json`` and ``.npy`` arrays (no pickle: loading a bundle never
runs code). The backbone's weights travel inside it, so an inspection PC needs no weight
package. Saving writes a temporary file and renames it, so a crash never leaves a half-written
bundle in place of a good one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from defectlens._version import __version__
from defectlens.calibration.defect_types import DefectTyper
from defectlens.calibration.record import Calibration
from defectlens.detectors import Detector, create_detector
from defectlens.errors import BundleError, DefectLensError
from defectlens.jsonutil import finite

FORMAT = "defectlens-bundle"
FORMAT_VERSION = 1
_TYPER_PREFIX = "typer."  # defect-typing arrays live beside the detector's, under this prefix
SUFFIX = ".dlens"


def library_versions() -> dict[str, str]:
    import faiss
    import sklearn
    import torch

    return {
        "defectlens": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "scikit-learn": sklearn.__version__,
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return _sha256(json.dumps(body, sort_keys=True).encode())


@dataclass
class Bundle:
    detector: Detector
    calibration: Calibration | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    typer: DefectTyper | None = None  # learned from labelled defects, when the user had some
    checksum: str = ""  # set on save and load: identifies exactly this model in records
    # how it scores once loaded: inference.load_model sets an export.runtime.RuntimeChoice (typed
    # loosely because the runtime is built from bundles, a layer above this one); not saved
    runtime: Any = field(default=None, compare=False)
    # the machine's measured thread and batch settings it runs with (an inference.tuning.Tuning), or None; not saved
    tuning: Any = field(default=None, compare=False)

    def save(self, path: str | os.PathLike, exclusive: bool = False) -> Path:
        """Write the bundle; ``exclusive`` refuses (FileExistsError) to replace a file already there,
        atomically, so two writers of a new model version can never overwrite each other."""
        path = Path(path)
        state = dict(self.detector.get_state())
        typer_meta = None
        if self.typer is not None:
            typer_arrays, typer_meta = self.typer.get_state()
            state.update({_TYPER_PREFIX + k: v for k, v in typer_arrays.items()})
        arrays: dict[str, dict] = {}
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
            for name, array in sorted(state.items()):
                raw = io.BytesIO()
                np.save(raw, np.ascontiguousarray(array), allow_pickle=False)
                data = raw.getvalue()
                member = f"arrays/{name}.npy"
                zf.writestr(member, data)
                arrays[name] = {"file": member, "sha256": _sha256(data)}
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": library_versions(),
                "detector": {"name": self.detector.name, "params": self.detector.get_params()},
                "calibration": finite(self.calibration.to_dict()) if self.calibration else None,
                "metadata": finite(self.metadata),
                "typer": finite(typer_meta),
                "arrays": arrays,
            }
            manifest["checksum"] = _manifest_checksum(manifest)
            zf.writestr("manifest.json", json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False))
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique sibling created like any other file (so the umask, not mkstemp's 0600, sets
        # its permissions and a service running as another user can read it), then renamed.
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "xb") as fh:
                fh.write(buffer.getvalue())
                fh.flush()
                os.fsync(fh.fileno())
            if exclusive:
                os.link(tmp, path)  # fails if the name exists, however close the other writer came
                tmp.unlink()
            else:
                os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.checksum = manifest["checksum"]
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Bundle:
        """A .dlens bundle (``defectlens.inference.load_model`` also opens .onnx exports)."""
        path = Path(path)
        if path.suffix.lower() == ".onnx":
            raise BundleError(f"{path}: an ONNX export, not a .dlens bundle (open it with defectlens.inference.load_model)")
        if not path.is_file():
            raise BundleError(f"{path}: model file not found")
        try:
            with zipfile.ZipFile(path) as zf:
                manifest = cls._read_manifest(zf, path)
                state = {}
                for name, info in manifest["arrays"].items():
                    data = zf.read(info["file"])
                    if _sha256(data) != info["sha256"]:
                        raise BundleError(f"{path}: damaged or altered (array '{name}' fails its checksum)")
                    state[name] = np.load(io.BytesIO(data), allow_pickle=False)
        except BundleError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{path}: not a DefectLens model, or truncated/damaged ({type(exc).__name__})") from None
        spec = manifest["detector"]
        typer_arrays = {k[len(_TYPER_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(_TYPER_PREFIX)}
        try:
            detector = create_detector(spec["name"], **spec["params"]).set_state(state)
            calibration = Calibration.from_dict(manifest["calibration"]) if manifest.get("calibration") else None
            typer = DefectTyper().set_state(typer_arrays, manifest["typer"]) if manifest.get("typer") else None
        except (DefectLensError, KeyError) as exc:
            raise BundleError(f"{path}: {exc}") from None
        return cls(detector, calibration, manifest.get("metadata", {}), typer, manifest["checksum"])

    @staticmethod
    def _read_manifest(zf: zipfile.ZipFile, path: Path) -> dict:
        try:
            manifest = json.loads(zf.read("manifest.json"))
        except KeyError:
            raise BundleError(f"{path}: not a DefectLens model (no manifest)") from None
        except json.JSONDecodeError:
            raise BundleError(f"{path}: damaged model (manifest is not valid JSON)") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{path}: not a DefectLens model (format {manifest.get('format')!r})")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            made_by = manifest.get("versions", {}).get("defectlens", "?")
            raise BundleError(
                f"{path}: bundle format v{version} (made by DefectLens {made_by}) but this DefectLens "
                f"{__version__} reads v{FORMAT_VERSION}: refit, or use a matching version"
            )
        if manifest.get("checksum") != _manifest_checksum(manifest):
            raise BundleError(f"{path}: damaged or altered (manifest fails its checksum)")
        return manifest
