"""The fast training path computes the same logits and gradients as the stock Keras model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import fastrnn
from pipeline.model import CELLS, build_model
from pipeline.params import CELL_READOUTS


def logits_and_grads(model: keras.Model, forward, x: np.ndarray) -> list[np.ndarray]:
    weights = tf.range(10, dtype=tf.float32) - 4.5  # a loss that weighs every logit differently
    with tf.GradientTape() as tape:
        logits = forward(tf.constant(x))
        loss = tf.reduce_sum(tf.tanh(logits) * weights)
    grads = tape.gradient(loss, model.trainable_variables)
    return [logits.numpy(), *(g.numpy() for g in grads)]


def perturbed_model(steps: int, readout: str, cell: str = "lstm") -> keras.Model:
    keras.utils.set_random_seed(3)
    model = build_model(steps, 5, cell, readout, input_units=8, units=7)
    rng = np.random.default_rng(4)  # nonzero biases, so that every bias path is exercised
    model.set_weights(
        [w + rng.normal(0, 0.3, w.shape).astype(w.dtype) for w in model.get_weights()]
    )
    return model


CELL_AND_READOUT = [(c, r) for c, readouts in CELL_READOUTS.items() for r in readouts]
# Every cell and readout in both loop forms (6 steps unrolled, or a while_loop when UNROLL_MAX is
# 3); the batch alternates between uneven halves (7) and an empty half (1), so that every pair of
# these meets (each readout with each loop form and each batch): 20 cases, not all 40. Each one
# traces TensorFlow graphs (a second or two): the quick loop keeps the unrolled form of every
# readout and the while_loop of each cell's first; the full suite runs all 20.
EQUIVALENCE = [
    pytest.param(
        cell,
        readout,
        unroll_max,
        batch,
        id=f"{batch}-{form}-{cell}-{readout}",
        marks=[pytest.mark.slow] * (form == "while_loop" and readout != CELL_READOUTS[cell][0]),
    )
    for i, (cell, readout) in enumerate(CELL_AND_READOUT)
    for form, unroll_max, batch in [
        ("unrolled", 64, (7, 1)[i % 2]),
        ("while_loop", 3, (1, 7)[i % 2]),
    ]
]
SLOW = pytest.mark.slow


@pytest.mark.parametrize(("cell", "readout", "unroll_max", "batch"), EQUIVALENCE)
def test_same_logits_and_gradients_as_the_keras_model(
    cell: str, readout: str, unroll_max: int, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fastrnn, "UNROLL_MAX", unroll_max)
    steps = 6
    model = perturbed_model(steps, readout, cell)
    x = np.random.default_rng(5).normal(size=(batch, steps, 5)).astype(np.float32)
    assert fastrnn.supports(model)
    fast = logits_and_grads(model, tf.function(fastrnn.logits_fn(model, readout)), x)
    stock = logits_and_grads(model, lambda t: model(t, training=True), x)
    names = ["logits", *(v.path for v in model.trainable_variables)]
    for name, a, b in zip(names, fast, stock, strict=True):
        assert a.shape == b.shape, name
        # float32 rounding: the two compute the same sums in a different order
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("cell", CELL_READOUTS)
def test_is_deterministic(cell: str) -> None:
    model = perturbed_model(6, "state_h", cell)
    x = np.random.default_rng(6).normal(size=(9, 6, 5)).astype(np.float32)
    forward = tf.function(fastrnn.logits_fn(model, "state_h"))
    first, second = (logits_and_grads(model, forward, x) for _ in range(2))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("cell", "setting"),
    [
        ("lstm", {"recurrent_activation": "hard_sigmoid"}),
        ("gru", {"reset_after": False}),
        ("simple_rnn", {"activation": "relu"}),
        ("simple_rnn", {"use_bias": False}),
    ],
)
def test_a_changed_cell_setting_falls_back_to_the_model_itself(cell: str, setting: dict) -> None:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 5))
    x = keras.layers.Dense(8, name="input_projection")(inputs)
    x = CELLS[cell](7, name="rnn", **setting)(x)
    model = keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))
    assert not fastrnn.supports(model)
    x = np.random.default_rng(7).normal(size=(3, 6, 5)).astype(np.float32)
    np.testing.assert_array_equal(fastrnn.logits_fn(model, "state_h")(x), model(x, training=True))


@pytest.mark.parametrize("chunk", [2, pytest.param(1, marks=SLOW), pytest.param(4, marks=SLOW)])
@pytest.mark.parametrize(
    ("cell", "readout"), [("lstm", "state_c"), ("gru", "state_h"), ("simple_rnn", "state_h")]
)
def test_state_carried_across_chunks_is_the_full_sequence_state(
    chunk: int, cell: str, readout: str
) -> None:
    model = perturbed_model(8, readout, cell)
    x = tf.constant(np.random.default_rng(8).normal(size=(5, 8, 5)).astype(np.float32))
    run = fastrnn.stateful_fn(model, readout)
    zeros = [tf.zeros([5, 7])] * fastrnn.n_states(model)
    state = zeros
    for start in range(0, 8, chunk):  # training off: a plain forward pass, chunk by chunk
        logits, *state = run(x[:, start : start + chunk], *state)
    full_logits, *full_state = run(x, *zeros)
    for a, b in zip(state, full_state, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, full_logits, rtol=1e-5, atol=1e-6)
    # and the state is Keras's own: the model's logits come from h_T (c_T for state_c)
    np.testing.assert_allclose(logits, model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # three traced train steps per cell (6 s); the chunked forward pass is above
@pytest.mark.parametrize("cell", list(CELL_READOUTS))
def test_tbptt_takes_one_adam_step_per_chunk_and_starts_each_batch_from_zeros(cell: str) -> None:
    x = np.random.default_rng(9).normal(size=(6, 5, 5)).astype(np.float32)  # 5 steps: less to trace
    y = np.arange(6, dtype=np.int32) % 10
    results = {}
    for k in (3, 5, None):  # chunks of 3 and 2 steps; one chunk as long as the sequence; off
        model = perturbed_model(5, "state_h", cell)
        optimizer = keras.optimizers.Adam(1e-3)
        step = fastrnn.make_train_step(model, optimizer, "state_h", tbptt_steps=k)
        losses = [float(step(x, y)[0]) for _ in range(2)]
        results[k] = (int(optimizer.iterations), losses, model.get_weights())
    assert results[3][0] == 4  # 2 batches x 2 chunks
    assert results[5][0] == results[None][0] == 2
    for a, b in zip(results[5][2], results[None][2], strict=True):
        np.testing.assert_array_equal(a, b)  # k >= T is plain BPTT, bit for bit
    assert not np.allclose(results[3][2][0], results[None][2][0])
    assert all(np.isfinite(results[3][1]))
