"""Logging runs to MLflow: tags, params, buffered metrics, cost and models.

Where the store is, and whether it is usable, is pipeline/store.py's job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import mlflow
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS, MLFLOW_PARENT_RUN_ID

if TYPE_CHECKING:
    import keras
    import numpy as np

MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
COMPARES = "compare.runs"  # on a comparison's parent run: the readout runs it compares


def params_hash(params: dict[str, str]) -> str:
    """Names the exact configuration: the same logged params give the same hash, in any store."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("DVC_EXP_BASELINE_REV", "unknown")


def run_tags(readout: str, meta: dict) -> dict[str, str]:
    """Tags that let runs be grouped and trusted: what was read out, from which data and code."""
    source = meta["source"]
    commit = git_commit()
    tags = {
        "readout": readout,
        "data.source": source["source"],
        "data.dataset": source["dataset"],
        "data.sha256": meta["sha256"],
        "sequence.order": meta["order"],
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
    }
    if exp := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp
    return tags


class MetricBuffer:
    """Collects metric points in memory and sends them with log_batch, 1,000 per request.

    One log_metric call per batch would cost 10-30 % of training time; a flush per epoch ~1 %.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.client = MlflowClient()
        self.pending: list[Metric] = []
        self.seconds = 0.0  # time spent in flush(), to show what logging costs

    def add(self, key: str, value: float, step: int) -> None:
        self.pending.append(Metric(key, float(value), int(time.time() * 1000), step))

    def dump(self) -> list[list]:
        """The unsent points, as JSON-able rows for a checkpoint."""
        return [[m.key, m.value, m.step, m.timestamp] for m in self.pending]

    def restore(self, rows: list[list]) -> None:
        self.pending = [Metric(key, value, timestamp, step) for key, value, step, timestamp in rows]

    def flush(self, skip_logged: bool = False) -> None:
        """Send the pending points; with skip_logged, only those whose (key, step) the run lacks."""
        start = time.perf_counter()
        if skip_logged and self.pending:
            logged = {
                (m.key, m.step)
                for key in {m.key for m in self.pending}
                for m in self.client.get_metric_history(self.run_id, key)
            }
            self.pending = [m for m in self.pending if (m.key, m.step) not in logged]
        for i in range(0, len(self.pending), MAX_METRICS_PER_REQUEST):
            chunk = self.pending[i : i + MAX_METRICS_PER_REQUEST]
            self.client.log_batch(self.run_id, metrics=chunk)
        self.pending.clear()
        self.seconds += time.perf_counter() - start


class _KerasWithExample:
    """mlflow.keras.save_model, into a folder created first.

    Works around mlflow#16183: log_model(input_example=...) writes the example before the model
    folder exists and fails with FileNotFoundError (MLflow 3.17-3.18).
    """

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path: str, **kwargs: object) -> None:
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)


@contextlib.contextmanager
def run(
    experiment_id: str, run_id: str | None, name: str, params: dict, tags: dict[str, str]
) -> Iterator[str]:
    """Start a run (or resume run_id) with its params and tags; yield its id.

    It ends FINISHED when the block completes, KILLED on Ctrl-C or SIGTERM (KeyboardInterrupt),
    FAILED on any other exception. (mlflow.start_run's own context manager knows no KILLED.)
    """
    active = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=name)
    try:
        mlflow.log_params({k: str(v) for k, v in params.items()})
        mlflow.set_tags(tags)
        yield active.info.run_id
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def mark_killed(run_id: str | None) -> None:
    """End a run that can never be finished (its checkpoint is for other params or data)."""
    if run_id is not None:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            MlflowClient().set_terminated(run_id, "KILLED")


def log_cost(seconds: float, samples: int, logging_seconds: float) -> None:
    """What training cost: time, throughput, time spent sending metrics, peak memory."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mlflow.log_metrics(
        {
            "train_seconds": seconds,
            "samples_per_second": samples / seconds,
            "logging_seconds": logging_seconds,  # within train_seconds
            "peak_rss_mib": peak / (1024 * 1024 if sys.platform == "darwin" else 1024),
        }
    )


def log_model(model: keras.Model, example: np.ndarray) -> str:
    """Log the Keras model to the active run with its signature and an input example; its URI."""
    from mlflow.models import Model, infer_signature

    from pipeline.tf import keras, tf

    info = Model.log(
        artifact_path=None,
        name="model",
        flavor=_KerasWithExample,
        flavor_name="keras",
        model=model,
        signature=infer_signature(example, model.predict(example, verbose=0)),
        input_example=example,
        # Given, not inferred: inference re-imports the model in a subprocess (~10 s).
        pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"],
    )
    return info.model_uri


def comparison_parent(runs: list[Run], name: str) -> str:
    """The id of the parent run of one comparison of readout runs (`mlflow ui` nests them in it).

    Found by the runs it compares (tag compare.runs), so a rerun of compare logs into the same
    parent; else created in their experiment, started when the first of them started. Readout runs
    not nested yet are nested in it; one nested elsewhere (an earlier comparison) stays there.
    """
    client = MlflowClient()
    key = " ".join(run.info.run_id for run in runs)
    experiment_id = runs[0].info.experiment_id
    query = f"tags.`{COMPARES}` = '{key}'"
    found = client.search_runs([experiment_id], query, max_results=1, order_by=["start_time ASC"])
    if found:
        parent = found[0].info.run_id
    else:
        start = min(run.info.start_time for run in runs)
        parent = client.create_run(experiment_id, start, {COMPARES: key}, name).info.run_id
    for run in runs:
        if MLFLOW_PARENT_RUN_ID not in run.data.tags:
            client.set_tag(run.info.run_id, MLFLOW_PARENT_RUN_ID, parent)
    return parent


def log_table(run_id: str, columns: dict[str, list], path: str) -> None:
    """A table artifact that `mlflow ui` shows as a table (artifact view, Artifacts tab).

    Logged again, it is replaced: mlflow.log_table would append the rows to the existing ones.
    """
    client = MlflowClient()
    rows = [list(row) for row in zip(*columns.values(), strict=True)]
    client.log_dict(run_id, {"columns": list(columns), "data": rows}, path)  # log_table's format
    tables = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    if (entry := {"path": path, "type": "table"}) not in tables:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*tables, entry]))
