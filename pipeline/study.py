"""python -m pipeline.study NAME: start or join an Optuna study; --finish registers its best trial.

Reads studies/NAME.yaml (which params vary and how, the sampler, the pruner, the objective) and
runs trials until the study holds --trials complete or pruned ones, counted over every worker.
Each trial is `dvc exp run --temp -n NAME-<number> -S ... train`: a DVC experiment in its own
temporary copy of the repository, whose MLflow train run is tagged study.name and study.trial and
nested under the study's run (its search space, best trial so far and Optuna's plots). The train
stage reports each epoch's validation score to the study and stops when the pruner says so
(pipeline/trial.py).
The study lives in ./optuna.db (SQLite, offline), or in the database of --storage or
PIPELINE_STUDY_STORAGE (PostgreSQL: workers on other machines join the same study). A worker
that dies is noticed by its missing heartbeat, and its trial is retried by another worker.
The objective is a validation score, never the test set's: --finish applies the best trial here
(dvc exp apply) and runs evaluate, compare and register once, as `dvc exp run -n NAME-best-<n>`.
Reference: docs/studies.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing
import warnings
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock, Timeout
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline import store
from pipeline.io import read_json
from pipeline.space import STUDIES, Space, leaf_type, load_space
from pipeline.stage import EVAL, ConfigError, ParamsError, redact, run_stage
from pipeline.trial import ENV, OBJECTIVES, Trial, pruner, quiet, storage

STORAGE_ENV = "PIPELINE_STUDY_STORAGE"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
MAX_FAILURES = 3  # trials failing in a row before a worker gives up: something else is wrong


def suggest(trial: optuna.Trial, key: str, entry: dict[str, Any]) -> Any:
    if "choices" in entry:
        return trial.suggest_categorical(key, entry["choices"])
    suggest_number = trial.suggest_int if leaf_type(key) is int else trial.suggest_float
    return suggest_number(key, entry["low"], entry["high"], log=entry.get("log", False))


def make_sampler(space: Space, seed: int | None) -> optuna.samplers.BaseSampler:
    if space.sampler == "grid":
        grid = {key: entry["choices"] for key, entry in space.params.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(name: str, space: Space, url: str, heartbeat: int) -> tuple[optuna.Study, bool]:
    """Create the study, or join it; True if this worker created it."""
    quiet()
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
    db = storage(url, heartbeat_interval=heartbeat, heartbeat_stale_trial_callback=retry)
    kwargs = {"study_name": name, "storage": db, "pruner": pruner(space.pruner)}
    try:
        sampler = make_sampler(space, space.seed)
        study = optuna.create_study(
            direction=OBJECTIVES[space.objective], sampler=sampler, **kwargs
        )
        study.set_user_attr("space", space.model_dump())
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        # A joiner's sampler draws from fresh entropy: with the study's seed, its first draws
        # would repeat the creator's. (A study is reproducible from its seed with one worker.)
        study = optuna.load_study(sampler=make_sampler(space, None), **kwargs)
    stored = study.user_attrs.get("space")
    if stored is not None and stored != json.loads(json.dumps(space.model_dump())):
        raise ParamsError(
            f"{STUDIES / name}.yaml differs from the search space study {name!r} started with in "
            f"{redact(url)}; give a changed search a new study name"
        )
    return study, False


def study_run(study: optuna.Study, created: bool, space: Space, experiment_id: str) -> str | None:
    """The study's MLflow run: made by the worker that created the study, found by the others."""
    client = MlflowClient()
    if created:
        tags = {"study.name": study.study_name, "mlflow.runName": f"study {study.study_name}"}
        run_id = client.create_run(experiment_id, tags=tags).info.run_id
        for key, entry in space.params.items():
            client.log_param(run_id, f"search.{key}", json.dumps(entry))
        for key in ("objective", "readout", "sampler", "seed", "pruner", "trials"):
            client.log_param(run_id, f"study.{key}", getattr(space, key))
        client.log_dict(run_id, space.model_dump(), "study.yaml")
        study.set_user_attr("mlflow.run_id", run_id)
        return run_id
    for _ in range(30):  # the creator sets it a moment after creating the study
        if run_id := study.user_attrs.get("mlflow.run_id"):
            try:
                return client.get_run(run_id).info.run_id
            except Exception:
                print(f"study {study.study_name}: its MLflow run is in another store; not nested")
                return None
        time.sleep(1)
    return None


