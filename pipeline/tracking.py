"""Logging runs to MLflow: tags, params, buffered metrics, cost and models.

Where the store is, and whether it is usable, is pipeline/store.py's job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.entities import LoggedModelStatus, Metric, Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS, MLFLOW_PARENT_RUN_ID

if TYPE_CHECKING:
    import keras
    import numpy as np

MAX_METRICS_PER_REQUEST = 1000  # MLflow's log_batch limit
COMPARES = "compare.runs"  # on a comparison's parent run: the readout runs it compares
OWNER = "pipeline.process"  # "<machine> <pid>" of the process whose stage last opened the run


def params_hash(params: dict[str, str]) -> str:
    """Names the exact configuration: the same logged params give the same hash, in any store."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


# Logged params left out of a replicate key: the replicate axis (train.seed), and those that cannot
# change a trained model (which readouts a run's siblings trained, the registry, a download's
# timeout, how often batch metrics are logged).
NOT_REPLICATE = ("train.seed", "readouts", "data.timeout", "train.log_every_n_batches")


def replicate_params(params: dict[str, str]) -> dict[str, str]:
    """The logged params that make runs replicates of each other when equal."""
    return {
        k: v for k, v in params.items() if k not in NOT_REPLICATE and not k.startswith("registry.")
    }


def replicate_key(params: dict[str, str], readout: str, data_sha256: str) -> str:
    """Names a configuration up to the training seed: runs with the same key are replicates.

    The readout and the prepared data (the data.sha256 tag: with data.source auto, one params set
    can mean the full data or the bundled subset) count; train.seed does not. Computed from the
    logged params, so that runs from before train.seed group too (their seed is the training seed).
    """
    what = {**replicate_params(params), "readout": readout, "data.sha256": data_sha256}
    return params_hash(what)


def effective_seed(params: dict[str, str]) -> str:
    """The seed training drew from, as logged: train.seed, else (null, or a run from before the
    param) the top-level seed."""
    seed = params.get("train.seed", "None")
    return params.get("seed", "?") if seed == "None" else seed


# What a run depends on besides its data (data.sha256 names that; DVC-tracked outputs are made,
# not inputs): a change to these since git.commit means the commit alone cannot reproduce the run.
SOURCES = {"params": ("params.yaml",), "code": ("pipeline/*.py", "dvc.yaml", "pyproject.toml")}
GIT_TIMEOUT = 10  # seconds; git answers in milliseconds, a hung one must not stop training


def _git(*args: str) -> bytes:
    # --no-optional-locks: never write the index, which the user's own git may be using
    command = ("git", "--no-optional-locks", *args)
    return subprocess.run(command, capture_output=True, check=True, timeout=GIT_TIMEOUT).stdout


def _status(paths: list[str]) -> tuple[str, list[bytes], list[bytes]]:
    """(HEAD commit, changed tracked paths, untracked paths) among paths, in one git call."""
    status = ("status", "--porcelain=v2", "--branch", "-z", "--untracked-files=all", "--no-renames")
    entries = _git(*status, "--", *paths).split(b"\0")
    oid = b"# branch.oid "
    commit = next(e.removeprefix(oid).decode() for e in entries if e.startswith(oid))
    if commit == "(initial)":
        raise ValueError("no commit yet")
    changed = [e.split(b" ", 8)[8] for e in entries if e.startswith(b"1 ")]
    changed += [e.split(b" ", 10)[10] for e in entries if e.startswith(b"u ")]  # unmerged
    return commit, changed, sorted(e[2:] for e in entries if e.startswith(b"? "))


def _toplevel() -> Path:
    """The work tree's root, where git status names paths from."""
    here = Path.cwd()
    return next((d for d in (here, *here.parents) if (d / ".git").exists()), here)


