"""Batching, the optimizer's schedule and clipping, the stage on a tiny data set, and a crash."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import (
    assert_quiet,
    call_stage,
    make_params,
    run_stage,
    write_params,
    write_prepared,
)
from mlflow.tracking import MlflowClient

from pipeline import store, tracking
from pipeline import train as T
from pipeline.io import load_npz, save_npz, write_json
from pipeline.model import build_model, score
from pipeline.train import epoch_batches


def test_epoch_batches_cover_every_sample_once_in_batches_of_the_given_size() -> None:
    batches = epoch_batches(1000, 128, seed=5, epoch=0)
    assert [len(b) for b in batches] == [128] * 7 + [104]
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))


def test_epoch_batches_reshuffle_each_epoch_deterministically() -> None:
    first = np.concatenate(epoch_batches(500, 50, seed=5, epoch=0))
    np.testing.assert_array_equal(first, np.concatenate(epoch_batches(500, 50, seed=5, epoch=0)))
    assert not np.array_equal(first, np.concatenate(epoch_batches(500, 50, seed=5, epoch=1)))
    assert not np.array_equal(first, np.concatenate(epoch_batches(500, 50, seed=6, epoch=0)))


def test_cosine_schedule_decays_to_zero_at_the_last_batch() -> None:
    cfg = make_params({"train": {"lr_schedule": "cosine", "epochs": 3, "batch_size": 100}}).train
    optimizer = T.make_optimizer(cfg, samples=1000)  # 3 epochs x 10 batches = 30 updates
    rates = {}
    for step in (0, 15, 30):
        optimizer.iterations.assign(step)
        rates[step] = float(optimizer.learning_rate)
    assert rates[0] == pytest.approx(0.001)
    assert rates[15] == pytest.approx(0.0005, rel=1e-3)
    assert rates[30] == pytest.approx(0.0, abs=1e-9)


def test_global_clipnorm_rescales_all_gradients_together() -> None:
    """Clipped at 0.5, two steps with huge gradients move the weights exactly as the same two
    steps with those gradients scaled to norm 0.5 do, on an unclipped optimizer."""
    grads = [
        [np.full(4, 100.0, np.float32), np.full(9, -3.0, np.float32)],
        [np.full(4, -7.0, np.float32), np.full(9, 40.0, np.float32)],
    ]

    def train(global_clipnorm: float | None, scale: bool) -> list[np.ndarray]:
        cfg = make_params({"train": {"global_clipnorm": global_clipnorm}}).train
        optimizer = T.make_optimizer(cfg, samples=1)
        weights = [keras.Variable(np.zeros(4, np.float32)), keras.Variable(np.zeros(9, np.float32))]
        for step in grads:
            norm = np.sqrt(sum(float(np.sum(g**2)) for g in step))
            step = [g * 0.5 / norm for g in step] if scale else step
            optimizer.apply_gradients(zip(step, weights, strict=True))
        return [w.numpy() for w in weights]

    clipped, by_hand, unclipped = train(0.5, False), train(None, True), train(None, False)
    for a, b in zip(clipped, by_hand, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(clipped[0], unclipped[0])  # Adam is not scale-free across steps


# The process is the point (what a user's terminal shows), and it costs 13 s: in the full suite.
@pytest.mark.slow
def test_the_stage_trains_logs_and_prints_no_tensorflow_noise(tmp_path: Path) -> None:
    tiny = {"model": {"input_units": 8, "units": 8}, "readouts": ["state_h"]}
    write_params(tmp_path, tiny | {"train": {"epochs": 2, "batch_size": 8}})
    write_prepared(tmp_path)
    out = run_stage("train", tmp_path, "--readout", "state_h")
    assert out.returncode == 0, out.stderr
    assert_quiet(out.stdout + out.stderr)
    assert "epoch 2/2: accuracy" in out.stdout
    assert "it/s" not in out.stderr  # no progress bar when the output is not a terminal
    run = json.loads((tmp_path / "models/state_h/run.json").read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = client.get_run(run["run_id"])
    assert logged.info.status == "FINISHED"
    assert len(client.get_metric_history(run["run_id"], "batch_accuracy")) == 2 * 3  # 20 / 8
    assert not (tmp_path / "checkpoints/state_h").exists()  # removed once the run finished


def test_a_crash_marks_the_run_failed_and_keeps_the_checkpoint(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_params(isolated, {"train": {"epochs": 2}, "readouts": ["state_h"]})
    write_prepared(isolated)

    def crash(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(T, "fit", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        T.train("state_h")
    client = MlflowClient(f"sqlite:///{isolated / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(store.EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert (isolated / "checkpoints/state_h/checkpoint.npz").exists()  # a rerun resumes it
    assert not (isolated / "models").exists()


def test_train_seed_draws_the_weights_and_the_shuffle_but_not_the_data(isolated: Path) -> None:
    """Replicates (-S train.seed=1,2,...) share the split and pixel order, so they are paired on
    the same images; train.seed null trains exactly as before the param, from seed."""
    rng = np.random.default_rng(0)
    raw = {"x_train": rng.integers(0, 256, (100, 28, 28)), "y_train": np.arange(100) % 10}
    raw |= {"x_test": rng.integers(0, 256, (30, 28, 28)), "y_test": np.arange(30) % 10}
    save_npz(isolated / "data/raw/dataset.npz", **{k: v.astype(np.uint8) for k, v in raw.items()})
    write_json(isolated / "data/raw/source.json", {"source": "bundled", "dataset": "mnist"})
    order = {"sequence": {"order": "permuted_pixels"}}  # the permutation is drawn from seed too
    prepared = []
    for train_seed in (1, 2):
        write_params(isolated, order | {"train": {"seed": train_seed}})
        assert call_stage("preprocess", isolated).returncode == 0
        prepared.append((isolated / "data/prepared/sequences.npz").read_bytes())
    assert prepared[0] == prepared[1]

    write_prepared(isolated)  # 20 random sequences of 28 steps: quick to train on
    tiny = {"model": {"input_units": 8, "units": 8}, "readouts": ["state_h"]}
    config = tiny | {"train": {"epochs": 1, "batch_size": 8}}
    write_params(isolated, config | {"train": config["train"] | {"seed": 7}})
    out = call_stage("train", isolated, "--readout", "state_h")
    assert out.returncode == 0, out.stderr
    run_id = json.loads((isolated / "models/state_h/run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{isolated / 'mlflow.db'}")
    run = client.get_run(run_id)
    # The first batch's loss, recomputed from seed 7's initial weights and first shuffle, and not
    # from seed 42's (what a null train.seed trains from).
    data = load_npz(isolated / "data/prepared/sequences.npz", ("x_train", "y_train"))
    losses = {}
    for seed in (7, 42):
        first = epoch_batches(20, 8, seed, 0)[0]
        keras.utils.set_random_seed(seed)
        model = build_model(28, 28, "lstm", "state_h", 8, 8)
        losses[seed], _, _ = score(model, data["x_train"][first], data["y_train"][first])
    (logged,) = [m for m in client.get_metric_history(run_id, "batch_loss") if m.step == 0]
    assert logged.value == pytest.approx(losses[7], rel=1e-5) != losses[42]
    assert run.data.tags["train.seed"] == run.data.params["train.seed"] == "7"
    assert run.data.params["seed"] == "42" and make_params(config).train_seed == 42
    # A null train.seed run of the same config is a replicate of this one: the same key.
    null = {k: str(v) for k, v in make_params(config).flat().items()}
    key = tracking.replicate_key(null, "state_h", run.data.tags["data.sha256"])
    assert run.data.tags["replicate_of"] == key
