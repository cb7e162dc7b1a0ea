"""Where the MLflow store is, and whether it is usable: the one place that points MLflow at it.

Default: an embedded SQLite store `mlflow.db` and artifacts in `mlruns/`, both in the repository
root, so that `mlflow ui` started there shows every run. Runs of `dvc exp run --temp/--queue`
execute in a copy under .dvc/tmp/exps and still land in the root's store. MLflow keeps absolute
artifact paths: in a copied or moved project they are pointed at its own mlruns/ (follow_root).
MLFLOW_TRACKING_URI switches to a tracking server; MLFLOW_EXPERIMENT_NAME picks the experiment.
Logging runs is pipeline/tracking.py's job.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import sqlite3
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
from filelock import FileLock
from sqlalchemy.engine import make_url

from pipeline.stage import ConfigError, redact, run_stage

EXPERIMENT = "rnn-mnist-sequences"
SERVER_TIMEOUT = 5.0  # seconds a tracking server gets to answer before a stage gives up


def project_root() -> Path:
    """The repository root: from any folder inside it, and from a `dvc exp run --temp` copy."""
    if dvc_root := os.environ.get("DVC_ROOT"):  # set by DVC for the stages it runs
        root = Path(dvc_root).resolve()
    else:  # the nearest folder up from here that holds .dvc/
        here = Path.cwd().resolve()
        root = next((p for p in (here, *here.parents) if (p / ".dvc").is_dir()), here)
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def local_uri() -> str:
    """The embedded store: mlflow.db in the repository root."""
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def quiet() -> None:
    """Only what matters reaches the user: no MLflow progress bars for artifact transfers, no
    "View run at <server>" links and no INFO lines ("Creating initial MLflow database tables...",
    "Validating input example..."); its warnings and errors still show."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").addFilter(_not_disk_full)  # added once


def _not_disk_full(record: logging.LogRecord) -> bool:
    """A full disk: MLflow logs each failed SQL statement with its traceback (hundreds of lines)
    before it raises; the stage's one `error:` line says it (pipeline/stage.py: disk_full)."""
    return "database or disk is full" not in record.getMessage()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI (a server that must answer), else the root's mlflow.db."""
    if not (uri := os.environ.get("MLFLOW_TRACKING_URI")):
        follow_root(project_root())
        return local_uri()
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    return uri


# Where MLflow keeps absolute artifact paths in its SQLite store.
ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def mlruns_of(location: str) -> Path | None:
    """The mlruns folder a local artifact location (a path or a file: URI) lies in, if any."""
    if location.startswith("file:"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path))
    elif location.startswith("/"):
        path = Path(location)
    else:  # another scheme (s3:, a server's mlflow-artifacts:): not a project's folder
        return None
    return next((p for p in (path, *path.parents) if p.name == "mlruns"), None)


def foreign_mlruns(database: Path, root: Path) -> set[Path]:
    """The mlruns folders outside root that the store's experiments keep their artifacts in."""
    try:
        with contextlib.closing(
            sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
        ) as db:
            locations = [loc for (loc,) in db.execute("SELECT artifact_location FROM experiments")]
    except sqlite3.DatabaseError:
        return set()  # no store yet, or a damaged one: check_store says which
    found = {mlruns_of(loc) for loc in locations if loc}
    return {folder for folder in found if folder and not folder.is_relative_to(root)}


def follow_root(root: Path) -> None:
    """Point the artifact paths of root's mlflow.db at root/mlruns if they lead to another folder.

    MLflow stores absolute paths, so a project copied with `cp -r` (or mlflow.db and mlruns/
    copied into a clone) would write its artifacts into the original's folder, and a moved one
    finds none. The copy's own store is rewritten, never the original's; a store copied without
    its mlruns/ is refused while the original's is there to copy.
    """
    database = root / "mlflow.db"
    if not database.is_file() or database.stat().st_size == 0:
        return
    if not foreign_mlruns(database, root):
        return  # the usual case, read-only: no lock file, nothing written
    with store_lock(local_uri()):
        check_store(database)  # a store MLflow cannot use is refused as it is, never rewritten
        relocate(database, root)


