"""The training path: the same function as model(x), computed faster on a CPU, for all three cells.

make_train_step() (one Adam step on a batch, optionally in TBPTT chunks) uses logits_fn(model,
readout) in place of model(x); the model itself stays the stock Keras one of model.py, so what is
saved and served needs nothing from here. With the same weights the logits and the gradients
agree with model(x) to float32 rounding (tests/test_fastrnn.py). Why it is faster than Keras's LSTM, GRU and SimpleRNN layers
(benchmarks/RESULTS.md):
- The input projection and the cell's input kernel are both linear: x·Wp·K + (bp·K + b) is one
  matmul with the small product Wp·K, for all steps at once, before the recurrence.
- A hand-written gradient: only one matmul by Uᵀ runs step by step; the weight gradients are one
  large matmul each over all steps, and the gate derivatives are computed for all steps at once
  (step by step in the backward loop for long sequences such as pixels, to hold less memory).
- The batch runs as two independent half-batch recurrences, so that the small serial ops of one
  overlap those of the other on a second core.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

import numpy as np

from pipeline.model import READOUTS
from pipeline.tf import keras, tf

UNROLL_MAX = 64  # longer sequences run in a tf.while_loop instead of an unrolled graph


def _scan(
    fn: Callable[..., tuple[tuple, tuple]],
    carry: tuple[tf.Tensor, ...],
    xs: Sequence[tf.Tensor],
    widths: Sequence[int],
    reverse: bool = False,
) -> tuple[tuple[tf.Tensor, ...], list[tf.Tensor]]:
    """carry, outs_t = fn(carry, *xs[t]) over every step t (last to first if reverse).

    Returns the final carry and the outs stacked to [T, B, width]. Unrolled up to UNROLL_MAX steps.
    """
    steps = xs[0].shape[0]
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    if steps <= UNROLL_MAX:
        per_step = [tf.unstack(a) for a in xs]
        outs: list = [None] * steps
        for t in order:
            carry, outs[t] = fn(carry, *(a[t] for a in per_step))
        return carry, [tf.stack(seq) for seq in zip(*outs, strict=True)]

    def body(k: tf.Tensor, carry: tuple, arrays: list) -> tuple:
        t = steps - 1 - k if reverse else k
        carry, out = fn(carry, *(a[t] for a in xs))
        return k + 1, carry, [a.write(t, v) for a, v in zip(arrays, out, strict=True)]

    arrays = [tf.TensorArray(xs[0].dtype, size=steps, element_shape=[None, w]) for w in widths]
    _, carry, arrays = tf.while_loop(lambda k, *_: k < steps, body, (0, carry, arrays))
    return carry, [a.stack() for a in arrays]


def _project(x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """x [T, B, F] · kernel [F, N] + bias, as one matmul over all steps."""
    flat = tf.matmul(tf.reshape(x, [-1, tf.shape(x)[2]]), kernel) + bias
    return tf.reshape(flat, [x.shape[0], tf.shape(x)[1], kernel.shape[1]])


def _weight_grads(
    x: tf.Tensor, kernel: tf.Tensor, dz: tf.Tensor, h_prev: tf.Tensor, d_rec: tf.Tensor
) -> tuple[tf.Tensor, ...]:
    """d_x, d_kernel, d_bias from dz [T, B, N] (input side); d_u from d_rec (recurrent side)."""
    dz_flat = tf.reshape(dz, [-1, dz.shape[-1]])
    d_x = tf.reshape(tf.matmul(dz_flat, kernel, transpose_b=True), tf.shape(x))
    d_kernel = tf.matmul(tf.reshape(x, [-1, tf.shape(x)[2]]), dz_flat, transpose_a=True)
    h_flat = tf.reshape(h_prev, [-1, h_prev.shape[-1]])
    d_u = tf.matmul(h_flat, tf.reshape(d_rec, [-1, d_rec.shape[-1]]), transpose_a=True)
    return d_x, d_kernel, tf.reduce_sum(dz_flat, 0), d_u


def _lstm_local(
    s: tf.Tensor, g: tf.Tensor, c: tf.Tensor, c_prev: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """dc/dh, the local derivatives of the pre-activations i, f, o, c, and f (last axis gates).

    dz = [dc, dc, dh, dc] * local; the same for one step [B, .] or all steps [T, B, .].
    """
    i, f, o = tf.split(s, 3, axis=-1)
    tanh_c = tf.tanh(c)
    local = tf.concat(
        [g * i * (1.0 - i), c_prev * f * (1.0 - f), tanh_c * o * (1.0 - o), i * (1.0 - g * g)],
        axis=-1,
    )
    return o * (1.0 - tanh_c * tanh_c), local, f


@tf.custom_gradient
def lstm_sequence(
    x: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, kernel: tf.Tensor, u: tf.Tensor, bias: tf.Tensor
) -> tuple[tuple[tf.Tensor, tf.Tensor], Callable]:
    """All hidden and cell states [T, B, H] of an LSTM over time-major x [T, B, F].

    kernel [F, 4H], u [H, 4H] and bias [4H] hold the gates in the order i, f, o, c.
    """
    units = h0.shape[-1]

    def step(carry: tuple, xw_t: tf.Tensor) -> tuple[tuple, tuple]:
        h, c = carry
        z_sigmoid, z_tanh = tf.split(xw_t + tf.matmul(h, u), [3 * units, units], axis=1)
        s, g = tf.sigmoid(z_sigmoid), tf.tanh(z_tanh)  # s: the gates i, f, o
        i, f, o = tf.split(s, 3, axis=1)
        c = f * c + i * g
        h = o * tf.tanh(c)
        return (h, c), (h, c, s, g)

    widths = (units, units, 3 * units, units)
    _, (hs, cs, ss, gs) = _scan(step, (h0, c0), [_project(x, kernel, bias)], widths)

    def grad(d_hs: tf.Tensor | None, d_cs: tf.Tensor | None) -> tuple[tf.Tensor, ...]:
        d_hs = tf.zeros_like(hs) if d_hs is None else d_hs
        d_cs = tf.zeros_like(cs) if d_cs is None else d_cs
        c_prev = tf.concat([c0[None], cs[:-1]], 0)
        u_t = tf.transpose(u)

        def back(carry: tuple, d_h_t, d_c_t, dc_dh_t, local_t, f_t) -> tuple:
            dh, dc = carry
            dh = dh + d_h_t
            dc = dc + d_c_t + dh * dc_dh_t
            dz = tf.concat([dc, dc, dh, dc], 1) * local_t
            return (tf.matmul(dz, u_t), dc * f_t), (dz,)

        if hs.shape[0] <= UNROLL_MAX:
            # What does not depend on the incoming gradient, for all steps at once: fewer ops.
            xs = [d_hs, d_cs, *_lstm_local(ss, gs, cs, c_prev)]
            step_back = back
        else:
            # Long sequences: the same, step by step, so that it does not hold five more
            # [T, B, H] tensors (the pixel order's memory, benchmarks/RESULTS.md).
            xs = [d_hs, d_cs, ss, gs, cs, c_prev]

            def step_back(carry: tuple, d_h_t, d_c_t, *kept: tf.Tensor) -> tuple:
                return back(carry, d_h_t, d_c_t, *_lstm_local(*kept))

        carry = (tf.zeros_like(h0), tf.zeros_like(c0))
        (dh, dc), (dz,) = _scan(step_back, carry, xs, [4 * units], True)
        h_prev = tf.concat([h0[None], hs[:-1]], 0)
        d_x, d_kernel, d_bias, d_u = _weight_grads(x, kernel, dz, h_prev, dz)
        return d_x, dh, dc, d_kernel, d_u, d_bias

    return (hs, cs), grad


def _gru_local(
    z: tf.Tensor, r: tf.Tensor, hh: tf.Tensor, r_h: tf.Tensor, h_prev: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """The local derivatives of the GRU's pre-activations z, r, h: x·kernel side, h·u side.

    d(pre-activation) = [dh, dh, dh] * local; the same for one step [B, .] or all [T, B, .].
    """
    local_h = (1.0 - z) * (1.0 - hh * hh)
    local_z = (h_prev - hh) * z * (1.0 - z)
    local_r = local_h * r_h * r * (1.0 - r)
    return (
        tf.concat([local_z, local_r, local_h], axis=-1),
        tf.concat([local_z, local_r, local_h * r], axis=-1),
    )


@tf.custom_gradient
def gru_sequence(
    x: tf.Tensor, h0: tf.Tensor, kernel: tf.Tensor, u: tf.Tensor, bias: tf.Tensor, rbias: tf.Tensor
) -> tuple[tf.Tensor, Callable]:
    """All hidden states [T, B, H] of a Keras GRU (reset_after=True) over time-major x [T, B, F].

    kernel [F, 3H], u [H, 3H] and the input and recurrent biases [3H] in Keras's order z, r, h.
    """
    units = h0.shape[-1]

    def step(carry: tuple, xw_t: tf.Tensor) -> tuple[tuple, tuple]:
        (h,) = carry
        x_zr, x_h = tf.split(xw_t, [2 * units, units], axis=1)
        r_zr, r_h = tf.split(tf.matmul(h, u) + rbias, [2 * units, units], axis=1)
        z, r = tf.split(tf.sigmoid(x_zr + r_zr), 2, axis=1)
        hh = tf.tanh(x_h + r * r_h)
        h = z * h + (1.0 - z) * hh
        return (h,), (h, z, r, hh, r_h)

    widths = (units,) * 5
    _, (hs, zs, rs, hhs, r_hs) = _scan(step, (h0,), [_project(x, kernel, bias)], widths)

    def grad(d_hs: tf.Tensor) -> tuple[tf.Tensor, ...]:
        h_prev = tf.concat([h0[None], hs[:-1]], 0)
        u_t = tf.transpose(u)

        def back(carry: tuple, d_h_t: tf.Tensor, z_t: tf.Tensor, local_u_t: tf.Tensor) -> tuple:
            dh = carry[0] + d_h_t
            d_rec = tf.tile(dh, [1, 3]) * local_u_t
            return (dh * z_t + tf.matmul(d_rec, u_t),), (dh,)

        if hs.shape[0] <= UNROLL_MAX:  # local for all steps at once: fewer ops
            local_x, local_u = _gru_local(zs, rs, hhs, r_hs, h_prev)
            (dh0,), (dh,) = _scan(back, (tf.zeros_like(h0),), [d_hs, zs, local_u], [units], True)
            dh3 = tf.tile(dh, [1, 1, 3])
            d_in, d_rec = dh3 * local_x, dh3 * local_u
        else:
            # Long sequences: local step by step rather than held for all steps (the memory).
            def step_back(carry: tuple, d_h_t: tf.Tensor, z_t: tf.Tensor, *kept) -> tuple:
                local_x_t, local_u_t = _gru_local(z_t, *kept)
                dh = carry[0] + d_h_t
                dh3 = tf.tile(dh, [1, 3])
                d_rec = dh3 * local_u_t
                return (dh * z_t + tf.matmul(d_rec, u_t),), (dh3 * local_x_t, d_rec)

            xs = [d_hs, zs, rs, hhs, r_hs, h_prev]
            (dh0,), (d_in, d_rec) = _scan(
                step_back, (tf.zeros_like(h0),), xs, [3 * units] * 2, True
            )
        d_x, d_kernel, d_bias, d_u = _weight_grads(x, kernel, d_in, h_prev, d_rec)
        return d_x, dh0, d_kernel, d_u, d_bias, tf.reduce_sum(d_rec, [0, 1])

    return hs, grad


@tf.custom_gradient
def simple_rnn_sequence(
    x: tf.Tensor, h0: tf.Tensor, kernel: tf.Tensor, u: tf.Tensor, bias: tf.Tensor
) -> tuple[tf.Tensor, Callable]:
    """All hidden states [T, B, H] of tanh(x·kernel + h·u + bias) over time-major x [T, B, F]."""
    units = h0.shape[-1]

    def step(carry: tuple, xw_t: tf.Tensor) -> tuple[tuple, tuple]:
        h = tf.tanh(xw_t + tf.matmul(carry[0], u))
        return (h,), (h,)

    _, (hs,) = _scan(step, (h0,), [_project(x, kernel, bias)], [units])

    def grad(d_hs: tf.Tensor) -> tuple[tf.Tensor, ...]:
        u_t = tf.transpose(u)

        def back(carry: tuple, d_h_t: tf.Tensor, local_t: tf.Tensor) -> tuple:
            dz = (carry[0] + d_h_t) * local_t
            return (tf.matmul(dz, u_t),), (dz,)

        (dh0,), (dz,) = _scan(back, (tf.zeros_like(h0),), [d_hs, 1.0 - hs * hs], [units], True)
        h_prev = tf.concat([h0[None], hs[:-1]], 0)
        d_x, d_kernel, d_bias, d_u = _weight_grads(x, kernel, dz, h_prev, dz)
        return d_x, dh0, d_kernel, d_u, d_bias

    return hs, grad


def _ifoc(w: tf.Tensor) -> tf.Tensor:
    """Keras's LSTM gate order i, f, c, o -> i, f, o, c (last axis)."""
    i, f, c, o = tf.split(w, 4, axis=-1)
    return tf.concat([i, f, o, c], axis=-1)


