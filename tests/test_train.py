"""Batching, and what a crash does to the MLflow run."""

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from project import write_params

from pipeline import params as P
from pipeline import train as T
from pipeline.io import save_npz, write_json
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


def test_cosine_schedule_decays_to_zero_at_the_last_batch_and_clipping_bounds_the_norm() -> None:
    cfg = P.parse({"train": {"lr_schedule": "cosine", "epochs": 3, "batch_size": 100}}).train
    lr = T.make_optimizer(cfg, samples=1000)._learning_rate  # the schedule: 3 x 10 batches
    assert float(lr(0)) == pytest.approx(0.001)
    assert float(lr(15)) == pytest.approx(0.0005, rel=1e-3)
    assert float(lr(30)) == pytest.approx(0.0, abs=1e-9)

    clipped = T.make_optimizer(P.parse({"train": {"global_clipnorm": 0.5}}).train, samples=1)
    grads = [np.full(4, 100.0, np.float32), np.full(9, -3.0, np.float32)]
    norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in clipped._clip_gradients(grads)))
    assert norm == pytest.approx(0.5)


def test_a_crash_marks_the_run_failed_and_keeps_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"train": {"epochs": 2, "readouts": ["state_h"]}})
    rng = np.random.default_rng(0)
    arrays = {
        f"x_{s}": rng.random((20, 28, 28), dtype=np.float32) for s in ("train", "val", "test")
    }
    arrays |= {f"y_{s}": (np.arange(20) % 10).astype(np.int32) for s in ("train", "val", "test")}
    save_npz(tmp_path / "data/prepared/sequences.npz", **arrays)
    meta = {
        "order": "rows",
        "sha256": "0" * 64,
        "source": {"source": "bundled", "dataset": "mnist"},
    }
    write_json(tmp_path / "data/prepared/meta.json", meta)

    def crash(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(T, "fit", crash)
    with pytest.raises(RuntimeError, match="disk on fire"):
        T.train("state_h")
    (run,) = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    assert run.info.status == "FAILED"
    assert (tmp_path / "checkpoints/state_h/checkpoint.npz").exists()  # a rerun resumes it
    assert not (tmp_path / "models").exists()