def git_state() -> dict[str, str]:
    """git.commit; git.dirty: false, or which of params and code differ from it (params,code);
    when dirty, git.diff_sha256: sha256 of `git diff HEAD` over SOURCES followed by each untracked
    file among them (NUL, path, NUL, content). No git or no commit: git.dirty is unknown."""
    paths = [path for group in SOURCES.values() for path in group]
    try:
        commit, changed, untracked = _status(paths)
        # Under `dvc exp run` (workspace, --temp or --queue alike) git sees the -S params and the
        # workspace's edits applied over the baseline; DVC commits them all into the experiment,
        # so they do not count. It leaves untracked files out of that commit: those still do.
        if os.environ.get("DVC_EXP_NAME"):
            changed = []
        diff = b""
        if changed:
            options = ("--binary", "--no-color", "--no-ext-diff", "--no-textconv", "--no-relative")
            prefixes = ("--src-prefix=a/", "--dst-prefix=b/")  # whatever the user's diff config
            diff = _git("diff", "HEAD", *options, *prefixes, "--", *paths)
        root = _toplevel()
        for path in untracked:
            diff += b"\0" + path + b"\0" + (root / os.fsdecode(path)).read_bytes()
    except (OSError, subprocess.SubprocessError, StopIteration, ValueError):
        commit = os.environ.get("DVC_EXP_BASELINE_REV", "unknown")
        return {"git.commit": commit, "git.dirty": "unknown"}
    is_params = {Path(os.fsdecode(path)).name == "params.yaml" for path in changed + untracked}
    kinds = [kind for kind, params in (("params", True), ("code", False)) if params in is_params]
    if not kinds:
        return {"git.commit": commit, "git.dirty": "false"}
    digest = hashlib.sha256(diff).hexdigest()
    return {"git.commit": commit, "git.dirty": ",".join(kinds), "git.diff_sha256": digest}


def run_tags(readout: str, meta: dict) -> dict[str, str]:
    """Tags that let runs be grouped and trusted: what was read out, from which data and code."""
    source = meta["source"]
    git = git_state()
    return {
        "readout": readout,
        "data.source": source["source"],
        "data.dataset": source["dataset"],
        "data.sha256": meta["sha256"],
        "sequence.order": meta["order"],
        **git,
        "mlflow.source.git.commit": git["git.commit"],
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),  # "": a workspace run
    }


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


def owner() -> dict[str, str]:
    """The tag naming this process as the run's owner, for end_abandoned() in later stages."""
    return {OWNER: f"{socket.gethostname()}/{uuid.getnode():x} {os.getpid()}"}


def _gone(tag: str) -> bool:
    """Whether the owner named by an OWNER tag is a process of this machine that has ended."""
    machine, _, pid = tag.rpartition(" ")
    if machine != owner()[OWNER].rpartition(" ")[0] or not pid.isdigit():
        return False  # another machine's process (or no tag): it may well be running
    if int(pid) == os.getpid():
        return True  # a process of our id that ended before us: no run of ours is open yet
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process has that id now
        return False
    return False


def end_abandoned(experiment_id: str) -> None:
    """Mark FAILED the runs that a process of this machine left RUNNING when it ended (killed, or
    unable to write FAILED to a full disk), and the models they left PENDING."""
    client = MlflowClient()
    mine = mlflow.active_run()
    for found in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        run_id = found.info.run_id
        if (mine and run_id == mine.info.run_id) or not _gone(found.data.tags.get(OWNER, "")):
            continue
        client.set_terminated(run_id, "FAILED")
        # By run, not by status: MLflow 3.17's SQL store never matches `status = 'PENDING'`
        for model in client.search_logged_models([experiment_id], f"source_run_id = '{run_id}'"):
            if model.status == LoggedModelStatus.PENDING:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        print(f"run {run_id}: its process ended without ending it: marked FAILED")


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
        mlflow.set_tags(tags | owner())
        yield active.info.run_id
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        # On a full disk even this may fail: the run then stays RUNNING until end_abandoned()
        with contextlib.suppress(Exception):
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
