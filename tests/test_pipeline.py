"""End to end: the real `dvc repro` on a copy of the repo, checked through MlflowClient.

Small params (bundled MNIST subset, 1 epoch) keep it to a few minutes on 2 cores.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from helpers import (
    assert_quiet,
    call_stage,
    copy_project,
    drawing_png,
    dvc,
    env_without_project,
    free_port,
    post,
    wait_until_up,
)
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import params as P
from pipeline import store, tracking
from pipeline.model import build_model
from pipeline.train import epoch_batches

SMALL = {"data": {"source": "bundled"}, "train": {"epochs": 1}}
# train.seed = seed trains exactly as train.seed null (the later tests' champion stays the same)
TEMP_OVERRIDES = ("-S", "readouts=[state_h]", "-S", "train.lr=0.002", "-S", "train.seed=42")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git + DVC copy of the project with small params, after a real `dvc repro`."""
    repo = copy_project(tmp_path_factory.mktemp("repo"), SMALL)
    out = dvc("repro", cwd=repo)
    (repo.parent / "repro.log").write_text(out.stdout + out.stderr)
    return repo


def test_dvc_repro_prints_progress_but_no_tensorflow_noise(repo: Path) -> None:
    log = (repo.parent / "repro.log").read_text()
    assert_quiet(log)
    assert "epoch 1/1: accuracy" in log and "evaluate state_h: test accuracy" in log


@pytest.fixture
def client(repo: Path) -> MlflowClient:
    """The repo's store, also as MLflow's default (set per test: call_stage resets it)."""
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def run_of(repo: Path, client: MlflowClient, readout: str):
    run_id = json.loads((repo / "models" / readout / "run.json").read_text())["run_id"]
    return client.get_run(run_id)


def test_one_finished_run_per_readout_with_params_and_tags(
    repo: Path, client: MlflowClient
) -> None:
    params = P.load(repo / "params.yaml")
    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    for readout in ("state_h", "output_last"):
        run = run_of(repo, client, readout)
        assert run.info.status == "FINISHED"
        assert run.data.params == {k: str(v) for k, v in params.flat().items()}
        tags = run.data.tags
        assert tags["readout"] == readout
        assert tags["data.source"] == "bundled"
        assert tags["data.sha256"] == meta["sha256"]
        assert len(tags["git.commit"]) == 40 and tags["git.dirty"] == "false"
        metrics = run.data.metrics
        for key in ("accuracy", "loss", "val_accuracy", "val_loss", "test_accuracy", "test_loss"):
            assert key in metrics
        evaluated = json.loads((repo / "eval" / readout / "metrics.json").read_text())
        assert metrics["test_accuracy"] == evaluated["test_accuracy"]
        assert evaluated["test_accuracy"] > 0.5  # one epoch on 3,600 digits learns something
    # Artifacts live in the repo root, where `mlflow ui` started there finds them.
    assert (repo / "mlruns").is_dir()


def champion_of(repo: Path) -> tuple[str, str]:
    """(registered model name, champion's version) from the register stage's report."""
    registry = json.loads((repo / "reports/registry.json").read_text())
    return registry["name"], str(registry["champion"])


