"""Stage 6, register: each readout's model -> a version of a registered model, and its aliases.

Each trained readout's network is logged as an image model (pipeline/packaging.py: images or
PNG/JPEG files in, class probabilities out) and registered as a new version of `registry.name`
(default rnn-<dataset>), tagged with its training run's tags (data, commit, a dirty workspace)
and its test accuracy. The best version of this run becomes alias `challenger`. It becomes
`champion` only if, on this run's test images, it beats the current champion's test accuracy by at
least registry.min_improvement and an exact McNemar test on the two models' paired per-image
predictions says the gain is real at registry.alpha (the champion's predictions are those its run
logged when it was tested on the same images, else it is scored again); and a model trained on the
bundled subset never displaces one trained on full-size data. Every decision, with the test's
counts, p-value and the gain's interval, is printed, tagged on the challenger and written to
reports/registry.json. A rerun registers nothing twice: versions are found by their run id.
Params: readouts, registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import tempfile
import time
from collections.abc import Callable, Iterator

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import params as P
from pipeline import store, tracking
from pipeline.io import load_npz, read_json, write_json
from pipeline.packaging import image_model, sequence_index
from pipeline.stage import (
    EVAL,
    MODELS,
    PREDICTIONS,
    PREPARED,
    RAW,
    REGISTRY,
    ConfigError,
    DataError,
    need_space,
    run_stage,
)
from pipeline.stats import McNemar, mcnemar

STALE_LOCK = 600  # seconds: a decision takes seconds; a lock this old was left by a killed stage
LOCK_NOTE = (
    "held while a register stage decides the champion, deleted after; one left by a killed stage "
    f"is removed after {STALE_LOCK // 60} minutes, or delete it in the Models page"
)
# The paired test of the last decision, on the challenger (removed when a decision had none)
TEST_TAGS = ("test_images", "mcnemar_b", "mcnemar_c", "p_value", "gain", "gain_ci95")


def log_image_model(
    readout: str, run_id: str, index: np.ndarray, dataset: str, example: np.ndarray
) -> str:
    """Log the readout's network, wrapped to take images, into its run; return the model URI."""
    network = MODELS / readout / "model.keras"
    with (
        image_model(network, index, dataset) as parts,
        mlflow.start_run(run_id=run_id, tags=tracking.owner()),
    ):
        # MLflow runs the example once: the logged model is known to load
        info = mlflow.pyfunc.log_model(name="image_model", input_example=example, **parts)
    return info.model_uri


def classes(model_uri: str, images: np.ndarray) -> np.ndarray:
    """The class an image model predicts for each image."""
    return np.asarray(
        mlflow.pyfunc.load_model(model_uri).predict(images.astype(np.float32))["class"]
    )


def counts_as(predicted: np.ndarray, labels: np.ndarray, accuracy: float) -> bool:
    """Whether these are predictions for these labels that score `accuracy` (to one image)."""
    if predicted.shape != labels.shape:
        return False
    return abs(float(np.mean(predicted == labels)) - accuracy) < 0.5 / len(labels)


def challenger_predictions(readout: str, labels: np.ndarray) -> np.ndarray:
    """The classes evaluate predicted for this run's test images, checked against its metrics."""
    path = EVAL / readout / PREDICTIONS
    if not path.is_file():
        raise DataError(f"{path}: not found; run the evaluate stage again (dvc repro)")
    predicted = load_npz(path, ("class",))["class"]
    tested = float(read_json(EVAL / readout / "metrics.json")["test_accuracy"])
    if not counts_as(predicted, labels, tested):
        same = predicted.shape == labels.shape
        scored = f" scoring {np.mean(predicted == labels):.4f}" if same else ""
        raise DataError(
            f"{path}: {predicted.size:,} classes{scored}, "
            f"but metrics.json says {tested:.4f} on {labels.size:,} test images: not from the "
            "same evaluation; run the evaluate stage again (dvc repro -f -s evaluate)"
        )
    return predicted


