"""MLflow configuration: where the store is, where artifacts go, and buffered metric logging."""

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking


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