def test_register_makes_two_versions_and_a_champion_and_reruns_register_nothing_twice(
    repo: Path, client: MlflowClient
) -> None:
    registry = json.loads((repo / "reports/registry.json").read_text())
    assert registry["name"] == "rnn-mnist"
    versions = client.search_model_versions("name = 'rnn-mnist'")
    by_run = {v.run_id: v for v in versions}
    for readout in ("state_h", "output_last"):
        run_id = json.loads((repo / "models" / readout / "run.json").read_text())["run_id"]
        tags = by_run[run_id].tags
        metrics = json.loads((repo / "eval" / readout / "metrics.json").read_text())
        assert (
            tags["readout"] == readout and float(tags["test_accuracy"]) == metrics["test_accuracy"]
        )
        assert tags["data.source"] == "bundled" and len(tags["git.commit"]) == 40
        assert len(tags["params_hash"]) == 10 and len(tags["test_data.sha256"]) == 64
        # evaluate's classes of the test images, in eval/ and in the run, for a later decision
        with np.load(repo / "eval" / readout / "predictions.npz", allow_pickle=False) as npz:
            predicted = npz["class"]
        with np.load(repo / "data/raw/dataset.npz", allow_pickle=False) as raw:
            assert np.mean(predicted == raw["y_test"]) == metrics["test_accuracy"]
        assert "predictions.npz" in {f.path for f in client.list_artifacts(run_id)}
    champion = client.get_model_version_by_alias("rnn-mnist", "champion")
    assert champion.tags["registry.reason"] == "first model: there was no champion"
    assert "registry.p_value" not in champion.tags and registry["paired_test"] is None
    assert client.get_model_version_by_alias("rnn-mnist", "challenger").version == champion.version
    count = len(versions)
    out = call_stage("register", repo)  # this stage alone, again
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("already registered for this run") == 2, out.stdout
    assert len(client.search_model_versions("name = 'rnn-mnist'")) == count


def test_batch_accuracy_is_each_batch_own_accuracy(repo: Path, client: MlflowClient) -> None:
    params = P.load(repo / "params.yaml")
    run = run_of(repo, client, "state_h")
    history = sorted(
        client.get_metric_history(run.info.run_id, "batch_accuracy"), key=lambda m: m.step
    )
    n_train = json.loads((repo / "data/prepared/meta.json").read_text())["counts"]["train"]
    batches = epoch_batches(n_train, params.train.batch_size, params.seed, 0)
    assert [m.step for m in history] == list(range(len(batches)))  # 3,600 / 128 -> 29 points
    assert len(history) == 29

    # Recompute batch 0 independently: the initial weights (same seed) on the first shuffled batch.
    with np.load(repo / "data/prepared/sequences.npz", allow_pickle=False) as data:
        x, y = data["x_train"][batches[0]], data["y_train"][batches[0]]
    keras.utils.set_random_seed(params.seed)
    model = build_model(28, 28, "lstm", "state_h", 128, 128)
    predicted = model.predict(x, verbose=0).argmax(axis=1)
    assert history[0].value == pytest.approx(float((predicted == y).mean()), abs=1e-7)
    # Not a running mean: the values jump around instead of smoothing out.
    values = np.array([m.value for m in history])
    assert np.abs(np.diff(values)).max() > 0.02


def test_state_h_and_output_last_give_identical_curves(repo: Path, client: MlflowClient) -> None:
    curves = {}
    for readout in ("state_h", "output_last"):
        run_id = run_of(repo, client, readout).info.run_id
        curves[readout] = {
            key: [
                (m.step, m.value)
                for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            ]
            for key in ("batch_accuracy", "batch_loss", "val_loss")
        }
    assert curves["state_h"] == curves["output_last"]
    gap = json.loads((repo / "reports/compare/readout_gap.json").read_text())
    assert gap["max_abs_output_last_minus_state_h"] == 0.0
    report = (repo / "reports/compare/compare.md").read_text()
    assert "| state_h |" in report and "| output_last |" in report
    assert (repo / "reports/compare/batch_accuracy.png").stat().st_size > 10_000


