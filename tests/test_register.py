"""The champion rules: first model; better on the same test images by the margin, and by a gain an
exact McNemar test on the paired per-image predictions calls real; a subset never displacing
full-size data; a champion tested elsewhere scored again on this test set."""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import pytest
from helpers import (
    call_stage,
    committed_params,
    log_small_image_model,
    one_error,
    params_dict,
    working_in,
    write_params,
)
from mlflow.tracking import MlflowClient

from pipeline import params as P
from pipeline import register, stats, tracking
from pipeline.io import save_npz, write_json
from pipeline.stage import DataError, ParamsError

N = 1000  # test images, as many as the bundled subset has


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """A store with one logged image model (a small untrained GRU), and test images for it."""
    rng = np.random.default_rng(0)
    test = {"x_test": rng.integers(0, 256, (N, 28, 28), np.uint8), "y_test": np.arange(N) % 10}
    with working_in(tmp_path_factory.mktemp("store")) as root:
        yield log_small_image_model(root, test["x_test"][:2].astype(np.float32)), test


class Registry(NamedTuple):
    client: MlflowClient
    name: str
    uri: str
    test: dict[str, np.ndarray]

    def classes(self, right: np.ndarray) -> np.ndarray:
        """Predictions right exactly where `right` is true."""
        labels = self.test["y_test"]
        return np.where(right, labels, (labels + 1) % 10).astype(np.uint8)

    def paired(self, champion: int, b: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(champion's, challenger's) predictions: `champion` images right by the champion, of
        which b only by it; c right only by the challenger."""
        old, new = np.zeros(N, bool), np.zeros(N, bool)
        old[:champion] = True
        new[: champion - b] = True
        new[champion : champion + c] = True
        return self.classes(old), self.classes(new)

    def version(
        self,
        predicted: np.ndarray,
        source: str = "download",
        test_sha: str = "a",
        more: dict[str, str] | None = None,
        logged: bool = True,
    ):
        """A version whose test accuracy is that of `predicted`, which its run holds as
        evaluate logs them (unless not `logged`)."""
        accuracy = float(np.mean(predicted == self.test["y_test"]))
        tags = {"test_accuracy": str(accuracy), "data.source": source, "test_data.sha256": test_sha}
        if logged:
            run_id = self.client.create_run("0").info.run_id
            with tempfile.TemporaryDirectory() as tmp:
                save_npz(Path(tmp) / "predictions.npz", **{"class": predicted})
                self.client.log_artifact(run_id, str(Path(tmp) / "predictions.npz"))
            tags["run_id"] = run_id
        return self.client.create_model_version(self.name, self.uri, tags=tags | (more or {}))

    def crown(self, predicted: np.ndarray, **kwargs) -> None:
        champion = self.version(predicted, **kwargs)
        self.client.set_registered_model_alias(self.name, "champion", champion.version)

    def decide(
        self, challenger, predicted: np.ndarray, margin: float = 0.0, alpha: float = 0.05
    ) -> tuple[bool, str, stats.McNemar | None]:
        test = self.test
        return register.decide(self.client, self.name, challenger, test, predicted, margin, alpha)


@pytest.fixture
def registry(store, request: pytest.FixtureRequest) -> Registry:
    """A registered model of its own for each test, in the shared store."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:90]
    client = MlflowClient()
    client.create_registered_model(name)
    return Registry(client, name, *store)


def test_registry_alpha_is_a_level_above_0_up_to_1() -> None:
    assert "  alpha: 0.05 " in committed_params()  # the documented default, in params.yaml
    for alpha in (1.0, 0.05, 1e-6):
        assert P.parse(params_dict({"registry": {"alpha": alpha}})).registry.alpha == alpha
    for alpha in (0, -0.1, 1.5):
        with pytest.raises(ParamsError, match=r"registry\.alpha"):
            P.parse(params_dict({"registry": {"alpha": alpha}}))


def test_the_first_model_becomes_champion(registry: Registry) -> None:
    predicted = registry.classes(np.ones(N, bool))
    decided = registry.decide(registry.version(predicted), predicted)
    assert decided == (True, "first model: there was no champion", None)


@pytest.mark.parametrize(
    ("b", "c", "takes", "p"),
    [
        (0, 3, False, "0.25"),  # 3 images in 1,000 better, none worse: still refused
        (20, 23, False, "0.761"),
        (0, 40, True, "1.82e-12"),
        (30, 70, True, "7.85e-05"),
    ],
)
def test_a_gain_of_3_images_in_1000_is_noise_and_one_of_40_is_real(
    registry: Registry, b: int, c: int, takes: bool, p: str
) -> None:
    old, new = registry.paired(champion=900, b=b, c=c)
    registry.crown(old)
    decided, reason, t = registry.decide(registry.version(new), new)
    assert decided is takes, reason
    assert (t.n, t.b, t.c, f"{t.p_value:.3g}") == (N, b, c, p)
    assert t.gain == (c - b) / N
    accuracies = f"test accuracy {0.9 + (c - b) / N:.4f} vs champion v1's 0.9000"
    assert reason.startswith(f"{accuracies} (the same test images); of 1,000 images {c} right")
    assert f"exact McNemar p {p}, gain +{(c - b) / N:.4f} (95% CI " in reason
    assert reason.endswith(
        "p <= registry.alpha 0.05" if takes else "p > registry.alpha 0.05, the gain may be noise"
    )


# Today's table of accuracies against a champion's 0.90, on 1,000 images of which 50 each gets
# right and the other not; a gain of 10-20 images that many discordant ones is no real gain.
TABLE = [(60, 0.0, True), (50, 0.0, False), (40, 0.0, False), (55, 0.01, False), (70, 0.01, True)]


@pytest.mark.parametrize(("c", "margin", "takes"), TABLE)
@pytest.mark.parametrize("alpha", [1.0, 0.05])
def test_alpha_1_is_the_rule_of_before_better_by_the_margin_alone(
    registry: Registry, c: int, margin: float, takes: bool, alpha: float
) -> None:
    old, new = registry.paired(champion=900, b=50, c=c)
    registry.crown(old)
    decided, reason, t = registry.decide(registry.version(new), new, margin, alpha)
    assert t.p_value > 0.05  # 0.39 for 60 against 50, 0.082 for 70
    assert decided is (takes and alpha == 1.0), reason
    if not takes:
        assert reason.endswith(f"not better by more than registry.min_improvement {margin}")


def test_a_subset_model_never_displaces_a_full_size_champion(registry: Registry) -> None:
    old, new = registry.paired(champion=300, b=0, c=600)
    registry.crown(old, source="download")
    decided, reason, t = registry.decide(registry.version(new, source="bundled"), new)
    assert not decided and "a subset never displaces it" in reason and t is None


def test_a_champion_tested_on_other_images_is_scored_again_on_these(registry: Registry) -> None:
    # Its tag says 0.99, on the bundled subset's test digits; on these images it scores far less.
    registry.crown(
        registry.classes(np.ones(N, bool)), test_sha="subset", more={"test_accuracy": "0.99"}
    )
    images, labels = registry.test["x_test"].astype(np.float32), registry.test["y_test"]
    rescored_classes = mlflow.pyfunc.load_model(registry.uri).predict(images)["class"]
    rescored = float(np.mean(rescored_classes == labels))
    assert rescored < 0.5
    new = registry.classes(np.arange(N) < 600)  # 0.6: right on the first 600 images
    decided, reason, t = registry.decide(registry.version(new, test_sha="full"), new)
    assert decided, reason
    assert (
        f"vs champion v1's {rescored:.4f} (champion re-scored on this run's 1,000 test images)"
        in reason
    )
    old_right = rescored_classes == labels
    assert (t.b, t.c) == (np.sum(old_right[600:]), np.sum(~old_right[:600]))


@pytest.mark.parametrize("logged", ["none", "other"])
def test_a_champion_whose_run_holds_no_usable_predictions_is_scored_again(
    registry: Registry, logged: str
) -> None:
    # Same test images, but evaluated before evaluate logged predictions, or logged ones that
    # do not score its test_accuracy (another model's): its registered model is scored again.
    champion = registry.classes(np.zeros(N, bool))
    registry.crown(champion, logged=logged == "other", more={"test_accuracy": "0.5"})
    new = registry.classes(np.ones(N, bool))
    decided, reason, _ = registry.decide(registry.version(new), new)
    assert decided and "(champion re-scored on this run's 1,000 test images)" in reason, reason


def test_stale_predictions_stop_register_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    labels = np.arange(N) % 10
    path = tmp_path / "eval/state_h/predictions.npz"
    with pytest.raises(DataError, match=r"predictions.npz: not found; run the evaluate stage"):
        register.challenger_predictions("state_h", labels)
    write_json(tmp_path / "eval/state_h/metrics.json", {"test_accuracy": 0.9})
    predicted = np.where(np.arange(N) < 900, labels, 0).astype(np.uint8)  # 900 + 10 zeros right
    save_npz(path, **{"class": predicted})
    with pytest.raises(DataError, match=r"1,000 classes scoring 0.9100, but metrics.json says "):
        register.challenger_predictions("state_h", labels)
    save_npz(path, **{"class": predicted[:500]})
    with pytest.raises(DataError, match=r"500 classes, but .* 0.9000 on 1,000 test images"):
        register.challenger_predictions("state_h", labels)
    predicted[900:] = (labels[900:] + 1) % 10
    save_npz(path, **{"class": predicted})
    assert np.array_equal(register.challenger_predictions("state_h", labels), predicted)


def test_the_stage_stops_at_stale_predictions_with_one_line_and_writes_nothing(
    isolated: Path,
) -> None:
    write_params(isolated, {"readouts": ["state_h"]})
    x_test = np.zeros((20, 28, 28), np.uint8)
    save_npz(isolated / "data/raw/dataset.npz", x_test=x_test, y_test=np.arange(20) % 10)
    write_json(isolated / "eval/state_h/metrics.json", {"test_accuracy": 0.9})
    save_npz(isolated / "eval/state_h/predictions.npz", **{"class": np.zeros(10, np.uint8)})
    out = call_stage("register", isolated)
    assert out.returncode == 2
    assert one_error(out) == (
        "error: eval/state_h/predictions.npz: 10 classes, but metrics.json says 0.9000 on 20 test "
        "images: not from the same evaluation; run the evaluate stage again "
        "(dvc repro -f -s evaluate)"
    )
    assert not (isolated / "reports").exists() and not (isolated / "mlflow.db").exists()


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
    old, new = registry.paired(champion=900, b=5, c=55)  # 0.90 -> 0.95
    registry.crown(old)
    _, other = registry.paired(champion=900, b=5, c=35)  # 0.93
    best = registry.version(new, more={"readout": "state_h"} | git)
    second = registry.version(other, more={"readout": "output_last", "git.dirty": "false"})
    predictions = {"state_h": new, "output_last": other}
    args = (registry.client, registry.name, [best, second], registry.test, predictions)
    record = register.settle(*args, P.RegistryParams())
    p_value = 2 * sum(math.comb(60, k) for k in range(6)) / 2**60  # 5 of 60, two-sided
    assert record.pop("paired_test") == {
        "test_images": 1000,
        "mcnemar_b": 5,
        "mcnemar_c": 55,
        "p_value": pytest.approx(p_value, rel=1e-9),
        "challenger_accuracy": 0.95,
        "champion_accuracy": 0.9,
        "gain": 0.05,
        "gain_ci95": list(stats.gain_interval(5, 55, 1000)),
    }
    assert record == {
        "name": registry.name,
        "versions": {"state_h": 2, "output_last": 3},
        "challenger": 2,
        "champion": 2,
        "decision": "champion",
        "reason": "test accuracy 0.9500 vs champion v1's 0.9000 (the same test images); of 1,000 "
        "images 55 right only by the challenger, 5 only by the champion: exact McNemar p "
        f"{p_value:.3g}, gain +0.0500 (95% CI +0.0349 to +0.0649): better by 0.0500, "
        "p <= registry.alpha 0.05",
        "min_improvement": 0.0,
        "alpha": 0.05,
        "challenger_dirty": git.get("git.dirty", "unknown"),
        "challenger_diff_sha256": git.get("git.diff_sha256", ""),
    }
    tags = registry.client.get_model_version(registry.name, "2").tags
    low, high = stats.gain_interval(5, 55, 1000)
    assert {k: v for k, v in tags.items() if k.startswith("registry.")} == {
        "registry.decision": "champion",
        "registry.reason": record["reason"],
        "registry.test_images": "1000",
        "registry.mcnemar_b": "5",
        "registry.mcnemar_c": "55",
        "registry.p_value": str(p_value),
        "registry.gain": "0.05",
        "registry.gain_ci95": f"{low},{high}",
    }
    record["paired_test"] = {}
    assert register.decision_line(record) == (
        f"register: {registry.name} v2{note} is the champion: {record['reason']}"
    )
    record |= {"decision": "challenger", "champion": 1}
    assert register.decision_line(record).startswith(
        f"register: {registry.name} v2{note} is the challenger, v1 stays champion: test accuracy"
    )

    # A rerun: already the champion, no test; the tags of the test before are gone.
    best = registry.client.get_model_version(registry.name, "2")
    args = (registry.client, registry.name, [best, second], registry.test, predictions)
    again = register.settle(*args, P.RegistryParams())
    assert again["paired_test"] is None and again["reason"] == "already the champion"
    assert register.decision_line(again) == (
        f"register: {registry.name} v2{note} is the champion: already the champion; no paired test"
    )
    tags = registry.client.get_model_version(registry.name, "2").tags
    assert not any(k.startswith(("registry.mcnemar", "registry.p_value")) for k in tags), tags


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