def relocate(database: Path, root: Path) -> None:
    """follow_root's rewrite, under the store's lock."""
    here = root / "mlruns"
    with contextlib.closing(sqlite3.connect(database, timeout=60)) as db:
        for folder in sorted(foreign_mlruns(database, root)):  # again: another process may be done
            if folder.is_dir() and not here.exists():
                raise ConfigError(
                    f"{database} keeps its artifacts in {folder}, and {here} is missing: copy "
                    f"them too (cp -r {folder} {root}/), then run this again"
                )
            tables = {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            with db:  # one transaction: all paths move, or none
                for old, new in ((str(folder), str(here)), (folder.as_uri(), here.as_uri())):
                    for table, column in ARTIFACT_COLUMNS:
                        if table in tables:
                            db.execute(
                                f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                                (new, len(old) + 1, old, len(old) + 1, f"{old}/"),
                            )
            print(
                f"mlflow.db: artifact paths moved from {folder} to {here} (a copied or moved "
                "project uses its own mlruns/)",
                file=sys.stderr,
            )


def configure() -> str:
    """Point MLflow at the store and experiment; return the experiment id."""
    quiet()
    root = project_root()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    local = uri.startswith("sqlite:")
    # Parallel stages (`dvc queue start -j 2`) would race MLflow's creation of a new SQLite store
    # (its schema migrations) and of the experiment: the lock serialises that first contact.
    with store_lock(uri):
        if local and (database := make_url(uri).database):
            check_store(Path(database))  # inside the lock: never sees a store half created
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            # Fix the artifact folder to the root now: MLflow would otherwise pick ./mlruns
            # relative to wherever the first run starts (a temp copy that DVC deletes).
            location = (root / "mlruns").as_uri() if local else None
            try:
                return mlflow.create_experiment(name, artifact_location=location)
            except mlflow.exceptions.MlflowException:  # a tracking server's other client won
                experiment = mlflow.get_experiment_by_name(name)
                assert experiment is not None
    return experiment.experiment_id


def store_lock(uri: str) -> contextlib.AbstractContextManager:
    """A lock that parallel stages on this machine share, for the embedded store (else none)."""
    if uri.startswith("sqlite:"):
        return FileLock(project_root() / ".mlflow.db.lock")
    return contextlib.nullcontext()


def check_server(uri: str, name: str = "MLFLOW_TRACKING_URI") -> None:
    """Fail in seconds, before any training, if no tracking server answers at `uri` or it
    refuses this client's login (MLflow's basic-auth answers 401 or 403). `name` is where the
    URI came from, for the messages, which never show a password."""
    seconds = SERVER_TIMEOUT
    shown = f"{name}{' ' if name.startswith('--') else '='}{redact(uri)}"  # --to URI, VAR=URI
    if "@" in urllib.parse.urlsplit(uri).netloc:
        # MLflow's client would send it, but prints the URI whole in its errors
        raise ConfigError(
            f"{shown}: a login in the URI is not used, as MLflow would print it in its errors: "
            "give the server's URI alone and the login in MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD"
        )
    # An API call, not /health: a server with logins lets anyone see /health.
    request = urllib.request.Request(
        f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
    )
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", f"Bearer {token}")
    elif user:
        login = f"{user}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}".encode()
        request.add_header("Authorization", f"Basic {base64.b64encode(login).decode()}")
    try:
        urllib.request.urlopen(request, timeout=seconds).close()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            who = (
                f"refused user {user!r}: check MLFLOW_TRACKING_PASSWORD"
                if user
                else ("asks for a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
            )
            raise ConfigError(f"{shown}: the server {who} (HTTP 401)") from None
        if exc.code == 403:
            raise ConfigError(
                f"{shown}: user {user!r} may not read experiments there "
                "(HTTP 403): ask the server's admin for permission"
            ) from None
        return  # another answer (an older server without this endpoint?): a server is there
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        instead = ", or unset MLFLOW_TRACKING_URI to use the embedded store mlflow.db"
        raise ConfigError(
            f"{shown}: no MLflow server answered within {seconds:g} s ({reason}). Start one "
            "(mlflow server --host 127.0.0.1 --port 5000) or fix the URI"
            f"{instead if name == 'MLFLOW_TRACKING_URI' else ''}"
        ) from None


def existing_store(uri: str, hint: str = "") -> None:
    """For commands that only read the store (predict, report): refuse in one line an embedded
    store that is missing or empty (MLflow would create its tables there) or that check_store
    refuses. `hint` adds what else the user can do."""
    if not uri.startswith("sqlite:"):
        return
    path = Path(make_url(uri).database or "mlflow.db")
    if not path.is_file() or path.stat().st_size == 0:
        what = "an empty file" if path.is_file() else "none"
        raise ConfigError(
            f"no MLflow store at {path} ({what}): run `dvc repro` in the project first, "
            f"or set MLFLOW_TRACKING_URI{hint}"
        )
    check_store(path)


def check_store(path: Path) -> None:
    """Refuse, in one line, an SQLite store that MLflow cannot use as it is, leaving it untouched.

    MLflow meets a truncated or foreign file, or another MLflow's schema, with a long SQLAlchemy
    traceback, and fills an SQLite file lacking its tables with them (an unrelated database, or an
    old store it migrates in place). So the file is read here first, read-only. Missing or empty is
    fine: MLflow creates the store.
    """
    if not path.is_file() or path.stat().st_size == 0:
        return
    fix = "move it away (MLflow then starts a new store) or restore a backup copy"
    revisions: list[str] = []
    try:
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as db:
            check = " ".join(db.execute("PRAGMA quick_check(1)").fetchone()[0].split())
            tables = {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "alembic_version" in tables:
                revisions = [r for (r,) in db.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorname", None) or ""
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_READONLY")):
            return  # in use, or a crashed writer's journal that only MLflow's rw connection rolls back
        raise ConfigError(f"{path} is not a readable SQLite database ({exc}): {fix}") from None
    if check != "ok":
        raise ConfigError(f"{path} is corrupt (PRAGMA quick_check: {check}): {fix}")
    if not tables - {"alembic_version"}:
        return  # no tables yet: MLflow creates them, as in a new file
    if not revisions:  # no alembic_version (or an empty one) beside other tables
        raise ConfigError(f"{path} is an SQLite database but not an MLflow store: {fix}")
    from alembic.script import ScriptDirectory  # lazily, as MLflow does: ~0.3 s of imports
    from mlflow.store.db.utils import _get_alembic_config

    script = ScriptDirectory.from_config(_get_alembic_config(""))  # MLflow's own migrations
    head, found = script.get_current_head(), ", ".join(revisions)
    if revisions == [head]:
        return
    if set(revisions) <= {s.revision for s in script.walk_revisions()}:
        raise ConfigError(
            f"{path} has an older MLflow schema ({found}; MLflow {mlflow.__version__} needs "
            f"{head}): back it up, then run `mlflow db upgrade sqlite:///{path.resolve()}`"
        )
    raise ConfigError(
        f"{path} has MLflow schema {found}, unknown to MLflow {mlflow.__version__} (head {head}): "
        f"upgrade MLflow to the version that wrote it, or {fix}"
    )


def main() -> None:
    """python -m pipeline.store: the stages call follow_root themselves; run this in a copied or
    moved project before `mlflow ui` or `mlflow models serve`, which read mlflow.db directly."""
    root = project_root()
    follow_root(root)
    print(f"mlflow.db: artifacts in {root / 'mlruns'}")


if __name__ == "__main__":
    run_stage(main)
