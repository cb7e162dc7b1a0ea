"""The served model reads images as preprocess made the training sequences, for every order, and
predicts exactly what evaluate scores."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest

from pipeline.image_model import ImageClassifier
from pipeline.model import build_model, score
from pipeline.packaging import sequence_index
from pipeline.preprocess import to_sequences


def served(tmp_path: Path, order: str, seed: int = 7) -> tuple[ImageClassifier, keras.Model]:
    """An ImageClassifier over a small untrained network, loaded as MLflow would load it."""
    index = sequence_index(order, seed)
    keras.utils.set_random_seed(seed)
    network = build_model(*index.shape, "gru", "state_h", input_units=6, units=5)
    network.save(tmp_path / "model.keras")
    (tmp_path / "sequence.json").write_text(json.dumps({"index": index.tolist()}))
    artifacts = {
        "network": str(tmp_path / "model.keras"),
        "sequence": str(tmp_path / "sequence.json"),
    }
    model = ImageClassifier()
    model.load_context(SimpleNamespace(artifacts=artifacts))
    return model, network


@pytest.mark.parametrize("order", ["rows", "columns", "pixels", "permuted_pixels"])
def test_predicts_what_evaluate_scores_on_the_sequences(tmp_path: Path, order: str) -> None:
    images = np.random.default_rng(1).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = np.arange(40) % 10
    model, network = served(tmp_path, order)
    out = model.predict(None, images.astype(np.float32))
    _, accuracy, predicted = score(network, to_sequences(images, order, seed=7), labels)
    np.testing.assert_array_equal(out["class"], predicted)
    assert float(np.mean(out["class"] == labels)) == accuracy
    assert out["probabilities"].shape == (40, 10)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1, rtol=1e-5)


def test_pixel_values_0_to_1_and_0_to_255_give_the_same_answer(tmp_path: Path) -> None:
    images = np.random.default_rng(2).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    model, _ = served(tmp_path, "permuted_pixels")
    as_255 = model.predict(None, images.astype(np.float32))
    as_1 = model.predict(None, images.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(as_255["probabilities"], as_1["probabilities"])
    single = model.predict(None, images[0].astype(np.float32))  # one image [28, 28]
    np.testing.assert_array_equal(single["class"], as_255["class"][:1])


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((2, 28, 27), np.float32), r"shape \[N, 28, 28\], got \[2, 28, 27\]"),
        (np.full((1, 28, 28), 300, np.float32), "0-255"),
        (np.full((1, 28, 28), -1, np.float32), "0-255"),
    ],
)
def test_bad_images_are_refused(tmp_path: Path, images: np.ndarray, message: str) -> None:
    model, _ = served(tmp_path, "rows")
    with pytest.raises(ValueError, match=message):
        model.predict(None, images)