def test_compare_logs_into_a_parent_run_that_nests_both_readout_runs(
    repo: Path, client: MlflowClient
) -> None:
    """What `mlflow ui` shows first (docs/mlflow.md): the comparison, the readout runs inside it."""
    children = {r: run_of(repo, client, r) for r in ("state_h", "output_last")}
    parent_id = children["state_h"].data.tags["mlflow.parentRunId"]
    assert children["output_last"].data.tags["mlflow.parentRunId"] == parent_id
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "workspace: lstm-rows readouts"
    assert parent.info.status == "FINISHED" and "readout" not in parent.data.tags
    assert parent.data.tags["curves_identical"] == "true"
    assert parent.data.tags["data.sha256"] == children["state_h"].data.tags["data.sha256"]
    report = (repo / "reports/compare/compare.md").read_text()
    assert parent.data.tags["mlflow.note.content"] == report
    metrics = parent.data.metrics
    assert metrics["compare/readout_gap"] == 0.0 and metrics["compare/curves_identical"] == 1.0
    for readout, child in children.items():
        assert metrics[f"test_accuracy/{readout}"] == child.data.metrics["test_accuracy"]
    files = {a.path for a in client.list_artifacts(parent_id)}
    assert {"compare.md", "batch_accuracy.png", "readout_gap.json", "compare.json"} <= files
    assert len(client.list_artifacts(parent_id, "images")) == 2  # the overlay, as an image chart
    # Per-class accuracy is a table, not ten metrics crowding the charts.
    for readout, child in children.items():
        assert not [k for k in child.data.metrics if "class" in k]
        table = client.load_table(parent.info.experiment_id, "per_class.json", [child.info.run_id])
        csv = np.loadtxt(repo / "eval" / readout / "per_class.csv", delimiter=",", skiprows=1)
        np.testing.assert_allclose(table["accuracy"], csv[:, 1], rtol=1e-12)  # pandas' JSON
        assert table["images"].sum() == 1_000  # the bundled test set


