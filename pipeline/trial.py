"""A train run that is one trial of a study (pipeline/study.py): report, prune, tag.

The study worker runs `dvc exp run` with PIPELINE_TRIAL set to this module's Trial as JSON; the
train stage reports each epoch's validation score to the study's storage by trial id, stops when
Optuna's pruner says so, and stops with an error if the worker that owns the trial is gone (its
trial is then failed by the heartbeat and retried elsewhere). Without PIPELINE_TRIAL nothing
here runs, and Optuna is never imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.stage import ConfigError

if TYPE_CHECKING:
    import optuna

ENV = "PIPELINE_TRIAL"
OBJECTIVES = {"val_accuracy": "maximize", "val_loss": "minimize"}  # never a test score


def quiet() -> None:
    """No Optuna INFO lines or warnings that the heartbeat (which we use) is experimental."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def pruner(name: str) -> optuna.pruners.BasePruner:
    """The study's pruner; built alike by the worker and by the train stage that asks it."""
    import optuna

    if name == "median":  # behind the median of earlier trials at the same epoch, after 2 epochs
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def storage(url: str, **kwargs: object) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at url (SQLite or PostgreSQL), or one ConfigError line."""
    import optuna
    import sqlalchemy.exc

    from pipeline.stage import redact

    quiet()
    # seconds: a locked SQLite file waits its turn; an unreachable server fails fast
    connect = {"timeout": 60} if url.startswith("sqlite") else {"connect_timeout": 5}
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs={"connect_args": connect, "pool_pre_ping": True}, **kwargs
        )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"study storage {redact(url)}: {first}") from None


def running(pid: int) -> bool:
    """Whether process pid runs; a killed one that its parent has not reaped yet does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):  # no /proc (macOS): os.kill's answer stands
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"  # Z: a zombie
    return True


@functools.cache
def _study(name: str, url: str, pruner_name: str) -> optuna.Study:
    import optuna

    return optuna.load_study(study_name=name, storage=storage(url), pruner=pruner(pruner_name))


@dataclasses.dataclass(frozen=True)
class Trial:
    study: str
    number: int
    trial_id: int
    storage: str
    pruner: str
    objective: str
    worker_pid: int  # the worker process on this machine that owns the trial
    parent_run_id: str | None  # the study's MLflow run, to nest this run under

    @classmethod
    def from_env(cls) -> Trial | None:
        text = os.environ.get(ENV)
        return cls(**json.loads(text)) if text else None

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def tags(self) -> dict[str, str]:
        tags = {"study.name": self.study, "study.trial": str(self.number)}
        return tags | ({"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {})

    def _optuna(self) -> optuna.Trial:
        import optuna

        return optuna.trial.Trial(_study(self.study, self.storage, self.pruner), self.trial_id)

    def check_owner(self, trial: optuna.Trial) -> None:
        """Stop a trial whose worker is gone (kill -9) or that the study no longer counts."""
        import optuna

        state = trial.study._storage.get_trial(self.trial_id).state
        alive = running(self.worker_pid)
        if not alive or state != optuna.trial.TrialState.RUNNING:
            import mlflow

            if mlflow.active_run():
                mlflow.set_tag("study.state", "FAIL")  # the run itself ends FAILED
            why = "has stopped" if not alive else f"no longer runs it (state {state.name})"
            raise ConfigError(
                f"trial {self.number} of study {self.study!r}: its worker (pid {self.worker_pid}) "
                f"{why}; this run stops, the study retries the trial"
            )

    def report(self, epoch: int, row: dict[str, float], last: bool) -> bool:
        """Send one epoch's score; True if the pruner stops the trial here."""
        trial = self._optuna()
        self.check_owner(trial)
        trial.report(row[self.objective], epoch)
        return not last and bool(trial.should_prune())

    def done(self, run_id: str, row: dict[str, float], epochs: int, pruned: bool) -> None:
        """What the worker reads back: the scores, the MLflow run, whether it was pruned."""
        trial = self._optuna()
        self.check_owner(trial)
        attrs = {"mlflow.run_id": run_id, "epochs": epochs, "pruned": pruned}
        for key, value in (attrs | {k: row[k] for k in OBJECTIVES}).items():
            trial.set_user_attr(key, value)
        import mlflow

        mlflow.set_tag("study.state", "PRUNED" if pruned else "COMPLETE")
        if pruned:
            mlflow.set_tag(
                "mlflow.runName", f"{self.study}-{self.number} (pruned at epoch {epochs})"
            )
