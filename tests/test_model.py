"""The network: readout shapes, safe .keras round trip, and output[:, -1] == state_h exactly."""

from pathlib import Path

import keras
import numpy as np
import pytest

from pipeline.model import build_model, readout_gap, score
from pipeline.params import CELL_READOUTS

CASES = [(cell, readout) for cell, readouts in CELL_READOUTS.items() for readout in readouts]


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).random((6, 9, 5), dtype=np.float32)


@pytest.mark.parametrize(("cell", "readout"), CASES)
def test_every_readout_gives_ten_logits_and_survives_a_safe_reload(
    cell: str, readout: str, x: np.ndarray, tmp_path: Path
) -> None:
    keras.utils.set_random_seed(1)
    model = build_model(9, 5, cell, readout, input_units=8, units=7)
    # The readout feeds Dense(10) with one vector of `units` per sequence.
    assert model.get_layer("logits").input.shape == (None, 7)
    logits = np.asarray(model(x))  # called, not predict(): no function to trace
    assert logits.shape == (6, 10)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_array_equal(np.asarray(again(x)), logits)


def probe_states(model: keras.Model, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """(sequence, h, c) of the model's trained LSTM layer, recomputed by a fresh LSTM."""
    rnn = model.get_layer("rnn")
    probe = keras.layers.LSTM(rnn.units, return_sequences=True, return_state=True)
    projected = model.get_layer("input_projection")(x)
    probe.build(projected.shape)
    probe.set_weights(rnn.get_weights())
    return tuple(np.asarray(t) for t in probe(projected))


def features(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """What the readout hands to the classifier: the input of the `logits` layer."""
    return np.asarray(keras.Model(model.input, model.get_layer("logits").input)(x))


@pytest.mark.parametrize(
    ("readout", "expected"),
    [
        ("state_h", lambda seq, h, c: h),
        ("state_c", lambda seq, h, c: c),
        ("output_last", lambda seq, h, c: seq[:, -1]),
        ("output_mean", lambda seq, h, c: seq.mean(axis=1)),
    ],
)
def test_a_trained_model_reads_out_the_vector_its_readout_names(
    readout: str, expected, x: np.ndarray
) -> None:
    keras.utils.set_random_seed(1)
    model = build_model(9, 5, "lstm", readout, input_units=8, units=7)
    loss = keras.losses.SparseCategoricalCrossentropy(True)
    model.compile(keras.optimizers.Adam(0.05), loss, run_eagerly=True)  # 5 steps: no tracing
    model.fit(x, np.arange(6) % 3, epochs=5, verbose=0)  # trained: c has grown apart from h
    seq, h, c = probe_states(model, x)
    np.testing.assert_allclose(features(model, x), expected(seq, h, c), rtol=1e-5, atol=1e-6)
    assert np.abs(h - c).max() > 0.1  # so state_h and state_c are really different vectors


@pytest.mark.parametrize("cell", list(CELL_READOUTS))
def test_output_last_equals_state_h_exactly(cell: str, x: np.ndarray) -> None:
    keras.utils.set_random_seed(2)
    model = build_model(9, 5, cell, "state_h", input_units=8, units=7)
    assert readout_gap(model, x, batch_size=4) == 0.0


def test_same_seed_gives_identical_weights_for_state_h_and_output_last() -> None:
    weights = []
    for readout in ("state_h", "output_last"):
        keras.utils.set_random_seed(3)
        weights.append(build_model(28, 28, "lstm", readout, 16, 16).get_weights())
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_score_matches_keras_loss_and_accuracy(x: np.ndarray) -> None:
    keras.utils.set_random_seed(4)
    model = build_model(9, 5, "gru", "state_h", 8, 7)
    y = np.array([0, 1, 2, 3, 4, 5], np.int32)
    loss, accuracy, predicted = score(model, x, y)
    logits = model.predict(x, verbose=0)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    assert loss == pytest.approx(float(expected), rel=1e-5)
    np.testing.assert_array_equal(predicted, logits.argmax(axis=1))
    assert accuracy == pytest.approx(float((predicted == y).mean()))
