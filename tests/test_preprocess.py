"""Sequence orders put each pixel where it should be; the validation split is stratified."""

import subprocess
import sys

import numpy as np
import pytest

from pipeline.packaging import permutation
from pipeline.preprocess import stratified_split, to_sequences


@pytest.fixture
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)


def test_rows_step_t_reads_row_t(images: np.ndarray) -> None:
    x = to_sequences(images, "rows", seed=0)
    assert x.shape == (5, 28, 28) and x.dtype == np.float32
    assert x[3, 7, 19] == np.float32(images[3, 7, 19]) / np.float32(255)  # row 7, column 19


def test_columns_step_t_reads_column_t(images: np.ndarray) -> None:
    x = to_sequences(images, "columns", seed=0)
    assert x.shape == (5, 28, 28)
    assert x[3, 19, 7] == np.float32(images[3, 7, 19]) / np.float32(255)


def test_pixels_is_row_major_one_pixel_per_step(images: np.ndarray) -> None:
    x = to_sequences(images, "pixels", seed=0)
    assert x.shape == (5, 784, 1)
    assert x[3, 7 * 28 + 19, 0] == np.float32(images[3, 7, 19]) / np.float32(255)


def test_permuted_pixels_uses_one_fixed_permutation_from_the_seed(images: np.ndarray) -> None:
    perm = permutation(seed=7)
    assert sorted(perm) == list(range(784))
    assert not np.array_equal(perm, np.arange(784))
    np.testing.assert_array_equal(perm, permutation(seed=7))
    assert not np.array_equal(perm, permutation(seed=8))
    x = to_sequences(images, "permuted_pixels", seed=7)
    flat = to_sequences(images, "pixels", seed=7)
    assert x.shape == (5, 784, 1)
    t = 100  # step t reads pixel perm[t] of every image
    np.testing.assert_array_equal(x[:, t, 0], flat[:, perm[t], 0])


def test_values_are_scaled_to_the_unit_interval() -> None:
    images = np.zeros((2, 28, 28), np.uint8)
    images[1] = 255
    x = to_sequences(images, "rows", seed=0)
    assert x.min() == 0.0 and x.max() == 1.0


def test_stratified_split_keeps_class_shares_and_is_deterministic() -> None:
    y = np.repeat(np.arange(10), [100, 200, 100, 100, 100, 100, 100, 100, 100, 50])
    train, val = stratified_split(y, 0.1, seed=3)
    assert len(np.intersect1d(train, val)) == 0
    assert len(train) + len(val) == len(y)
    counts = np.bincount(y[val], minlength=10)
    assert counts[0] == 10 and counts[1] == 20 and counts[9] == 5
    again_train, again_val = stratified_split(y, 0.1, seed=3)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert not np.array_equal(val, stratified_split(y, 0.1, seed=4)[1])


def test_preprocess_imports_neither_tensorflow_nor_mlflow() -> None:
    """It shares sequence_index with the served model's packaging, which imports both lazily."""
    heavy = "{'tensorflow', 'keras', 'mlflow'}"
    probe = f"import sys, pipeline.preprocess; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
