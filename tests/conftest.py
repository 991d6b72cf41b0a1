"""Shared fixtures: small data made by the tests themselves, and the optional real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from defectlens.data.synthetic import make_synthetic_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def shared_category(relative: str) -> Path:
    """A real data set category from ../shared, or skip the test cleanly when it is absent."""
    path = SHARED / relative
    if not (path / "train" / "good").is_dir():
        pytest.skip(f"real data set not available: {path}")
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small generated MVTec-layout category (64 px discs with scratches and spots)."""
    root = tmp_path_factory.mktemp("data")
    return make_synthetic_dataset(root, n_train=16, n_test_good=4, n_test_defect=4, size=64, seed=1)
