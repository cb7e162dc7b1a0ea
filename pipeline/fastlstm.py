"""The training path for LSTM models: the same function as model(x), computed faster on a CPU.

train.py uses logits_fn(model, readout) in place of model(x) while training; the model itself stays
the stock Keras one of model.py, so what is saved and served needs nothing from here. With the
same weights the logits and the gradients agree with model(x) to float32 rounding
(tests/test_fastlstm.py). Why it is faster than keras.layers.LSTM (benchmarks/RESULTS.md):
- The input projection and the LSTM's input kernel are both linear: x·Wp·K + (bp·K + b) is one
  matmul with the small [F, 4H] product Wp·K, for all steps at once, before the recurrence.
- A hand-written gradient: only dz·Uᵀ runs step by step; the weight gradients are one large
  matmul each over all steps, and the gate derivatives are computed for all steps at once.
- The batch runs as two independent half-batch recurrences, so that the small serial ops of one
  overlap those of the other on a second core.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import keras
import tensorflow as tf

UNROLL_MAX = 64  # longer sequences run in a tf.while_loop instead of an unrolled graph


def _step(xw_t: tf.Tensor, h: tf.Tensor, c: tf.Tensor, u: tf.Tensor) -> tuple[tf.Tensor, ...]:
    """One LSTM step, gates in the order i, f, o, c (sigmoids first, then the tanh)."""
    units = h.shape[-1]
    z_sigmoid, z_tanh = tf.split(xw_t + tf.matmul(h, u), [3 * units, units], axis=1)
    s = tf.sigmoid(z_sigmoid)
    g = tf.tanh(z_tanh)
    i, f, o = tf.split(s, 3, axis=1)
    c = f * c + i * g
    h = o * tf.tanh(c)
    return h, c, s, g


@tf.custom_gradient
def lstm_sequence(
    x: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, kernel: tf.Tensor, u: tf.Tensor, bias: tf.Tensor
) -> tuple[tuple[tf.Tensor, tf.Tensor], Callable]:
    """All hidden and cell states [T, B, H] of an LSTM over time-major x [T, B, F].

    kernel [F, 4H], u [H, 4H] and bias [4H] hold the gates in the order i, f, o, c.
    """
    steps, units = x.shape[0], h0.shape[-1]
    batch, features = tf.shape(x)[1], tf.shape(x)[2]
    xw = tf.reshape(
        tf.matmul(tf.reshape(x, [-1, features]), kernel) + bias, [steps, batch, 4 * units]
    )
    if steps <= UNROLL_MAX:
        h, c, saved = h0, c0, []
        for xw_t in tf.unstack(xw):
            h, c, s, g = _step(xw_t, h, c, u)
            saved.append((h, c, s, g))
        hs, cs, ss, gs = (tf.stack(seq) for seq in zip(*saved, strict=True))
    else:

        def body(t: tf.Tensor, h: tf.Tensor, c: tf.Tensor, *arrays: tf.TensorArray) -> tuple:
            h, c, s, g = _step(xw[t], h, c, u)
            return t + 1, h, c, *(a.write(t, v) for a, v in zip(arrays, (h, c, s, g), strict=True))

        arrays = [
            tf.TensorArray(x.dtype, size=steps, element_shape=[None, n])
            for n in (units, units, 3 * units, units)
        ]
        _, _, _, *arrays = tf.while_loop(lambda t, *_: t < steps, body, (0, h0, c0, *arrays))
        hs, cs, ss, gs = (a.stack() for a in arrays)

    def grad(d_hs: tf.Tensor | None, d_cs: tf.Tensor | None) -> tuple[tf.Tensor, ...]:
        # Everything that does not depend on the incoming gradient, for all steps at once.
        i, f, o = tf.split(ss, 3, axis=2)
        c_prev = tf.concat([c0[None], cs[:-1]], 0)
        tanh_c = tf.tanh(cs)
        dc_dh = o * (1.0 - tanh_c * tanh_c)
        # dz = [dc, dc, dh, dc] * local: the derivatives of the pre-activations i, f, o, c.
        local = tf.concat(
            [
                gs * i * (1.0 - i),
                c_prev * f * (1.0 - f),
                tanh_c * o * (1.0 - o),
                i * (1.0 - gs * gs),
            ],
            axis=2,
        )
        d_hs = tf.zeros_like(hs) if d_hs is None else d_hs
        d_cs = tf.zeros_like(cs) if d_cs is None else d_cs
        u_t = tf.transpose(u)
        dh, dc = tf.zeros_like(h0), tf.zeros_like(c0)
        if steps <= UNROLL_MAX:
            per_step = [tf.unstack(a) for a in (d_hs, d_cs, dc_dh, local, f)]
            dzs = []
            for d_h_t, d_c_t, dc_dh_t, local_t, f_t in reversed(list(zip(*per_step, strict=True))):
                dh = dh + d_h_t
                dc = dc + d_c_t + dh * dc_dh_t
                dz = tf.concat([dc, dc, dh, dc], 1) * local_t
                dzs.append(dz)
                dh, dc = tf.matmul(dz, u_t), dc * f_t
            dz = tf.stack(dzs[::-1])
        else:

            def back(k: tf.Tensor, dh: tf.Tensor, dc: tf.Tensor, dzs: tf.TensorArray) -> tuple:
                t = steps - 1 - k
                dh = dh + d_hs[t]
                dc = dc + d_cs[t] + dh * dc_dh[t]
                dz = tf.concat([dc, dc, dh, dc], 1) * local[t]
                return k + 1, tf.matmul(dz, u_t), dc * f[t], dzs.write(t, dz)

            dzs = tf.TensorArray(x.dtype, size=steps, element_shape=[None, 4 * units])
            _, dh, dc, dzs = tf.while_loop(lambda k, *_: k < steps, back, (0, dh, dc, dzs))
            dz = dzs.stack()
        dz = tf.reshape(dz, [-1, 4 * units])
        h_prev = tf.reshape(tf.concat([h0[None], hs[:-1]], 0), [-1, units])
        d_x = tf.reshape(tf.matmul(dz, kernel, transpose_b=True), tf.shape(x))
        d_kernel = tf.matmul(tf.reshape(x, [-1, features]), dz, transpose_a=True)
        d_u = tf.matmul(h_prev, dz, transpose_a=True)
        return d_x, dh, dc, d_kernel, d_u, tf.reduce_sum(dz, 0)

    return (hs, cs), grad


def _ifoc(w: tf.Tensor) -> tf.Tensor:
    """Keras's gate order i, f, c, o -> i, f, o, c (last axis)."""
    i, f, c, o = tf.split(w, 4, axis=-1)
    return tf.concat([i, f, o, c], axis=-1)


