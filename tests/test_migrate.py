"""python -m pipeline.migrate: a local store's runs, models, versions and aliases, moved to a
tracking server on PostgreSQL, arrive whole; a second move adds nothing."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from helpers import call_stage, log_small_image_model, working_in
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline import register
from pipeline.packaging import sequence_index

pytestmark = pytest.mark.slow
SERVER_WORKERS = 1  # one client, migrate, at a time (conftest.py's server fixture)
MIGRATED = ("migrated.run_id", "migrated.complete")
PARENT = "mlflow.parentRunId"


def history(client: MlflowClient, run_id: str, keys) -> dict:
    return {
        key: sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))
        for key in keys
    }


def test_a_local_history_moves_to_the_server_whole_and_only_once(server: str, tmp_path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28)).astype(np.float32)
    with working_in(tmp_path) as root:
        first = log_small_image_model(root, images[:2])  # run 1, with its image model
        client = MlflowClient()
        logged = client.get_logged_model(first.removeprefix("models:/"))
        experiment, run_ids = logged.experiment_id, [logged.source_run_id]
        name = client.get_experiment(experiment).name
        for status in ("FINISHED", "FAILED"):
            run_ids.append(client.create_run(experiment, run_name=f"run-{status}").info.run_id)
        points = [
            Metric(key, v, 1_700_000_000_000 + step, step)
            for step in range(60)
            for key, v in (("batch_accuracy", step / 60), ("batch_loss", 1 / (step + 1)))
        ]
        for i, run_id in enumerate(run_ids):
            params = [Param("train.lr", str(0.001 * (i + 1))), Param("seed", "0")]
            tags = [RunTag("readout", "state_h"), RunTag("dvc.exp_name", f"exp-{i}")]
            client.log_batch(run_id, points, params, tags)
            client.log_metric(run_id, "test_accuracy", 0.9 + i / 100)
            client.log_dict(run_id, {"actual_by_predicted": [[i]]}, "confusion_matrix.json")
        client.set_terminated(run_ids[1], "FINISHED")
        client.set_terminated(run_ids[2], "FAILED")
        # A comparison's parent run, listed after its children (it started first): moved first.
        parent = client.create_run(experiment, start_time=1, run_name="workspace: readouts")
        for run_id in run_ids[:2]:
            client.set_tag(run_id, PARENT, parent.info.run_id)
        client.set_terminated(parent.info.run_id)
        second = register.log_image_model(
            "state_h", run_ids[1], sequence_index("rows", 0), "mnist", images[:2]
        )
        for uri, accuracy in ((first, "0.91"), (second, "0.92")):
            mlflow.register_model(uri, "rnn-mnist", tags={"test_accuracy": accuracy})
        client.create_model_version(
            "rnn-mnist", f"runs:/{run_ids[2]}/notes", run_ids[2]
        )  # no model
        client.set_registered_model_alias("rnn-mnist", "champion", "1")
        client.set_registered_model_alias("rnn-mnist", "challenger", "2")
        expected = mlflow.pyfunc.load_model("models:/rnn-mnist@champion").predict(images)
        source = {r.info.run_id: r for r in client.search_runs([experiment])}
        mlflow.set_tracking_uri(None)

    dst = MlflowClient(server)
    cut_off = dst.create_run(  # a move killed half-way: redone, and the half removed
        dst.get_experiment_by_name(name).experiment_id,
        tags={"migrated.run_id": run_ids[2], "migrated.complete": "false"},
    ).info.run_id
    out = call_stage("migrate", tmp_path, "--to", server)
    assert out.returncode == 0, out.stderr
    assert "migrate: 4 runs moved (363 metric points), 0 already there" in out.stdout
    assert f"rnn-mnist v3 skipped: its source runs:/{run_ids[2]}/notes was not moved" in out.stdout
    assert dst.get_run(cut_off).info.lifecycle_stage == "deleted"
    moved_experiment = dst.get_experiment_by_name(name).experiment_id
    moved = {r.data.tags["migrated.run_id"]: r for r in dst.search_runs([moved_experiment])}
    assert moved.keys() == source.keys()
    for run_id, old in source.items():
        new = moved[run_id]
        assert new.info.run_id != run_id
        assert new.data.params == old.data.params
        assert {k: v for k, v in new.data.tags.items() if k not in (*MIGRATED, PARENT)} == {
            k: v for k, v in old.data.tags.items() if k != PARENT
        }
        if PARENT in old.data.tags:  # nested in the copy of its parent, as mlflow ui shows it
            assert new.data.tags[PARENT] == moved[old.data.tags[PARENT]].info.run_id
        for field in ("status", "start_time", "end_time", "run_name"):
            assert getattr(new.info, field) == getattr(old.info, field), field
        assert history(dst, new.info.run_id, old.data.metrics) == history(
            MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), run_id, old.data.metrics
        )
        files = [] if run_id == parent.info.run_id else ["confusion_matrix.json"]
        assert [a.path for a in dst.list_artifacts(new.info.run_id)] == files

    versions = {
        v.tags["migrated.version"]: v for v in dst.search_model_versions("name='rnn-mnist'")
    }
    assert sorted(versions) == ["1", "2"]
    assert [versions[v].tags["test_accuracy"] for v in ("1", "2")] == ["0.91", "0.92"]
    assert dst.get_registered_model("rnn-mnist").aliases == {"champion": "1", "challenger": "2"}
    assert versions["1"].run_id == moved[run_ids[0]].info.run_id
    mlflow.set_tracking_uri(server)
    try:
        champion = mlflow.pyfunc.load_model("models:/rnn-mnist@champion").predict(images)
    finally:
        mlflow.set_tracking_uri(None)
    assert np.array_equal(champion["class"], expected["class"])
    np.testing.assert_allclose(champion["probabilities"], expected["probabilities"])

    again = call_stage("migrate", tmp_path, "--to", server)
    assert "migrate: 0 runs moved (0 metric points), 4 already there" in again.stdout, again.stderr
    assert len(dst.search_runs([moved_experiment])) == 4
    assert len(dst.search_model_versions("name='rnn-mnist'")) == 2, again.stdout
    assert len(dst.search_logged_models([moved_experiment])) == 2

    # The server's aliases are the team's: a local champion does not take them over.
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").set_registered_model_alias(
        "rnn-mnist", "champion", "2"
    )
    third = call_stage("migrate", tmp_path, "--to", server)
    assert "rnn-mnist@champion stays v1 on the server (yours: v2)" in third.stdout, third.stderr
    assert dst.get_registered_model("rnn-mnist").aliases["champion"] == "1"


def test_a_second_machines_versions_arrive_beside_the_first(server: str, tmp_path) -> None:
    """Two clones' stores, each with its own v1 and v2, moved to one server: all four arrive,
    the second's as v3 and v4, and the server's aliases stay the team's."""
    images = np.random.default_rng(1).integers(0, 256, (2, 28, 28)).astype(np.float32)
    models = {}
    for clone in ("a", "b"):
        (tmp_path / clone).mkdir()
        with working_in(tmp_path / clone) as root:
            first = log_small_image_model(root, images)
            run_id = MlflowClient().get_logged_model(first.removeprefix("models:/")).source_run_id
            second = register.log_image_model(
                "state_h", run_id, sequence_index("rows", 0), "mnist", images
            )
            models[clone] = [uri.removeprefix("models:/") for uri in (first, second)]
            for uri in (first, second):
                mlflow.register_model(uri, "rnn-mnist", tags={"clone": clone})
            client = MlflowClient()
            client.set_registered_model_alias("rnn-mnist", "champion", "1")
            if clone == "b":
                client.set_registered_model_alias("rnn-mnist", "challenger", "2")

    dst = MlflowClient(server)
    out = call_stage("migrate", tmp_path / "a", "--to", server)
    assert out.returncode == 0, out.stderr
    out = call_stage("migrate", tmp_path / "b", "--to", server)
    assert out.returncode == 0, out.stderr
    assert "migrate: 1 runs moved" in out.stdout
    for line in ("v1 -> v3", "v2 -> v4", "@champion stays v1 on the server (yours: v3)"):
        assert f"migrate: rnn-mnist{' ' * (line[0] == 'v')}{line}" in out.stdout, out.stdout
    assert "migrate: rnn-mnist@challenger -> v4" in out.stdout

    versions = {v.version: v for v in dst.search_model_versions("name='rnn-mnist'")}
    assert sorted(versions, key=int) == ["1", "2", "3", "4"]
    for number, clone, old in (("1", "a", 0), ("2", "a", 1), ("3", "b", 0), ("4", "b", 1)):
        version = versions[number]
        assert version.tags["clone"] == clone
        assert version.tags["migrated.version"] == str(old + 1)
        moved_model = dst.get_logged_model(version.source.removeprefix("models:/"))
        assert moved_model.tags["migrated.model_id"] == models[clone][old]
    assert dst.get_registered_model("rnn-mnist").aliases == {"champion": "1", "challenger": "4"}

    again = call_stage("migrate", tmp_path / "b", "--to", server)
    assert "migrate: 0 runs moved (0 metric points), 1 already there" in again.stdout, again.stderr
    assert len(dst.search_model_versions("name='rnn-mnist'")) == 4, again.stdout