def logged_predictions(client: MlflowClient, run_id: str) -> np.ndarray | None:
    """The predictions evaluate logged into a run, or None if it has none."""
    try:
        if PREDICTIONS not in {f.path for f in client.list_artifacts(run_id)}:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, PREDICTIONS, tmp)
            return load_npz(path, ("class",))["class"]
    except (MlflowException, DataError):  # no such run, or an unreadable file: score it again
        return None


def champion_predictions(
    client: MlflowClient,
    name: str,
    champion: ModelVersion,
    test_sha: str,
    test: dict[str, np.ndarray],
) -> tuple[np.ndarray, str]:
    """The champion's class for each of this run's test images, and where they came from.

    Tested on the same images: the predictions its run logged (those its test_accuracy counts).
    Tested on other images, or its run has none (evaluated before evaluate logged them): its
    registered model scores this run's images again.
    """
    labels = test["y_test"]
    if champion.tags.get("test_data.sha256") == test_sha:
        logged = logged_predictions(client, champion.tags.get("run_id", ""))
        if logged is not None and counts_as(logged, labels, float(champion.tags["test_accuracy"])):
            return logged, "the same test images"
    predicted = classes(f"models:/{name}/{champion.version}", test["x_test"])
    return predicted, f"champion re-scored on this run's {len(labels):,} test images"


def decide(
    client: MlflowClient,
    name: str,
    challenger: ModelVersion,
    test: dict[str, np.ndarray],
    predicted: np.ndarray,
    margin: float,
    alpha: float,
) -> tuple[bool, str, McNemar | None]:
    """Whether the challenger, which predicted these classes of the test images, becomes
    champion; why; and the paired test, if one was made."""
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        return True, "first model: there was no champion", None
    if champion.version == challenger.version:
        return True, "already the champion", None
    new, old = challenger.tags, champion.tags
    if new["data.source"] == "bundled" and old["data.source"] != "bundled":
        why = (
            f"trained on the bundled subset, while champion v{champion.version} was trained on "
            f"full-size data ({old['data.source']}): a subset never displaces it"
        )
        return False, why, None
    # Tested on other images, the champion is scored again on this run's: like with like
    others, basis = champion_predictions(client, name, champion, new["test_data.sha256"], test)
    t = mcnemar(others, predicted, test["y_test"])
    low, high = t.ci95
    versus = (
        f"test accuracy {t.challenger:.4f} vs champion v{champion.version}'s {t.champion:.4f} "
        f"({basis}); of {t.n:,} images {t.c} right only by the challenger, {t.b} only by the "
        f"champion: exact McNemar p {t.p_value:.3g}, gain {t.gain:+.4f} "
        f"(95% CI {low:+.4f} to {high:+.4f})"
    )
    if not (t.gain > 0 and t.gain >= margin):
        return False, f"{versus}: not better by more than registry.min_improvement {margin}", t
    if t.p_value > alpha:
        return False, f"{versus}: p > registry.alpha {alpha}, the gain may be noise", t
    return True, f"{versus}: better by {t.gain:.4f}, p <= registry.alpha {alpha}", t


def register(
    client: MlflowClient, name: str, tags: dict[str, str], make_uri: Callable[[], str]
) -> tuple[ModelVersion, bool]:
    """(version, newly registered): the run's version if it has one, else a new one."""
    query = f"name = '{name}' and run_id = '{tags['run_id']}'"
    found = client.search_model_versions(query)
    if found:
        return found[0], False
    # The client's call, as mlflow.register_model makes it for a `models:/<model id>` URI, without
    # the lines that one prints ("Registered model ... already exists", "Created version ...").
    uri = make_uri()
    version = client.create_model_version(
        name, uri, tags=tags, model_id=uri.removeprefix("models:/")
    )
    return client.get_model_version(name, version.version), True


