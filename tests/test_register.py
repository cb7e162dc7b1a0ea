"""The champion rules: first model, strictly better on the same test images, a margin, a subset
never displacing full-size data, and a champion tested elsewhere scored again on this test set."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

import mlflow
import numpy as np
import pytest
from helpers import log_small_image_model, working_in
from mlflow.tracking import MlflowClient

from pipeline import register


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

    def version(self, accuracy: float, source: str = "download", test_sha: str = "a"):
        tags = {"test_accuracy": str(accuracy), "data.source": source, "test_data.sha256": test_sha}
        return self.client.create_model_version(self.name, self.uri, tags=tags)

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
