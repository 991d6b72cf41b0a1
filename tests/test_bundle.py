from __future__ import annotations

import json
import os
import stat
import zipfile

import pytest

from defectlens import Bundle, create_detector
from defectlens.bundle import FORMAT_VERSION
from defectlens.data import load_dataset
from defectlens.errors import BundleError
from defectlens.workflows import calibrate_detector


@pytest.fixture(scope="module")
def saved(tiny_dataset, tmp_path_factory):
    ds = load_dataset(tiny_dataset, validation_fraction=0.2)
    det = create_detector("patchcore", image_size=64, coreset_ratio=0.1).fit(ds.train_good)
    path = calibrate_detector(det, ds.validation, metadata={"name": "tiny"}).save(tmp_path_factory.mktemp("m") / "tiny.dlens")
    return path


def _rewrite(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, edit(item.filename, zin.read(item.filename)))


def test_manifest_records_versions_and_settings(saved):
    with zipfile.ZipFile(saved) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        names = zf.namelist()
    assert manifest["format_version"] == FORMAT_VERSION
    assert {"defectlens", "torch", "numpy", "faiss"} <= set(manifest["versions"])
    assert manifest["detector"]["params"]["image_size"] == 64
    assert manifest["calibration"]["image_threshold"] > 0
    assert not [n for n in names if n.endswith((".pkl", ".pt"))], "no pickle in bundles"
    assert Bundle.load(saved).checksum == manifest["checksum"]


def test_saved_file_has_normal_permissions(saved):
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o666 & ~umask


def test_altered_array_is_refused(saved, tmp_path):
    bad = tmp_path / "bad.dlens"

    def flip(name, data):
        return data[:-1] + bytes([data[-1] ^ 1]) if name == "arrays/memory_bank.npy" else data

    _rewrite(saved, bad, flip)
    with pytest.raises(BundleError, match="memory_bank"):
        Bundle.load(bad)


def test_altered_manifest_is_refused(saved, tmp_path):
    bad = tmp_path / "bad.dlens"

    def edit(name, data):
        if name != "manifest.json":
            return data
        manifest = json.loads(data)
        manifest["calibration"]["image_threshold"] = 1e9
        return json.dumps(manifest).encode()

    _rewrite(saved, bad, edit)
    with pytest.raises(BundleError, match="manifest fails its checksum"):
        Bundle.load(bad)


def test_truncated_wrong_version_and_foreign_files(saved, tmp_path):
    data = saved.read_bytes()
    (tmp_path / "trunc.dlens").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated"):
        Bundle.load(tmp_path / "trunc.dlens")

    def bump(name, raw):
        if name != "manifest.json":
            return raw
        manifest = json.loads(raw)
        manifest["format_version"] = FORMAT_VERSION + 1
        return json.dumps(manifest).encode()

    _rewrite(saved, tmp_path / "future.dlens", bump)
    with pytest.raises(BundleError, match=f"format v{FORMAT_VERSION + 1}"):
        Bundle.load(tmp_path / "future.dlens")
    (tmp_path / "img.dlens").write_bytes(b"\x89PNG not a model")
    with pytest.raises(BundleError, match="not a DefectLens model"):
        Bundle.load(tmp_path / "img.dlens")
    with pytest.raises(BundleError, match="not found"):
        Bundle.load(tmp_path / "absent.dlens")


def test_failed_save_keeps_the_old_file(saved, tmp_path, monkeypatch):
    target = tmp_path / "keep.dlens"
    target.write_bytes(saved.read_bytes())
    bundle = Bundle.load(target)

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr("defectlens.bundle.os.replace", boom)
    with pytest.raises(OSError):
        bundle.save(target)
    assert target.read_bytes() == saved.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["keep.dlens"]  # no temp file left behind