@contextlib.contextmanager
def decision_lock(client: MlflowClient, uri: str, name: str) -> Iterator[None]:
    """Held while one register stage decides the champion, so that two never both take it.

    On the embedded store, a file lock (stages on one machine). On a tracking server, shared by
    machines that have nothing else in common, a registered model `<name>.lock` that exists while
    one decides: the server creates a name only once, so one stage gets it and the others wait.
    One older than STALE_LOCK seconds is taken to be left by a killed stage and is removed.
    """
    if not uri.startswith(("http://", "https://")):
        with store.store_lock(uri):
            yield
        return
    lock = f"{name}.lock"
    while True:
        try:
            client.create_registered_model(lock, description=LOCK_NOTE)
            break
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue  # MLflow's store, finding the name taken, read it back after its release
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue  # released meanwhile: try again at once
            raise  # e.g. a user who may not read it: run_stage says so, rather than a busy loop
        if time.time() - held.creation_timestamp / 1000 > STALE_LOCK:
            try:
                client.delete_registered_model(lock)
            except MlflowException as exc:
                if exc.error_code == "PERMISSION_DENIED":  # with logins, only its creator may
                    raise ConfigError(
                        f"{lock!r}, left {time.time() - held.creation_timestamp / 1000:.0f} s ago "
                        "by another user's stage that was killed, blocks the champion decision: "
                        "only that user or the server's admin may delete it (the UI's Models page)"
                    ) from None
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # another waiter removed it
                    raise ConfigError(f"cannot remove the stale {lock!r}: {exc.message}") from None
            continue
        time.sleep(random.uniform(0.2, 1.0))
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def check_model(client: MlflowClient, name: str, dataset: str) -> None:
    """Create the registered model if need be; refuse one that holds another dataset's models."""
    with contextlib.suppress(MlflowException):  # it exists already
        client.create_registered_model(name, description=f"{dataset} classifiers: images in")
    others = {v.tags.get("data.dataset") for v in client.search_model_versions(f"name = '{name}'")}
    if others - {dataset, None}:
        raise ConfigError(
            f"registry.name {name!r} holds {', '.join(sorted(others - {None}))} models, not "
            f"{dataset}: models of two datasets never compete; choose another registry.name"
        )


def version_tags(client: MlflowClient, readout: str, test_sha: str) -> dict[str, str]:
    """The train run's own tags (readout, data, sequence, git, DVC experiment: tracking.run_tags),
    and what only this stage knows."""
    run_id = read_json(MODELS / readout / "run.json")["run_id"]
    run = client.get_run(run_id)
    tags = run.data.tags.items()
    own = {k: v for k, v in tags if not k.startswith("mlflow.") and k != tracking.OWNER}
    return own | {
        "test_accuracy": str(read_json(EVAL / readout / "metrics.json")["test_accuracy"]),
        "test_data.sha256": test_sha,
        "params_hash": tracking.params_hash(run.data.params),
        "run_id": run_id,
    }


def register_readouts(
    client: MlflowClient, name: str, params: P.Params, test: dict[str, np.ndarray]
) -> list[ModelVersion]:
    """Each readout's version (its run's, or a new one), with a printed line for each."""
    dataset = params.data.dataset
    check_model(client, name, dataset)
    test_sha = hashlib.sha256(test["x_test"].tobytes() + test["y_test"].tobytes()).hexdigest()
    index = sequence_index(read_json(PREPARED / "meta.json")["order"], params.seed)
    example = test["x_test"][:2].astype(np.float32)  # two real test images, 0-255
    versions = []
    for readout in params.readouts:
        tags = version_tags(client, readout, test_sha)
        version, new = register(
            client,
            name,
            tags,
            lambda r=readout, i=tags["run_id"]: log_image_model(r, i, index, dataset, example),
        )
        print(
            f"register {readout}: {name} v{version.version} "
            + ("registered" if new else "already registered for this run")
            + f", test accuracy {float(version.tags['test_accuracy']):.4f}"
        )
        versions.append(version)
    return versions


