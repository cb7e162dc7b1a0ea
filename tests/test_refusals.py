"""A refused `dvc repro` loses nothing, and only one process trains a readout at a time.

Refusals (bad params, bad data, no server, a refused login) on a trained tiny project leave
`git status` and `dvc status` as they were, and restoring params.yaml needs no rerun. The orphan
case: `kill -9` of `dvc` alone leaves its trainer running; the next `dvc repro` must refuse.
"""

from __future__ import annotations

import http.server
import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import (
    GIT,
    ROOT,
    clean_env,
    copy_project,
    dvc,
    free_port,
    one_error,
    sh,
    start_repro,
    wait_for,
    working_in,
)
from mlflow.tracking import MlflowClient
from ruamel.yaml import YAML

from pipeline import checkpoint
from pipeline.stage import ConfigError

TINY = {
    "data": {"source": "bundled"},
    "model": {"input_units": 16, "units": 16},
    "train": {"epochs": 1},
    "readouts": ["state_h"],
}
UP_TO_DATE = "Data and pipelines are up to date.\n"


def test_dvc_deletes_no_output_before_its_stage_runs() -> None:
    """DVC deletes an out before running its stage unless it persists; a refusal would lose it."""
    stages = YAML(typ="safe").load(ROOT / "dvc.yaml")["stages"]
    for name, stage in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                path, props = next(iter(out.items())) if isinstance(out, dict) else (out, {})
                assert props.get("persist") is True, f"{name}: {path}: add persist: true"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project after a real `dvc repro`, everything committed: git and DVC clean."""
    repo = copy_project(tmp_path_factory.mktemp("repo"), TINY)
    dvc("repro", cwd=repo)
    sh(*GIT, "add", "-A", cwd=repo)
    sh(*GIT, "commit", "-qm", "trained", cwd=repo)
    assert status(repo) == ("", UP_TO_DATE)
    return repo


def status(repo: Path) -> tuple[str, str]:
    """What a user looks at: `git status` and `dvc status`."""
    git = sh("git", "status", "--porcelain", cwd=repo).stdout
    return git, dvc("status", cwd=repo).stdout


def edit(repo: Path, old: str, new: str) -> None:
    text = (repo / "params.yaml").read_text()
    assert old in text
    (repo / "params.yaml").write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def login_refused() -> Iterator[str]:
    """A server that answers 401 to every request, as MLflow's basic-auth does to a bad login."""

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# Each case: how to break the run (params.yaml edits, extra environment), what the error names.
# A typo in params.yaml takes bad params' way here (train refuses its section); its own message
# is tests/test_params.py's and tests/test_stages.py's.
CASES: dict[str, Callable[[Path, str], tuple[list[tuple[str, str]], dict[str, str], str]]] = {
    "bad params": lambda repo, _: (
        [("batch_size: 128", "batch_size: -1")],
        {},
        "train.batch_size",
    ),
    "bad data": lambda repo, _: (
        [("source: bundled", "source: path"), ("path: null", f"path: {repo.parent / 'bad.npz'}")],
        {},
        "bad.npz",
    ),
    "no server": lambda repo, _: (
        [("lr: 0.001", "lr: 0.002")],
        {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
        "no MLflow server answered",
    ),
    "refused login": lambda repo, uri: (
        [("lr: 0.001", "lr: 0.002")],
        {"MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": "alice"},
        "refused user 'alice'",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_refused_repro_loses_nothing_and_restoring_params_reruns_nothing(
    repo: Path, login_refused: str, case: str
) -> None:
    (repo.parent / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    edits, env, named = CASES[case](repo, login_refused)
    for old, new in edits:
        edit(repo, old, new)
    before = status(repo)
    out = sh(sys.executable, "-m", "dvc", "repro", cwd=repo, check=False, env=clean_env(**env))
    assert named in one_error(out) and "exited with 2" in out.stderr
    assert status(repo) == before  # DVC deleted no output of the stage that refused
    sh("git", "checkout", "params.yaml", cwd=repo)
    assert status(repo) == ("", UP_TO_DATE)  # nothing to retrain


def test_a_second_trainer_refuses_while_the_first_holds_the_lock_and_kill_9_frees_it(
    tmp_path: Path,
) -> None:
    hold = "import time\nfrom pipeline import checkpoint\n"
    hold += "with checkpoint.only_trainer('state_h'):\n    print(flush=True)\n    time.sleep(600)\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", hold], cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE
    )
    try:
        holder.stdout.readline()  # it holds the lock now
        with (
            working_in(tmp_path),
            pytest.raises(ConfigError) as refused,
            checkpoint.only_trainer("state_h"),
        ):
            pass
        assert f"train state_h is already running here as pid {holder.pid}" in str(refused.value)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, yet the kernel drops its lock
        holder.wait()
    with working_in(tmp_path), checkpoint.only_trainer("state_h"):
        assert (tmp_path / "checkpoints/state_h.lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.slow
def test_kill_9_of_dvc_alone_then_repro_refuses_while_the_orphan_trains_on(repo: Path) -> None:
    """Last in this module: it leaves the workspace trained by the orphan, dvc.lock behind."""
    edit(repo, "epochs: 1", "epochs: 2")
    first = start_repro(repo)
    assert wait_for(repo / "checkpoints/state_h/checkpoint.npz", first, 600)  # run opened
    children = psutil.Process(first.pid).children(recursive=True)
    (trainer,) = [p for p in children if "pipeline.train" in p.cmdline() and "python" in p.name()]
    # Paused, so that it still trains (holds its lock) when the second trainer starts, however
    # slow or fast this machine is; a stopped process keeps its locks.
    trainer.send_signal(signal.SIGSTOP)
    os.kill(first.pid, signal.SIGKILL)  # dvc alone: its trainer lives on, an orphan
    first.wait()
    try:
        second = sh(sys.executable, "-m", "dvc", "repro", cwd=repo, check=False)
    finally:
        trainer.send_signal(signal.SIGCONT)
    line = one_error(second)
    assert f"train state_h is already running here as pid {trainer.pid}" in line
    assert "exited with 2" in second.stderr and trainer.is_running()
    trainer.wait(timeout=600)

    # The orphan's run alone: every point once, one logged model.
    run_id = json.loads((repo / "models/state_h/run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    with np.load(repo / "data/prepared/sequences.npz", allow_pickle=False) as data:
        steps = 2 * math.ceil(len(data["y_train"]) / 128)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(run_id, "batch_accuracy")) == steps
    assert len(client.get_metric_history(run_id, "val_accuracy")) == 2
    experiment_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert len(models) == 1
