"""MLflow configuration: where the store is, where artifacts go, and buffered metric logging."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.io import ConfigError


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_project_root_is_the_workspace_even_inside_a_dvc_temp_copy(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tracking.project_root() == clean_env
    temp_copy = clean_env / ".dvc" / "tmp" / "exps" / "standalone" / "tmpab12"
    temp_copy.mkdir(parents=True)
    monkeypatch.chdir(temp_copy)
    assert tracking.project_root() == clean_env
    monkeypatch.setenv("DVC_ROOT", str(clean_env / "elsewhere"))
    assert tracking.project_root() == clean_env / "elsewhere"


def test_default_store_is_sqlite_in_the_root_with_artifacts_beside_it(clean_env: Path) -> None:
    experiment_id = tracking.configure()
    assert mlflow.get_tracking_uri() == f"sqlite:///{clean_env / 'mlflow.db'}"
    experiment = mlflow.get_experiment(experiment_id)
    assert experiment.name == "rnn-mnist-sequences"
    assert experiment.artifact_location == (clean_env / "mlruns").as_uri()
    assert tracking.configure() == experiment_id  # found again, not created twice


def test_environment_picks_another_store_and_experiment(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{clean_env / 'server.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sweep")
    experiment_id = tracking.configure()
    assert mlflow.get_tracking_uri() == uri
    assert mlflow.get_experiment(experiment_id).name == "sweep"
    assert not (clean_env / "mlflow.db").exists()


def test_metric_buffer_sends_everything_in_chunks_of_at_most_1000(clean_env: Path) -> None:
    experiment_id = tracking.configure()
    client = MlflowClient()
    run_id = client.create_run(experiment_id).info.run_id
    buffer = tracking.MetricBuffer(run_id)
    for step in range(2500):
        buffer.add("batch_accuracy", step / 2500, step)
    assert client.get_metric_history(run_id, "batch_accuracy") == []  # nothing sent yet
    buffer.flush()
    history = client.get_metric_history(run_id, "batch_accuracy")
    assert sorted(m.step for m in history) == list(range(2500))
    assert buffer.pending == [] and buffer.seconds > 0


def test_an_unreachable_tracking_server_fails_fast_with_a_fix(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"MLFLOW_TRACKING_URI=http://127\.0\.0\.1.*unset"):
        tracking.configure()
    assert time.monotonic() - start < 6


def test_a_silent_tracking_server_fails_within_the_timeout(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setattr(tracking, "SERVER_TIMEOUT", 1.0)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="no MLflow server answered within 1 s"):
        tracking.check_server(os.environ["MLFLOW_TRACKING_URI"], tracking.SERVER_TIMEOUT)
    assert time.monotonic() - start < 3
    listener.close()


def test_parallel_stages_creating_a_fresh_store_at_once_all_succeed(clean_env: Path) -> None:
    """Without the lock, MLflow's schema migrations race (alembic CommandError) and stages die."""
    code = (
        "import sys, time\n"
        "from pipeline import tracking\n"
        "time.sleep(max(0.0, float(sys.argv[1]) - time.time()))\n"  # start together
        "print(tracking.configure())\n"
    )
    start_at = str(time.time() + 8)  # after every process has imported MLflow
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, start_at],
            cwd=clean_env,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1  # one experiment, found by all