def supports(model: keras.Model) -> bool:
    """Whether logits_fn computes this model: build_model's network with the cell's defaults."""
    rnn = model.get_layer("rnn")
    if type(rnn) not in (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN):
        return False
    config = rnn.get_config()
    gates_ok = type(rnn) is keras.layers.SimpleRNN or (
        config["recurrent_activation"] == "sigmoid"
        and (type(rnn) is keras.layers.LSTM or config["reset_after"])
    )
    return (
        gates_ok
        and config["activation"] == "tanh"
        and config["use_bias"]
        and not config["go_backwards"]
        and config["dropout"] == config["recurrent_dropout"] == 0
        and model.get_layer("input_projection").get_config()["activation"] == "linear"
    )


def logits_fn(model: keras.Model, readout: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """x [B, T, F] -> logits, the same function as model(x); model(x) itself where unsupported."""
    if not supports(model):
        return lambda x: model(x, training=True)
    run, states = stateful_fn(model, readout), n_states(model)

    def logits(x: tf.Tensor) -> tf.Tensor:
        zeros = tf.zeros([tf.shape(x)[0], model.get_layer("rnn").units], x.dtype)
        return run(x, *[zeros] * states)[0]

    return logits


def n_states(model: keras.Model) -> int:
    """2 for an LSTM (h, c), else 1 (h)."""
    return 2 if type(model.get_layer("rnn")) is keras.layers.LSTM else 1


def stateful_fn(model: keras.Model, readout: str) -> Callable[..., tuple[tf.Tensor, ...]]:
    """(x [B, T, F], *states) -> (logits, *states at T): the model run from a given state.

    The states are (h, c) for an LSTM, (h,) for the others. Chunks of one sequence fed in turn,
    each from the state the last one ended in, give the same states as the whole sequence at once
    (train.tbptt_steps relies on it).
    """
    projection, rnn, head = (model.get_layer(n) for n in ("input_projection", "rnn", "logits"))
    cell = rnn.cell
    lstm, gru = type(rnn) is keras.layers.LSTM, type(rnn) is keras.layers.GRU
    kind, which = READOUTS[readout]

    def weights() -> tuple[tf.Tensor, ...]:
        """(fused kernel [F, G], u [H, G], bias [G], *extra) in the order the sequence fn takes."""
        k, u = tf.convert_to_tensor(cell.kernel), tf.convert_to_tensor(cell.recurrent_kernel)
        bias, extra = tf.convert_to_tensor(cell.bias), []
        if lstm:
            k, u, bias = _ifoc(k), _ifoc(u), _ifoc(bias)
        if gru:
            bias, rbias = tf.unstack(bias)  # reset_after: input and recurrent bias
            extra = [rbias]
        # Projection and input kernel in one: (x·Wp + bp)·K + b = x·(Wp·K) + (bp·K + b).
        fused = tf.matmul(projection.kernel, k)
        return fused, u, tf.linalg.matvec(k, projection.bias, transpose_a=True) + bias, *extra

    def run(x: tf.Tensor, *states: tf.Tensor) -> tuple[tf.Tensor, ...]:
        kernel, u, *biases = weights()
        batch = tf.shape(x)[0]
        sizes = [batch // 2, batch - batch // 2]
        parts = [tf.split(tf.transpose(x, (1, 0, 2)), sizes, axis=1)]
        parts += [tf.split(s, sizes) for s in states]
        features, last = [], []
        for part, *init in zip(*parts, strict=True):
            if lstm:
                hs, cs = lstm_sequence(part, *init, kernel, u, *biases)
                last.append((hs[-1], cs[-1]))
            else:
                hs = (gru_sequence if gru else simple_rnn_sequence)(part, *init, kernel, u, *biases)
                last.append((hs[-1],))
            if kind == "state":
                features.append(last[-1][which])
            elif which == "mean":
                features.append(tf.reduce_mean(hs, axis=0))
            else:  # output_last: the last step's output is h_T, as state_h
                features.append(hs[-1])
        logits = head(tf.concat(features, axis=0))
        return logits, *(tf.concat(s, axis=0) for s in zip(*last, strict=True))

    return run


def configure_threads() -> None:
    """Run each op on half the cores, so that the two half-batch recurrences run side by side.

    Measured on 2 cores: 1.2x the samples/s of TensorFlow's default of all cores per op
    (benchmarks/RESULTS.md). Takes effect only before TensorFlow runs its first op.
    """
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    # Once TensorFlow runs (e.g. in a test process) it refuses the change: keep its setting.
    with contextlib.suppress(RuntimeError):
        tf.config.threading.set_intra_op_parallelism_threads(max(1, cores // 2))


def make_train_step(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    readout: str,
    tbptt_steps: int | None = None,
) -> Callable[[np.ndarray, np.ndarray], tuple[tf.Tensor, tf.Tensor]]:
    """One compiled Adam step on a batch; returns (loss, accuracy) of that batch.

    With tbptt_steps k shorter than the sequence: one Adam step per chunk of k steps, each chunk
    starting from the state the previous chunk of the same images ended in (no gradient through
    it), zeros for a new batch; loss and accuracy are those of the last chunk, the whole image.
    """
    _, steps, features = model.input.shape
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    spec = (tf.TensorSpec([None, steps, features], tf.float32), tf.TensorSpec([None], tf.int32))
    forward = logits_fn(model, readout)  # model(x), computed faster
    k = tbptt_steps or steps
    chunks = [(i, min(i + k, steps)) for i in range(0, steps, k)]
    if len(chunks) > 1:
        stateful = stateful_fn(model, readout)

    def update(x: tf.Tensor, y: tf.Tensor, state: tuple) -> tuple[tf.Tensor, ...]:
        with tf.GradientTape() as tape:
            if state:
                logits, *state = stateful(x, *state)
            else:
                logits = forward(x)
            loss = loss_fn(y, logits)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return logits, loss, tuple(tf.stop_gradient(s) for s in state)

    @tf.function(input_signature=spec)
    def train_step(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        state: tuple = ()
        if len(chunks) > 1:
            zeros = tf.zeros([tf.shape(x)[0], model.get_layer("rnn").units])
            state = (zeros,) * n_states(model)  # (h, c) for an LSTM, (h,) otherwise
        for start, stop in chunks:
            logits, loss, state = update(x[:, start:stop], y, state)
        # The accuracy of this batch alone, from the forward pass that made the gradient.
        hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
        return loss, tf.reduce_mean(tf.cast(hits, tf.float32))

    return train_step