def test_logged_model_loads_through_pyfunc_and_predicts(repo: Path, client: MlflowClient) -> None:
    info = json.loads((repo / "models/output_last/run.json").read_text())
    pyfunc = mlflow.pyfunc.load_model(info["model_uri"])
    x = np.load(repo / "data/prepared/sequences.npz", allow_pickle=False)["x_test"][:2]
    logits = np.asarray(pyfunc.predict(x))
    assert logits.shape == (2, 10)
    local = keras.saving.load_model(repo / "models/output_last/model.keras", safe_mode=True)
    np.testing.assert_allclose(logits, local.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    spec = pyfunc.metadata.get_input_schema().inputs[0]
    assert spec.shape == (-1, 28, 28)
    assert pyfunc.metadata.saved_input_example_info is not None


def test_editing_lr_reruns_only_train_and_later(repo: Path) -> None:
    text = (repo / "params.yaml").read_text()
    try:
        (repo / "params.yaml").write_text(text.replace("lr: 0.001", "lr: 0.002"))
        status = dvc("status", cwd=repo).stdout
    finally:
        (repo / "params.yaml").write_text(text)
    assert "train@state_h" in status and "train@output_last" in status
    assert "fetch" not in status and "preprocess" not in status


def test_compare_deletes_no_report_the_user_asked_for(repo: Path) -> None:
    report = call_stage("report", repo)  # a report the user asked for, beside compare's output
    assert report.returncode == 0, report.stderr
    compare = call_stage("compare", repo)
    assert compare.returncode == 0, compare.stderr
    assert (repo / "reports/experiments/report.md").exists()


def test_temp_experiment_lands_in_the_root_store(repo: Path, client: MlflowClient) -> None:
    """`dvc exp run --temp` runs in a copy under .dvc/tmp/exps; its runs must not vanish with it."""
    experiment_id = client.get_experiment_by_name(store.EXPERIMENT).experiment_id
    before = {r.info.run_id for r in client.search_runs([experiment_id])}
    dvc("exp", "run", "--temp", *TEMP_OVERRIDES, cwd=repo)

    new = [r for r in client.search_runs([experiment_id]) if r.info.run_id not in before]
    assert len(new) == 2  # the readout run, and the comparison's parent run it is nested in
    (run,) = [r for r in new if "readout" in r.data.tags]
    (parent,) = [r for r in new if r.info.run_id == run.data.tags["mlflow.parentRunId"]]
    assert parent.info.run_name == f"{run.data.tags['dvc.exp_name']}: lstm-rows readouts"
    assert parent.data.tags["dvc.exp_name"] == run.data.tags["dvc.exp_name"]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.002"
    assert run.data.params["train.seed"] == run.data.tags["train.seed"] == "42"  # -S: an int
    workspace = run_of(repo, client, "state_h").data
    assert workspace.params["train.seed"] == "None" and workspace.tags["train.seed"] == "42"
    replicate = {**workspace.params, "train.lr": "0.002"}  # what the key leaves out may differ
    key = tracking.replicate_key(replicate, "state_h", workspace.tags["data.sha256"])
    assert run.data.tags["replicate_of"] == key != workspace.tags["replicate_of"]
    assert run.data.tags["dvc.exp_name"]
    # In the temp copy git sees the -S params over the baseline; DVC commits them: not dirty.
    assert run.data.tags["git.dirty"] == "false"
    assert "test_accuracy" in run.data.metrics  # evaluate found the run that train opened
    assert run.info.artifact_uri.startswith((repo / "mlruns").as_uri())
    # Its register decided on the paired test, with the predictions the champion's run logged
    (version,) = client.search_model_versions(
        f"name = 'rnn-mnist' and run_id = '{run.info.run_id}'"
    )
    assert version.tags["registry.test_images"] == "1000", version.tags
    assert "(the same test images); of 1,000 images" in version.tags["registry.reason"]
    query = f"source_run_id = '{run.info.run_id}'"
    logged_models = client.search_logged_models([experiment_id], filter_string=query)
    assert sorted(m.name for m in logged_models) == ["image_model", "model"]  # train's, register's
    (logged,) = [m for m in logged_models if m.name == "model"]
    x = np.zeros((1, 28, 28), np.float32)
    assert np.asarray(mlflow.pyfunc.load_model(f"models:/{logged.model_id}").predict(x)).shape == (
        1,
        10,
    )


def test_an_experiment_that_repeats_earlier_params_gets_its_own_identical_mlflow_run(
    repo: Path, client: MlflowClient
) -> None:
    """DVC would restore train from its run cache and log nothing; persist: true prevents that,
    so grouping by dvc.exp_name in mlflow ui finds every experiment's model."""
    experiment_id = client.get_experiment_by_name(store.EXPERIMENT).experiment_id
    query = "params.`train.lr` = '0.002'"
    first = client.search_runs([experiment_id], query)
    assert len(first) == 1  # the temp experiment above
    # The very same params again, as far as evaluate: compare and register add nothing here.
    dvc("exp", "run", "--temp", "evaluate@state_h", *TEMP_OVERRIDES, cwd=repo)
    runs = client.search_runs([experiment_id], query)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["dvc.exp_name"] for r in runs}) == 2
    # Training is deterministic: the second run's curve and results are the first's, bit for bit.
    for key in ("test_accuracy", "test_loss"):
        assert runs[0].data.metrics[key] == runs[1].data.metrics[key], key
    a, b = (
        sorted(
            (m.step, m.value) for m in client.get_metric_history(r.info.run_id, "batch_accuracy")
        )
        for r in runs
    )
    assert a == b and len(a) == 29


def test_the_champion_takes_images_and_scores_exactly_what_evaluate_scored(
    repo: Path, client: MlflowClient
) -> None:
    name, version = champion_of(repo)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    with np.load(repo / "data/raw/dataset.npz", allow_pickle=False) as raw:
        images, labels = raw["x_test"], raw["y_test"]
    predicted = model.predict(images.astype(np.float32))["class"]
    readout = client.get_model_version(name, version).tags["readout"]
    evaluated = json.loads((repo / "eval" / readout / "metrics.json").read_text())
    assert float(np.mean(predicted == labels)) == evaluated["test_accuracy"]


