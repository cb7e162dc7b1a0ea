"""python -m pipeline.predict with a local model folder: one line per image, one error line per
file it cannot read, exit code 2 then, JSON lines, and never an MLflow store where it runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from helpers import call_stage, log_small_image_model, working_in, write_params
from PIL import Image

from pipeline import predict
from pipeline.stage import ConfigError


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A small untrained image model, logged as register logs it, then downloaded to a folder."""
    with working_in(tmp_path_factory.mktemp("store")) as root:
        uri = log_small_image_model(root, np.zeros((1, 28, 28), np.float32))
        yield Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(root / "download")))


def test_unreadable_files_get_one_error_line_each_and_the_rest_is_classified(
    model_folder: Path, tmp_path: Path, bundled_data: dict[str, np.ndarray]
) -> None:
    digits = bundled_data["x_test"][:3]
    np.save(tmp_path / "three.npy", digits)
    Image.fromarray(255 - digits[0]).resize((90, 90)).save(tmp_path / "drawn.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("L", (1, 1), 255).save(tmp_path / "dot.png")
    (tmp_path / "folder").mkdir()
    files = ["three.npy", "corrupt.png", "drawn.png", "empty.png", "dot.png", "folder"]
    out = call_stage("predict", tmp_path, *files, "--json", "--model", str(model_folder))
    assert out.returncode == 2, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["file"] for r in rows] == [
        "three.npy[0]",
        "three.npy[1]",
        "three.npy[2]",
        "drawn.png",
    ]
    for row in rows:
        assert row["name"] == str(row["class"]) and 0 < row["probability"] <= 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    for name, why in [
        ("corrupt.png", "corrupt"),
        ("empty.png", "empty file"),
        ("dot.png", "1x1 px"),
        ("folder", "is a directory"),
    ]:
        assert any(name in e and why in e for e in errors), (name, out.stderr)
    assert len(errors) == 4 and "Traceback" not in out.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_without_a_store_it_says_so_and_creates_none(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", np.zeros((28, 28), np.uint8))
    out = call_stage("predict", tmp_path, "one.npy")
    assert out.returncode == 2
    assert "error: no MLflow store at" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.npy"]


def test_a_pulled_readout_folder_predicts_as_its_registered_model(
    model_folder: Path, bundled_data: dict[str, np.ndarray]
) -> None:
    """models/state_h as `dvc pull` brings it: the network, with the project's pixel order.
    (tests/test_team.py runs the command itself on a pulled clone.)"""
    root = model_folder.parent  # the project the fixture trained in (download/ is its folder)
    write_params(root)
    (root / "data/prepared").mkdir(parents=True, exist_ok=True)
    (root / "data/prepared/meta.json").write_text(json.dumps({"order": "rows"}))
    images = bundled_data["x_test"][:20].astype(np.float32)
    pulled = predict.from_network(root / "models/state_h").predict(images)
    registered = mlflow.pyfunc.load_model(str(model_folder)).predict(images)
    assert np.array_equal(pulled["class"], registered["class"])
    np.testing.assert_allclose(pulled["probabilities"], registered["probabilities"], rtol=1e-6)


def test_a_readout_folder_without_its_project_data_says_what_to_pull(
    model_folder: Path, tmp_path: Path
) -> None:
    network = tmp_path / "models/state_h"
    network.mkdir(parents=True)
    (network / "model.keras").write_bytes(
        (model_folder.parent / "models/state_h/model.keras").read_bytes()
    )
    with pytest.raises(ConfigError, match=r"meta.json for the pixel order: run `dvc pull`"):
        predict.from_network(network)
