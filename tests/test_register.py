"""The champion rules: first model, strictly better on the same test images, a margin, a subset
never displacing full-size data, and a champion tested elsewhere scored again on this test set."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import pytest
from helpers import log_small_image_model, working_in
from mlflow.tracking import MlflowClient

from pipeline import register, tracking
from pipeline.io import write_json


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """A store with one logged image model (a small untrained GRU), and test images for it."""
    rng = np.random.default_rng(0)
    test = {"x_test": rng.integers(0, 256, (30, 28, 28), np.uint8), "y_test": np.arange(30) % 10}
    with working_in(tmp_path_factory.mktemp("store")) as root:
        yield log_small_image_model(root, test["x_test"][:2].astype(np.float32)), test


class Registry(NamedTuple):
    client: MlflowClient
    name: str
    uri: str
    test: dict[str, np.ndarray]

    def version(
        self,
        accuracy: float,
        source: str = "download",
        test_sha: str = "a",
        more: dict[str, str] | None = None,
    ):
        tags = {"test_accuracy": str(accuracy), "data.source": source, "test_data.sha256": test_sha}
        return self.client.create_model_version(self.name, self.uri, tags=tags | (more or {}))

    def crown(self, accuracy: float, **tags: str) -> None:
        champion = self.version(accuracy, **tags)
        self.client.set_registered_model_alias(self.name, "champion", champion.version)

    def decide(self, challenger, margin: float = 0.0) -> tuple[bool, str]:
        return register.decide(self.client, self.name, challenger, self.test, margin)


@pytest.fixture
def registry(store, request: pytest.FixtureRequest) -> Registry:
    """A registered model of its own for each test, in the shared store."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:90]
    client = MlflowClient()
    client.create_registered_model(name)
    return Registry(client, name, *store)


def test_the_first_model_becomes_champion(registry: Registry) -> None:
    assert registry.decide(registry.version(0.5)) == (True, "first model: there was no champion")


@pytest.mark.parametrize(
    ("new", "margin", "takes"),
    [
        (0.91, 0.0, True),
        (0.90, 0.0, False),
        (0.89, 0.0, False),
        (0.905, 0.01, False),
        (0.92, 0.01, True),
    ],
)
def test_on_the_same_test_images_only_a_better_model_by_the_margin_takes_it(
    registry: Registry, new: float, margin: float, takes: bool
) -> None:
    registry.crown(0.90)
    decided, reason = registry.decide(registry.version(new), margin)
    assert decided is takes, reason
    assert "vs champion v1's 0.9000 (the same test images)" in reason


def test_a_subset_model_never_displaces_a_full_size_champion(registry: Registry) -> None:
    registry.crown(0.30, source="download")
    decided, reason = registry.decide(registry.version(0.99, source="bundled"))
    assert not decided and "a subset never displaces it" in reason


def test_a_champion_tested_on_other_images_is_scored_again_on_these(registry: Registry) -> None:
    # Its tag says 0.99, on the bundled subset's test digits; on these images it scores far less.
    registry.crown(0.99, source="bundled", test_sha="subset")
    images, labels = registry.test["x_test"].astype(np.float32), registry.test["y_test"]
    predicted = mlflow.pyfunc.load_model(registry.uri).predict(images)["class"]
    rescored = float(np.mean(predicted == labels))
    assert rescored < 0.5
    decided, reason = registry.decide(registry.version(0.6, source="download", test_sha="full"))
    assert decided, reason
    assert (
        f"vs champion v1's {rescored:.4f} (champion re-scored on this run's 30 test images)"
        in reason
    )


DIFF = "3fa2c1d0e4b5" + "7" * 52


@pytest.mark.parametrize(
    ("git", "note"),
    [
        ({"git.dirty": "false"}, ""),
        (
            {"git.dirty": "params,code", "git.diff_sha256": DIFF},
            " (from a dirty workspace: params,code, diff 3fa2c1d0e4b5)",
        ),
        ({}, " (not known whether from a clean commit)"),  # registered before runs said
    ],
)
def test_the_decision_says_when_the_challenger_came_from_a_dirty_workspace(
    registry: Registry, git: dict[str, str], note: str
) -> None:
    registry.crown(0.90)
    best = registry.version(0.95, more={"readout": "state_h"} | git)
    other = registry.version(0.93, more={"readout": "output_last", "git.dirty": "false"})
    record = register.settle(registry.client, registry.name, [best, other], registry.test, 0.0)
    assert record == {
        "name": registry.name,
        "versions": {"state_h": 2, "output_last": 3},
        "challenger": 2,
        "champion": 2,
        "decision": "champion",
        "reason": "test accuracy 0.9500 vs champion v1's 0.9000 (the same test images): "
        "better by 0.0500",
        "challenger_dirty": git.get("git.dirty", "unknown"),
        "challenger_diff_sha256": git.get("git.diff_sha256", ""),
    }
    assert register.decision_line(record) == (
        f"register: {registry.name} v2{note} is the champion: {record['reason']}"
    )
    record |= {"decision": "challenger", "champion": 1}
    assert register.decision_line(record).startswith(
        f"register: {registry.name} v2{note} is the challenger, v1 stays champion: test accuracy"
    )


def test_a_version_carries_its_runs_own_tags_and_what_register_adds(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta = {"source": {"source": "bundled", "dataset": "mnist"}, "sha256": "0" * 64}
    own = tracking.run_tags("state_h", meta | {"order": "rows"}) | {"model.cell": "gru"}
    run = registry.client.create_run("0", tags=own)
    registry.client.log_param(run.info.run_id, "train.lr", "0.001")
    monkeypatch.chdir(tmp_path)
    write_json(tmp_path / "models/state_h/run.json", {"run_id": run.info.run_id})
    write_json(tmp_path / "eval/state_h/metrics.json", {"test_accuracy": 0.96})
    tags = register.version_tags(registry.client, "state_h", "b" * 64)
    assert tags == {key: value for key, value in own.items() if not key.startswith("mlflow.")} | {
        "test_accuracy": "0.96",
        "test_data.sha256": "b" * 64,
        "params_hash": tracking.params_hash({"train.lr": "0.001"}),
        "run_id": run.info.run_id,
    }
    assert {"git.commit", "git.dirty", "dvc.exp_name", "data.dataset"} <= tags.keys()