def settle(
    client: MlflowClient,
    name: str,
    versions: list[ModelVersion],
    test: dict[str, np.ndarray],
    predictions: dict[str, np.ndarray],
    registry: P.RegistryParams,
) -> dict:
    """Set the aliases and the decision tags; return the record for reports/registry.json.
    predictions: each readout's classes of the test images (challenger_predictions)."""
    challenger = max(versions, key=lambda v: float(v.tags["test_accuracy"]))
    client.set_registered_model_alias(name, "challenger", challenger.version)
    predicted = predictions[challenger.tags["readout"]]
    takes, reason, t = decide(
        client, name, challenger, test, predicted, registry.min_improvement, registry.alpha
    )
    if takes:
        client.set_registered_model_alias(name, "champion", challenger.version)
    decision = "champion" if takes else "challenger"
    client.set_model_version_tag(name, challenger.version, "registry.decision", decision)
    client.set_model_version_tag(name, challenger.version, "registry.reason", reason)
    paired = None if t is None else t.record()
    for key in TEST_TAGS:
        tag = f"registry.{key}"
        if paired is not None:
            value = paired[key]  # the interval as "low,high"
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            client.set_model_version_tag(name, challenger.version, tag, text)
        elif tag in challenger.tags:  # from an earlier decision
            client.delete_model_version_tag(name, challenger.version, tag)
    for other in (v for v in versions if v.version != challenger.version):
        why = f"v{challenger.version} of the same run is the challenger (the best, or first)"
        client.set_model_version_tag(name, other.version, "registry.decision", "none")
        client.set_model_version_tag(name, other.version, "registry.reason", why)
    return {
        "name": name,
        "versions": {v.tags["readout"]: int(v.version) for v in versions},
        "challenger": int(challenger.version),
        "champion": int(client.get_model_version_by_alias(name, "champion").version),
        "decision": decision,
        "reason": reason,
        "paired_test": paired,  # None: first model, already champion, or a subset's challenger
        "min_improvement": registry.min_improvement,
        "alpha": registry.alpha,
        # Whether the challenger's run came from git.commit as committed (tracking.git_state);
        # unknown also for a version registered before runs were tagged so.
        "challenger_dirty": challenger.tags.get("git.dirty", "unknown"),
        "challenger_diff_sha256": challenger.tags.get("git.diff_sha256", ""),
    }


def decision_line(record: dict) -> str:
    """What the stage prints: which version is champion, and why."""
    version = f"{record['name']} v{record['challenger']}"
    dirty, diff = record["challenger_dirty"], record["challenger_diff_sha256"]
    if dirty == "unknown":
        version += " (not known whether from a clean commit)"
    elif dirty != "false":
        version += f" (from a dirty workspace: {dirty}, diff {diff[:12]})"
    reason = record["reason"] + ("; no paired test" if record["paired_test"] is None else "")
    if record["decision"] == "champion":
        return f"register: {version} is the champion: {reason}"
    return f"register: {version} is the challenger, v{record['champion']} stays champion: {reason}"


def main() -> None:
    params = P.load()
    name = params.registry.model_name(params.data.dataset)
    test = load_npz(RAW / "dataset.npz", ("x_test", "y_test"))
    # Checked before anything is registered: a stale file stops the stage with nothing half-done
    predictions = {r: challenger_predictions(r, test["y_test"]) for r in params.readouts}
    uri = store.tracking_uri()
    # Each version's image model holds its network (as big as model.keras) and ~200 KB more
    networks = sum(
        (MODELS / r / "model.keras").stat().st_size
        for r in params.readouts
        if (MODELS / r / "model.keras").is_file()
    )
    need_space("register", 2**20 + networks + 2**18 * len(params.readouts))
    tracking.end_abandoned(store.configure())
    client = MlflowClient()
    # SQLite takes one writer at a time: stages on one machine register in turn. On a server,
    # uploads and registrations go on in parallel; only the decision below waits for others.
    with store.store_lock(uri):
        versions = register_readouts(client, name, params, test)
    # Parallel experiments, on one machine or many, must not both take the champion alias.
    with decision_lock(client, uri, name):
        record = settle(client, name, versions, test, predictions, params.registry)
    print(decision_line(record))
    write_json(REGISTRY, record)


if __name__ == "__main__":
    run_stage(main)