def log_progress(study: optuna.Study, run_id: str | None) -> None:
    """The study run's tags (trial counts, best trial) and Optuna's plots, after every trial."""
    if run_id is None:
        return
    client = MlflowClient()
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    client.set_tag(run_id, "study.trials", ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return
    best = study.best_trial
    client.set_tag(run_id, "best.trial", str(best.number))
    client.set_tag(run_id, "best.dvc_exp", best.user_attrs.get("dvc.exp_name", ""))
    client.set_tag(run_id, "best.params", json.dumps(best.params))
    client.log_metric(
        run_id, f"best_{study.user_attrs['space']['objective']}", best.value, step=len(complete)
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    with tempfile.TemporaryDirectory() as tmp:
        figures = {"optimization_history": lambda: plots.plot_optimization_history(study)}
        figures["slice"] = lambda: plots.plot_slice(study)
        if len(complete) >= 2 and len(best.params) >= 2:
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            figures["param_importances"] = lambda: plots.plot_param_importances(
                study, evaluator=evaluator
            )
        for name, draw in figures.items():
            try:
                with warnings.catch_warnings():  # e.g. a slice of one value: "identical xlims"
                    warnings.simplefilter("ignore")
                    axes = draw()
            except (ValueError, RuntimeError):  # too few trials for this plot yet
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.savefig(Path(tmp) / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(figure)
        client.log_artifacts(run_id, tmp, "plots")


class TrialFailed(Exception):
    """A trial's `dvc exp run` failed; the study records it as FAIL and goes on."""


class Surplus(Exception):
    """Another worker took the last trial at the same moment: this one does not count."""


def _die_with_parent() -> None:
    """In the child: SIGKILL when the worker dies, so that a killed worker's dvc stops too."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def trial_lock(exp: str) -> FileLock:
    """Held by the worker that runs trial exp; the kernel releases it when the worker dies."""
    path = Path(".dvc/tmp/study") / f"{exp}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def clean_killed_trials(name: str) -> None:
    """Remove this clone's temporary copies of study trials whose worker was killed: DVC would
    list each as Running for ever (`dvc exp show`), and keep its copy of the repository."""
    from dvc.repo import Repo
    from dvc.repo.experiments.executor.base import ExecutorInfo

    with Repo(".") as repo:
        queue = repo.experiments.tempdir_queue
        for entry in list(queue.iter_active()):
            if not (entry.name or "").startswith(f"{name}-"):
                continue
            lock = trial_lock(entry.name)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # its worker is running it
            try:
                infofile = Path(queue.get_infofile_path(entry.stash_rev))
                shutil.rmtree(ExecutorInfo.load_json(str(infofile)).root_dir, ignore_errors=True)
                shutil.rmtree(infofile.parent, ignore_errors=True)
                print(f"study {name}: removed {entry.name}'s temporary copy: its worker was killed")
            finally:
                lock.release()


def objective_for(
    study: optuna.Study, space: Space, url: str, run_id: str | None, target: int
) -> typing.Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        earlier = [t for t in study.get_trials(deepcopy=False, states=COUNTED)]
        if sum(t.number < trial.number for t in earlier) >= target:
            trial.set_user_attr("surplus", True)
            raise Surplus(f"trial {trial.number}: the study already has {target} trials")
        values = {key: suggest(trial, key, entry) for key, entry in space.params.items()}
        exp = f"{study.study_name}-{trial.number}"
        trial.set_user_attr("dvc.exp_name", exp)
        trial.set_user_attr("worker", f"{socket.gethostname()} {os.getpid()}")
        sets = space.set | values | {"readouts": [space.readout]}
        env = os.environ | {
            ENV: Trial(
                study.study_name,
                trial.number,
                trial._trial_id,
                url,
                space.pruner,
                space.objective,
                os.getpid(),
                run_id,
            ).to_env()
        }
        overrides = [a for k, v in sets.items() for a in ("-S", f"{k}={json.dumps(v)}")]
        command = ["dvc", "exp", "run", "--temp", "-n", exp, *overrides, "train"]
        shown = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
        )
        start = time.monotonic()
        with trial_lock(exp):  # held while its temporary copy exists: see clean_killed_trials
            done = subprocess.run(
                command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                preexec_fn=_die_with_parent,
                check=False,
            )
        seconds = time.monotonic() - start
        if done.returncode != 0:
            tail = "\n".join(done.stdout.strip().splitlines()[-12:])
            print(f"trial {trial.number}: {shown}: `dvc exp run` failed:\n{tail}", file=sys.stderr)
            raise TrialFailed(f"exit {done.returncode}")
        attrs = next(
            t for t in study.get_trials(deepcopy=False) if t.number == trial.number
        ).user_attrs
        value = attrs[space.objective]
        if attrs["pruned"]:
            print(
                f"trial {trial.number}: {shown}: pruned after epoch {attrs['epochs']} "
                f"({space.objective} {value:.4f}, {seconds:.0f} s, dvc exp {exp})"
            )
            raise optuna.TrialPruned()
        print(
            f"trial {trial.number}: {shown}: {space.objective} {value:.4f} after "
            f"{attrs['epochs']} epochs ({seconds:.0f} s, dvc exp {exp})"
        )
        return value

    return objective


def work(
    study: optuna.Study, space: Space, url: str, run_id: str | None, target: int, heartbeat: int
) -> None:
    """Run trials until the study holds `target` complete or pruned ones; wait while others run
    the last ones, so that a trial whose worker dies is still retried."""
    objective = objective_for(study, space, url, run_id, target)
    failures = 0
    while True:
        clean_killed_trials(study.study_name)
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        done = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
        if done >= target:
            return
        if done + states.count(TrialState.RUNNING) >= target and TrialState.WAITING not in states:
            time.sleep(heartbeat)  # the last trials run elsewhere; take over if their worker dies
            continue
        before = len(trials)
        study.optimize(
            objective,
            n_trials=1,
            catch=(TrialFailed, Surplus),
            callbacks=[lambda s, t: log_progress(s, run_id)],
        )
        last = max(study.get_trials(deepcopy=False)[before:], key=lambda t: t.number, default=None)
        failed = (
            last is not None
            and last.state == TrialState.FAIL
            and not last.user_attrs.get("surplus")
        )
        failures = failures + 1 if failed else 0
        if failures >= MAX_FAILURES:
            raise ConfigError(
                f"{MAX_FAILURES} trials in a row failed (see above); this worker stops"
            )


def summary(study: optuna.Study, space: Space) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    line = f"study {study.study_name}: " + ", ".join(
        f"{n} {s.name.lower()}" for s, n in counts.items() if n
    )
    if counts[TrialState.COMPLETE]:
        best = study.best_trial
        line += (
            f"; best trial {best.number} ({best.user_attrs.get('dvc.exp_name')}): "
            f"{space.objective} {best.value:.4f} with {best.params}"
        )
    return line


def apply(exp: str) -> None:
    """`dvc exp apply exp`, through DVC's API: a trial ran no evaluate, compare or register, so
    their outputs are missing from it, which the command-line apply counts as a failure."""
    import logging

    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    logging.getLogger("dvc").setLevel(logging.ERROR)  # "No file hash info found for eval/..."
    with Repo(".") as repo:
        try:
            repo.experiments.apply(exp, allow_missing=True)
        except DvcException as exc:
            raise ConfigError(
                f"dvc exp apply {exp}: {exc}; if the trial ran on another machine, "
                f"`dvc exp pull <git remote> {exp}` first"
            ) from None
    print(f"applied dvc exp {exp} to the workspace")


def finish(study: optuna.Study, space: Space, run_id: str | None) -> None:
    """Apply the best trial here and run evaluate, compare and register on it, once."""
    try:
        best = study.best_trial
    except ValueError:
        raise ConfigError(f"study {study.study_name}: no complete trial yet") from None
    exp = best.user_attrs["dvc.exp_name"]
    registered = study.user_attrs.get("registered", {})
    if registered.get("trial") == best.number:
        print(
            f"study {study.study_name}: best trial {best.number} was registered already "
            f"(dvc exp {registered['exp']}, test_accuracy {registered['test_accuracy']:.4f})"
        )
        return
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if dirty.strip():
        raise ConfigError(
            "--finish applies the best trial in this workspace, which has "
            "uncommitted changes; commit or stash them first"
        )
    apply(exp)
    final = f"{exp.rsplit('-', 1)[0]}-best-{best.number}"
    if subprocess.run(["dvc", "exp", "run", "-n", final], check=False).returncode != 0:
        raise ConfigError(f"dvc exp run -n {final} failed (see above)")
    test = read_json(EVAL / space.readout / "metrics.json")["test_accuracy"]
    study.set_user_attr("registered", {"trial": best.number, "exp": final, "test_accuracy": test})
    if run_id:
        MlflowClient().set_tag(run_id, "best.test_accuracy", f"{test:.4f}")
    print(
        f"study {study.study_name}: best trial {best.number}: {space.objective} "
        f"{best.value:.4f}, test_accuracy {test:.4f} (the test set's only use in this study); "
        f"registered as dvc exp {final}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="the study: studies/NAME.yaml")
    parser.add_argument("--trials", type=int, help="complete + pruned trials (default: the file's)")
    parser.add_argument(
        "--storage", help=f"database URL (default: ${STORAGE_ENV}, else ./optuna.db)"
    )
    parser.add_argument(
        "--heartbeat", type=int, default=10, help="seconds; a worker silent for 2x is dead"
    )
    parser.add_argument("--finish", action="store_true", help="register the best trial, then stop")
    args = parser.parse_args(argv)
    space = load_space(args.name)
    if args.trials is not None and args.trials < 1:
        raise ParamsError(f"--trials: at least 1, got {args.trials}")
    url = (
        args.storage
        or os.environ.get(STORAGE_ENV)
        or f"sqlite:///{store.project_root() / 'optuna.db'}"
    )
    study, created = open_study(args.name, space, url, args.heartbeat)
    experiment_id = store.configure()
    run_id = study_run(study, created, space, experiment_id)
    if args.finish:
        finish(study, space, run_id)
        return
    print(f"study {args.name}: {'started' if created else 'joined'} in {redact(url)}")
    try:
        work(study, space, url, run_id, args.trials or space.trials, args.heartbeat)
    except KeyboardInterrupt:  # Ctrl-C: Optuna has marked the running trial FAIL
        print(f"study {args.name}: worker interrupted; its trial runs again in the next worker")
        sys.exit(130)
    if run_id:
        MlflowClient().set_terminated(run_id, "FINISHED")
    print(summary(study, space) + f"; next: python -m pipeline.study {args.name} --finish")


if __name__ == "__main__":
    run_stage(main)