def supports(model: keras.Model) -> bool:
    """Whether logits_fn computes this model: build_model's LSTM with the default settings."""
    rnn = model.get_layer("rnn")
    config = rnn.get_config()
    return (
        type(rnn) is keras.layers.LSTM
        and config["activation"] == "tanh"
        and config["recurrent_activation"] == "sigmoid"
        and config["use_bias"]
        and not config["go_backwards"]
        and config["dropout"] == config["recurrent_dropout"] == 0
        and model.get_layer("input_projection").get_config()["activation"] == "linear"
    )


def logits_fn(model: keras.Model, readout: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """x [B, T, F] -> logits, the same function as model(x); model(x) itself where unsupported."""
    if not supports(model):
        return lambda x: model(x, training=True)
    carry = stateful_fn(model, readout)

    def logits(x: tf.Tensor) -> tf.Tensor:
        zeros = tf.zeros([tf.shape(x)[0], model.get_layer("rnn").units], x.dtype)
        return carry(x, zeros, zeros)[0]

    return logits


def stateful_fn(model: keras.Model, readout: str) -> Callable[..., tuple[tf.Tensor, ...]]:
    """(x [B, T, F], h0, c0) -> (logits, h_T, c_T): the LSTM model run from a given state.

    Chunks of one sequence fed in turn, each from the state the last one ended in, give the same
    states as the whole sequence at once (train.tbptt_steps relies on it).
    """
    projection, rnn, head = (model.get_layer(n) for n in ("input_projection", "rnn", "logits"))
    cell = rnn.cell

    def run(x: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor) -> tuple[tf.Tensor, ...]:
        k = _ifoc(tf.convert_to_tensor(cell.kernel))
        kernel = tf.matmul(projection.kernel, k)  # [F, 4H]: projection and input kernel in one
        bias = tf.linalg.matvec(k, projection.bias, transpose_a=True) + _ifoc(cell.bias)
        u = _ifoc(tf.convert_to_tensor(cell.recurrent_kernel))
        batch = tf.shape(x)[0]
        sizes = [batch // 2, batch - batch // 2]
        halves = zip(
            tf.split(tf.transpose(x, (1, 0, 2)), sizes, axis=1),
            tf.split(h0, sizes),
            tf.split(c0, sizes),
            strict=True,
        )
        features, hs_last, cs_last = [], [], []
        for part, h, c in halves:
            hs, cs = lstm_sequence(part, h, c, kernel, u, bias)
            hs_last.append(hs[-1])
            cs_last.append(cs[-1])
            if readout == "state_c":
                features.append(cs[-1])
            elif readout == "output_mean":
                features.append(tf.reduce_mean(hs, axis=0))
            else:  # state_h and output_last are the same tensor, h_T
                features.append(hs[-1])
        logits = head(tf.concat(features, axis=0))
        return logits, tf.concat(hs_last, axis=0), tf.concat(cs_last, axis=0)

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
