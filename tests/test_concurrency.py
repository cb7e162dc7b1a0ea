"""Parallel experiments on the embedded SQLite store lose nothing, with two `mlflow ui` readers;
the registry ends with every version once and the best one as champion.

`dvc exp run --queue` of two, then `dvc queue start -j 2`: both run at once, and every run and every
metric point must land, while two `mlflow ui` processes read the same store over their REST API
the whole time.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import (
    TRAINED,
    clean_env,
    copy_project,
    dvc,
    free_port,
    poll,
    start_queue,
    stop,
    wait_for_queue,
    wait_until_up,
)
from mlflow.tracking import MlflowClient

from pipeline import store

pytestmark = pytest.mark.slow
LRS = ("0.001", "0.002")
# A small network: concurrent writers are the point here, not what they learn.
PARAMS = {
    "data": {"source": "bundled"},
    "model": {"input_units": 16, "units": 16},
    "train": {"epochs": 1},
    "readouts": ["state_h"],
    # the best must end champion, whatever its gain: alpha 1.0 is the rule without a test
    "registry": {"alpha": 1.0},
}


def start_ui(repo: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    ui = subprocess.Popen(
        # one worker, not MLflow's 4 (each imports MLflow's server, ~8 s of CPU): one reader
        # polls each ui, one request at a time
        [sys.executable, "-m", "mlflow", "ui", "--port", str(port), "--workers", "1"],
        cwd=repo,
        env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # as start_server's
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", ui, seconds=300)  # as start_server's
    return ui, url


def test_queued_experiments_in_parallel_lose_no_run_and_no_point(tmp_path: Path) -> None:
    repo = copy_project(tmp_path / "repo", PARAMS)
    uis = [start_ui(repo) for _ in range(2)]  # the readers create the store before any writer
    done, results = threading.Event(), [[], []]
    pollers = [
        threading.Thread(target=poll, args=(url, done, r))
        for (_, url), r in zip(uis, results, strict=True)
    ]
    try:
        for thread in pollers:
            thread.start()
        dvc("exp", "run", "--queue", "-S", f"train.lr={','.join(LRS)}", cwd=repo)  # a grid
        start_queue(repo)
        status = wait_for_queue(repo)
    finally:
        done.set()
        for thread in pollers:
            thread.join(timeout=60)
        for ui, _ in uis:
            stop(ui)  # and the server process it started
    assert status.count("Success") == len(LRS), status
    for reads in results:  # both readers answered every request while the writers ran
        assert len(reads) > 20 and set(reads) == {200}, reads

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(store.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], TRAINED)
    assert sorted(r.data.params["train.lr"] for r in runs) == list(LRS)
    both = [r.info for r in runs]  # from train's start to register's end, at the same time
    assert max(i.start_time for i in both) < min(i.end_time for i in both), both
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["dvc.exp_name"]
        counts = {
            key: len(client.get_metric_history(run.info.run_id, key))
            for key in ("batch_accuracy", "batch_loss", "accuracy", "val_accuracy", "test_accuracy")
        }
        assert counts == {
            "batch_accuracy": 29,
            "batch_loss": 29,
            "accuracy": 1,
            "val_accuracy": 1,
            "test_accuracy": 1,
        }, counts

    # The register stages of parallel experiments: every version there once, the best champion.
    versions = client.search_model_versions("name = 'rnn-mnist'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in runs)
    best = max(r.data.metrics["test_accuracy"] for r in runs)
    champion = client.get_model_version_by_alias("rnn-mnist", "champion")
    assert float(champion.tags["test_accuracy"]) == best, [v.tags for v in versions]
