"""The blog post's network in Keras 3: per-step Dense -> recurrent layer -> readout -> Dense(10) logits.

Only built-in layers, so the saved .keras model loads in safe mode and through mlflow.pyfunc.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.stage import DataError
from pipeline.tf import keras

CELLS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "simple_rnn": keras.layers.SimpleRNN}
# What each readout reads from the recurrent layer: a final state (0 = h, 1 = c) or the output
# sequence (its last step or its mean). The one place that says it; fastrnn reads it too.
READOUTS: dict[str, tuple[str, int | str]] = {
    "state_h": ("state", 0),  # the blog post's state[1]
    "state_c": ("state", 1),  # LSTM only
    "output_last": ("output", "last"),  # output[:, -1]
    "output_mean": ("output", "mean"),
}


def build_model(
    steps: int,
    features: int,
    cell: str,
    readout: str,
    input_units: int,
    units: int,
    unit_forget_bias: bool = True,
) -> keras.Model:
    inputs = keras.Input((steps, features), name="sequence")
    # The post's tf.layers.dense(x, n_cell): linear, applied to every step alike.
    x = keras.layers.Dense(input_units, name="input_projection")(inputs)
    options = {"unit_forget_bias": unit_forget_bias} if cell == "lstm" else {}
    kind, which = READOUTS[readout]
    rnn = CELLS[cell](
        units,
        return_sequences=kind == "output",
        return_state=kind == "state",
        name="rnn",
        **options,
    )
    if kind == "state":
        _, *states = rnn(x)  # LSTM returns [output, h, c]; GRU and SimpleRNN [output, h]
        features_out = states[which]
    elif which == "last":
        sequence = rnn(x)  # [batch, steps, units]
        last = keras.layers.Cropping1D((steps - 1, 0), name="last_step")(sequence)
        features_out = keras.layers.Flatten(name="output_last")(last)
    else:
        sequence = rnn(x)
        features_out = keras.layers.GlobalAveragePooling1D(name="output_mean")(sequence)
    logits = keras.layers.Dense(10, name="logits")(features_out)
    return keras.Model(inputs, logits, name=f"{cell}_{readout}")


def score(model: keras.Model, x: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mean cross-entropy, accuracy and predicted classes of the model on (x, y)."""
    logits = model.predict(x, batch_size=1024, verbose=0).astype(np.float64)
    log_probs = keras.ops.convert_to_numpy(keras.ops.log_softmax(logits, axis=1))  # in float64
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    predicted = logits.argmax(axis=1)
    return loss, float((predicted == y).mean()), predicted


def readout_gap(model: keras.Model, x: np.ndarray, batch_size: int = 1000) -> float:
    """max |output[:, -1] - state_h| of the model's recurrent layer on inputs x.

    Rebuilds the trained layer so that it returns both, with the same weights, and compares.
    """
    trained = model.get_layer("rnn")
    probe = type(trained).from_config(
        {**trained.get_config(), "return_sequences": True, "return_state": True}
    )
    project = model.get_layer("input_projection")
    gap = 0.0
    for i in range(0, len(x), batch_size):
        projected = project(x[i : i + batch_size])
        if not probe.built:
            probe.build(projected.shape)
            probe.set_weights(trained.get_weights())
        sequence, h, *_ = probe(projected)
        gap = max(gap, float(keras.ops.max(keras.ops.abs(sequence[:, -1] - h))))
    return gap


def load_model(path: Path) -> keras.Model:
    """A saved .keras model, in safe mode (no code from the file runs)."""
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot be loaded ({exc})") from None