def digit_pngs(repo: Path, folder: Path, n: int = 20) -> tuple[list[str], np.ndarray]:
    """Test digits as people have them: big, inverted, coloured, on light paper, as JPEG."""
    with np.load(repo / "data/raw/dataset.npz", allow_pickle=False) as raw:
        digits = raw["x_test"][:n]
    names = []
    for i, digit in enumerate(digits):
        image = Image.fromarray(digit)
        variant = i % 4
        if variant == 1:  # black ink on white paper, 10x larger
            image = Image.fromarray(255 - digit).resize((280, 280), Image.LANCZOS)
        if variant == 2:  # blue ink on light yellow, RGB
            ink = digit[..., None] / 255.0
            paper, pen = np.array([250, 240, 190]), np.array([20, 30, 140])
            image = Image.fromarray((paper * (1 - ink) + pen * ink).astype(np.uint8))
            image = image.resize((112, 112), Image.BICUBIC)
        name = f"digit{i}.{'jpg' if variant == 3 else 'png'}"
        image.save(folder / name, quality=95) if variant == 3 else image.save(folder / name)
        names.append(name)
    return names, digits


def test_predict_classifies_image_files_as_the_arrays_from_any_folder(repo: Path) -> None:
    folder = repo / "drawings"
    folder.mkdir(exist_ok=True)
    names, digits = digit_pngs(repo, folder)
    np.save(folder / "digits.npy", digits)
    out = call_stage("predict", folder, *names, "digits.npy", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    from_files = [r["class"] for r in rows[: len(names)]]
    from_arrays = [r["class"] for r in rows[len(names) :]]
    agree = np.mean(np.array(from_files) == np.array(from_arrays))
    assert agree >= 0.9, (from_files, from_arrays)  # resampling moves a few pixels
    assert not (folder / "mlflow.db").exists()  # the project's store, found from a subfolder


def test_mlflow_models_serve_answers_like_predict(repo: Path) -> None:
    """Arrays and PNG files (base64 in JSON) get predict's classes from a server started where
    this project is not importable: the model folder holds all the code it needs."""
    name, _ = champion_of(repo)
    port, log = free_port(), repo.parent / "serve.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    elsewhere = repo.parent / "client"
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # as docs/serving.md says
    env = env_without_project(repo.parent / "site", MLFLOW_TRACKING_URI=uri, **quiet)
    elsewhere.mkdir()
    with np.load(repo / "data/raw/dataset.npz", allow_pickle=False) as raw:
        images = raw["x_test"][:20]
    drawings = [elsewhere / f"drawing{i}.png" for i in range(5)]
    for path, image in zip(drawings, images, strict=False):
        path.write_bytes(drawing_png(image))  # black on white, 140 px: as a user draws
    files = [base64.b64encode(path.read_bytes()).decode() for path in drawings]
    with log.open("w") as err:
        server = subprocess.Popen(
            command, cwd=elsewhere, env=env, stdout=err, stderr=err, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(f"{url}/ping", server)
        started = log.stat().st_size
        assert_quiet(log.read_text())  # no cuInit, oneDNN or download bars at start
        for _ in range(3):
            status, arrays = post(url, {"inputs": images.tolist()})
            assert status == 200, arrays
        status, pngs = post(url, {"inputs": files})
        assert status == 200, pngs
        status, refused = post(url, {"inputs": [files[0], "not base64!"]})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert status == 400 and "image 1: not base64" in refused["message"], refused
    np.save(repo / "served.npy", images)
    local = call_stage("predict", repo, "served.npy", "--json")
    expected = [json.loads(line)["class"] for line in local.stdout.splitlines()]
    assert arrays["predictions"]["class"] == expected
    np.testing.assert_allclose(np.sum(arrays["predictions"]["probabilities"], axis=1), 1, rtol=1e-5)
    local = call_stage("predict", repo, *map(str, drawings), "--json")
    expected = [json.loads(line)["class"] for line in local.stdout.splitlines()]
    assert pngs["predictions"]["class"] == expected, local.stderr
    per_call = log.read_bytes()[started:].decode(errors="replace")  # written while answering
    assert "step/step" not in per_call and "it/s" not in per_call, per_call
