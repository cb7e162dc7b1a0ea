"""What every stage shares: the folders it reads and writes, the errors it reports, run_stage().

Paths are relative to the repository root, where DVC runs each stage; dvc.yaml names the same
folders as deps and outs. Nothing a user passes in can point a stage's output elsewhere.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

RAW = Path("data/raw")  # fetch: dataset.npz, source.json
PREPARED = Path("data/prepared")  # preprocess: sequences.npz, meta.json
MODELS = Path("models")  # train: <readout>/model.keras, run.json
LOGS = Path("logs")  # train: <readout>/batches.csv, epochs.csv
CHECKPOINTS = Path("checkpoints")  # train, while a run is unfinished; not a DVC out
EVAL = Path("eval")  # evaluate: <readout>/metrics.json, per_class.csv, confusion.*, PREDICTIONS
PREDICTIONS = "predictions.npz"  # evaluate: each test image's class; also logged into the run
COMPARE = Path("reports/compare")  # compare: compare.md, batch_accuracy.png, readout_gap.json
REGISTRY = Path("reports/registry.json")  # register: what it registered and decided
EXPERIMENTS = Path("reports/experiments")  # python -m pipeline.report (no stage deletes it)


class ParamsError(ValueError):
    """params.yaml is missing, malformed or out of range; the message says what and where."""


class DataError(ValueError):
    """Input data is missing, corrupt or not what the stage expects."""


class ConfigError(RuntimeError):
    """The environment is not usable: e.g. no MLflow server answers, or mlflow.db is damaged."""


def redact(uri: str) -> str:
    """`uri` fit to print: its password, if any (scheme://user:password@host), becomes ***."""
    parts = urllib.parse.urlsplit(uri)
    login, at, host = parts.netloc.rpartition("@")
    user, colon, _ = login.partition(":")
    return parts._replace(netloc=f"{user}:***@{host}").geturl() if at and colon else uri


_need: list[tuple[str, int]] = []  # what need_space() last announced: (step, bytes)


def megabytes(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def need_space(step: str, nbytes: int, folder: Path | str = ".") -> None:
    """Refuse, in one line, a step that needs about nbytes more on folder's disk than is free; the
    figure is remembered, so that a disk that fills up later still gets it in its one line."""
    _need[:] = [(step, nbytes)]
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise ConfigError(
            f"{no_space(Path(folder), free)}: {step} needs about {megabytes(nbytes)} there; "
            "free some space, then run it again"
        )


def no_space(path: Path, free: int) -> str:
    """Which disk is full: the project folder that writes to it (or path), and its mount point."""
    path, here = path.absolute(), Path.cwd()
    mount = next(p for p in (path, *path.parents) if os.path.ismount(p))
    if path.is_relative_to(here) and path != here:
        path = Path(path.relative_to(here).parts[0])  # mlruns, checkpoints, ...
    where = f"{path}" + (f" (mounted at {mount})" if path.absolute() != mount else "")
    return f"no space left on the disk of {where}, {megabytes(free)} free"


def disk_full(exc: BaseException) -> str | None:
    """The one line for an error that a full disk caused somewhere in its chain, else None."""
    need = f": {_need[0][0]} needs about {megabytes(_need[0][1])} there" if _need else ""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        path: Path | None = None
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            name = error.filename2 or error.filename  # a copy's target (filename2) is what filled
            path = Path(os.fsdecode(name)).parent if name else Path.cwd()
        elif "database or disk is full" in str(error):  # SQLite's, however MLflow wrapped it
            uri = sys.modules["mlflow"].get_tracking_uri() if "mlflow" in sys.modules else ""
            if not uri.startswith("sqlite:"):
                return "the tracking server's database is full (database or disk is full): tell its admin"
            path = Path(uri.removeprefix("sqlite:///"))
        if path is not None:
            folder = next(p for p in (path, *path.parents) if p.exists())
            line = no_space(folder, shutil.disk_usage(folder).free) + need
            return f"{line}; free some space, then run it again"
        error = error.__cause__ or error.__context__
    return None


def exit_code(main: Callable[[], object]) -> int:
    """Run a stage's main() as its command does; return the exit code instead of exiting.

    0 when it returns; 2, after one `error: ...` line on stderr, for bad params, data or store, or
    a full disk; else the code it exits with (argparse's 2, predict's 2, train's 130 when
    interrupted).
    Tests call stages in process through it, without the seconds a new process takes to start.
    """
    _need.clear()
    try:
        main()
    except SystemExit as exc:
        return 0 if exc.code is None else int(exc.code)
    except (ParamsError, DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # MLflow's, found by its code: fetch and preprocess never import it
        if full := disk_full(exc):
            print(f"error: {full}", file=sys.stderr)
            return 2
        if getattr(exc, "error_code", None) != "PERMISSION_DENIED":
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        uri = redact(os.environ.get("MLFLOW_TRACKING_URI", ""))
        print(
            f"error: MLFLOW_TRACKING_URI={uri}: the server "
            f"denies user {user!r} this ({str(exc).splitlines()[0]}): ask its admin for EDIT "
            "permission on the experiment (and on the registered model, for register)",
            file=sys.stderr,
        )
        return 2
    return 0


def run_stage(main: Callable[[], object]) -> NoReturn:
    """`python -m pipeline.<stage>`: run its main() and exit with exit_code(main)."""
    sys.exit(exit_code(main))
