"""Checkpoints: the state and every weight come back exactly; only the same params resume."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import call_stage, clean_env, make_params, wait_for, write_params, write_prepared
from mlflow.tracking import MlflowClient

from pipeline import checkpoint, store
from pipeline.checkpoint import TrainState
from pipeline.model import build_model
from pipeline.stage import DataError


def trained(seed: int) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    """A small model and its Adam optimizer after two updates (so its moments are non-zero)."""
    keras.utils.set_random_seed(seed)
    model = build_model(4, 3, "lstm", "state_h", input_units=5, units=6)
    optimizer = keras.optimizers.Adam(0.01)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer, loss, run_eagerly=True)  # traced, 2 steps cost seconds more
    x = np.random.default_rng(seed).random((8, 4, 3), dtype=np.float32)
    model.fit(x, np.arange(8) % 10, epochs=2, batch_size=8, verbose=0)
    return model, optimizer


def test_save_then_restore_gives_back_the_state_weights_and_optimizer(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.npz"
    model, optimizer = trained(seed=1)
    state = TrainState(fingerprint="f" * 64, run_id="abc", epoch=2, batch=3, step=17)
    state.samples, state.loss_sum, state.hits = 40, 91.25, 13.0
    state.batch_rows, state.epoch_rows = [[0, 0.5, 2.1]], [[0, 0.4, 2.0, 0.45, 1.9]]
    state.pending = [["batch_loss", 1.5, 16, 1700000000000]]
    checkpoint.save(path, model, optimizer, state)

    assert checkpoint.read_state(path) == state
    other, other_optimizer = trained(seed=2)  # different weights and moments, same shapes
    checkpoint.restore(path, other, other_optimizer)
    for a, b in zip(other.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(other_optimizer.variables, optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("content", [b"", b"not a zip", None])
def test_an_absent_or_unreadable_checkpoint_is_a_data_error(tmp_path: Path, content) -> None:
    path = tmp_path / "checkpoint.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=r"checkpoint\.npz"):
        checkpoint.read_state(path)


CHECKPOINT = Path("checkpoints/state_h/checkpoint.npz")
DAMAGED = "the checkpoint is damaged; training starts over in a new MLflow run"


def damage(path: Path, how: str) -> None:
    """Cut the file in half, or flip one byte of the array o6 (its CRC then fails)."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return
    member = zipfile.ZipFile(path).getinfo("o6.npy")
    start = (
        member.header_offset + 30 + int.from_bytes(data[member.header_offset + 26 :][:2], "little")
    )
    start += int.from_bytes(data[member.header_offset + 28 :][:2], "little")  # extra field
    data[start + member.file_size - 1] ^= 0xFF
    path.write_bytes(data)


@pytest.mark.parametrize("how", ["truncated", "bad CRC"])
def test_a_damaged_checkpoint_starts_over_with_one_line_and_restores_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    path = tmp_path / "checkpoint.npz"
    checkpoint.save(path, *trained(seed=1), TrainState(fingerprint="a" * 64, run_id="run-1"))
    damage(path, how)
    fresh, fresh_optimizer = trained(seed=2)
    before = [w.copy() for w in fresh.get_weights()]

    state, stale = checkpoint.start_or_resume(path, "a" * 64, fresh, fresh_optimizer)
    assert state == TrainState(fingerprint="a" * 64)
    assert stale == (None if how == "truncated" else "run-1")  # the caller ends the run it knows
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {path}: ")
    assert err[0].endswith(DAMAGED)
    if how == "bad CRC":
        assert "Bad CRC-32 for file 'o6.npy'" in err[0]
    for a, b in zip(fresh.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)  # nothing restored from it, not even in part


def test_resume_only_a_checkpoint_of_the_same_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "checkpoint.npz"
    model, optimizer = trained(seed=1)
    saved = TrainState(fingerprint="a" * 64, run_id="run-1", epoch=1, batch=2)
    checkpoint.save(path, model, optimizer, saved)

    fresh, fresh_optimizer = trained(seed=2)
    state, stale = checkpoint.start_or_resume(path, "a" * 64, fresh, fresh_optimizer)
    assert (state, stale) == (saved, None)
    np.testing.assert_array_equal(fresh.get_weights()[0], model.get_weights()[0])
    assert "resuming run run-1 at epoch 2, batch 2" in capsys.readouterr().out

    state, stale = checkpoint.start_or_resume(path, "b" * 64, *trained(seed=3))
    assert state == TrainState(fingerprint="b" * 64) and stale == "run-1"
    assert "is for other params or data: starting clean" in capsys.readouterr().out


def test_the_fingerprint_is_stable_and_json_of_the_state_round_trips() -> None:
    params = make_params()
    assert checkpoint.fingerprint(params, "state_h", "0" * 64) == checkpoint.fingerprint(
        make_params(), "state_h", "0" * 64
    )
    state = TrainState(fingerprint="x", hits=3.5)
    assert TrainState(**dataclasses.asdict(state)) == state


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trainer process killed with -9 after its first checkpoint: its run stays RUNNING, its
    checkpoint stays. Once per module; each test damages a copy (`cp -r`) of the folder."""
    folder = tmp_path_factory.mktemp("killed")
    tiny = {"model": {"input_units": 4, "units": 4}, "readouts": ["state_h"]}
    write_params(folder, tiny | {"train": {"epochs": 4, "batch_size": 5}})
    write_prepared(folder)
    command = [sys.executable, "-m", "pipeline.train", "--readout", "state_h"]
    process = subprocess.Popen(command, cwd=folder, env=clean_env())
    assert wait_for(folder / CHECKPOINT, process, seconds=600)  # a busy machine takes minutes
    process.kill()
    process.wait()
    return folder


@pytest.mark.slow  # a trainer process, killed
@pytest.mark.parametrize("how", ["truncated", "bad CRC"])
def test_after_a_kill_a_damaged_checkpoint_ends_its_run_and_training_starts_over(
    killed: Path, tmp_path: Path, how: str
) -> None:
    project = tmp_path / "project"
    shutil.copytree(killed, project)  # the same killed run, damaged as this test says
    damage(project / CHECKPOINT, how)

    out = call_stage("train", project, "--readout", "state_h")
    assert out.returncode == 0, out.stderr
    (line,) = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert line.startswith(f"warning: {CHECKPOINT}: ") and line.endswith(DAMAGED)
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(store.EXPERIMENT).experiment_id
    runs = client.search_runs([experiment], order_by=["start_time ASC"])
    old, new = (r.info.status for r in runs)
    assert new == "FINISHED" and old == ("FAILED" if how == "truncated" else "KILLED")
