"""The served model reads images as preprocess made the training sequences, for every order, and
predicts exactly what evaluate scores; image files sent to it give what predict gives for them."""

from __future__ import annotations

import ast
import base64
import io
import json
import math
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import keras
import mlflow
import numpy as np
import pytest
from helpers import (
    ROOT,
    drawing_png,
    env_without_project,
    free_port,
    post,
    stop,
    wait_until_up,
)
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.pyfunc.scoring_server import invocations
from PIL import Image

from pipeline import packaging
from pipeline.image_model import ImageClassifier
from pipeline.images import read_images
from pipeline.model import build_model, score
from pipeline.packaging import sequence_index
from pipeline.preprocess import to_sequences


def served(tmp_path: Path, order: str, seed: int = 7) -> tuple[ImageClassifier, keras.Model]:
    """An ImageClassifier over a small untrained network, loaded as MLflow would load it."""
    index = sequence_index(order, seed)
    keras.utils.set_random_seed(seed)
    network = build_model(*index.shape, "gru", "state_h", input_units=6, units=5)
    network.save(tmp_path / "model.keras")
    spec = {"index": index.tolist(), "dataset": "mnist"}
    (tmp_path / "sequence.json").write_text(json.dumps(spec))
    artifacts = {
        "network": str(tmp_path / "model.keras"),
        "sequence": str(tmp_path / "sequence.json"),
    }
    model = ImageClassifier()
    model.load_context(SimpleNamespace(artifacts=artifacts))
    return model, network


@pytest.mark.parametrize("order", ["rows", "columns", "pixels", "permuted_pixels"])
def test_predicts_what_evaluate_scores_on_the_sequences(tmp_path: Path, order: str) -> None:
    images = np.random.default_rng(1).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = np.arange(40) % 10
    model, network = served(tmp_path, order)
    out = model.predict(None, images.astype(np.float32))
    _, accuracy, predicted = score(network, to_sequences(images, order, seed=7), labels)
    np.testing.assert_array_equal(out["class"], predicted)
    assert float(np.mean(out["class"] == labels)) == accuracy
    assert out["probabilities"].shape == (40, 10)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1, rtol=1e-5)


def test_pixel_values_0_to_1_and_0_to_255_give_the_same_answer(tmp_path: Path) -> None:
    images = np.random.default_rng(2).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    model, _ = served(tmp_path, "permuted_pixels")
    as_255 = model.predict(None, images.astype(np.float32))
    as_1 = model.predict(None, images.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(as_255["probabilities"], as_1["probabilities"])
    single = model.predict(None, images[0].astype(np.float32))  # one image [28, 28]
    np.testing.assert_array_equal(single["class"], as_255["class"][:1])


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (
            np.zeros((2, 28, 27), np.float32),
            r"\[N, 28, 28\] of numbers, .* got numbers of shape \[2, 28, 27\]",
        ),
        (np.full((1, 28, 28), 300, np.float32), "0-255"),
        (np.full((1, 28, 28), -1, np.float32), "0-255"),
        (np.full((1, 28, 28), np.nan, np.float32), "image 0: .* finite numbers, found NaN"),
        (np.full((1, 28, 28), True), r"got bool \[1, 28, 28\]"),
    ],
)
def test_bad_images_are_refused(tmp_path: Path, images: np.ndarray, message: str) -> None:
    model, _ = served(tmp_path, "rows")
    with pytest.raises(MlflowException, match=message) as refused:
        model.predict(None, images)
    assert refused.value.get_http_status_code() == 400


# ---- image files, to a model packaged as the register stage packages it ------------------------


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[PyFuncModel, Path]:
    """A small untrained network saved with the real packaging, loaded as a client loads it."""
    root = tmp_path_factory.mktemp("packaged")
    keras.utils.set_random_seed(0)
    build_model(28, 28, "gru", "state_h", input_units=6, units=5).save(root / "model.keras")
    index = sequence_index("rows", 0)
    with (
        packaging.image_model(root / "model.keras", index, "mnist") as parts,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", UserWarning)  # "no input example": none is needed here
        mlflow.pyfunc.save_model(root / "model", **parts)
    return mlflow.pyfunc.load_model(str(root / "model")), root / "model"


@pytest.fixture(scope="module")
def drawings(
    bundled_data: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    """Ten test digits as users draw them: black on white, 140 px, PNG files."""
    folder = tmp_path_factory.mktemp("drawings")
    for i, x in enumerate(bundled_data["x_test"][:10]):
        (folder / f"{i}.png").write_bytes(drawing_png(x))
    return sorted(folder.glob("*.png"))


def as_predict_does(model: PyFuncModel, paths: list[Path]) -> dict[str, np.ndarray]:
    """What `python -m pipeline.predict FILE...` computes: its conversion, then the array path."""
    images = [image for path in paths for _, image in read_images(path, "mnist")]
    return model.predict(np.stack(images).astype(np.float32))


def answer(model: PyFuncModel, body: object) -> dict[str, np.ndarray]:
    """The answer of `mlflow models serve` to a JSON body (its request handler, in process)."""
    out = invocations(
        json.dumps(body), "application/json", model, model.metadata.get_input_schema()
    )
    assert out.status == 200, out.response
    predictions = json.loads(out.response)["predictions"]
    return {
        "probabilities": np.float32(predictions["probabilities"]),
        "class": np.int64(predictions["class"]),
    }


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(got["class"], want["class"])
    np.testing.assert_array_equal(got["probabilities"], want["probabilities"])


def test_png_files_get_exactly_what_predict_gives(
    packaged: tuple[PyFuncModel, Path], drawings: list[Path]
) -> None:
    model, _ = packaged
    want = as_predict_does(model, drawings)
    files = [path.read_bytes() for path in drawings]
    assert_same(answer(model, {"inputs": [b64(f) for f in files]}), want)
    assert_same(answer(model, {"instances": [b64(f) for f in files]}), want)
    split = {"columns": ["image"], "data": [[b64(f)] for f in files]}  # a string column
    assert_same(answer(model, {"dataframe_split": split}), want)
    assert_same(model.predict(np.array(files, dtype=object)), want)  # bytes, in process
    wrapped = base64.encodebytes(files[0]).decode()  # `base64 FILE` breaks lines at 76
    one = answer(model, {"inputs": wrapped})
    assert_same(one, as_predict_does(model, drawings[:1]))  # one file: a batch of one
    # the conversion matters: the drawing merely resized to 28x28 is another input
    naive = [np.asarray(Image.open(p).convert("L").resize((28, 28)), np.float32) for p in drawings]
    assert np.abs(model.predict(np.stack(naive))["probabilities"] - want["probabilities"]).max() > 0


def test_arrays_are_answered_as_before(
    packaged: tuple[PyFuncModel, Path], bundled_data: dict[str, np.ndarray]
) -> None:
    model, _ = packaged
    images = bundled_data["x_test"][:12]
    want = model.predict(images.astype(np.float32))
    assert_same(answer(model, {"inputs": images.tolist()}), want)
    assert_same(answer(model, {"instances": images.tolist()}), want)
    assert_same(answer(model, {"inputs": (images / 255).tolist()}), want)
    assert_same(model.predict(images.astype(np.float64)), want)


_BLANK = io.BytesIO()
Image.new("L", (100, 100), 255).save(_BLANK, "PNG")
BAD_REQUESTS: dict[str, tuple[list, str]] = {
    "not base64": (["iVBORw0KGgo!!"], "image 1: not base64"),
    "empty": ([""], "image 1: empty file"),
    "a GIF": ([b64(b"GIF89a" + bytes(40))], "image 1: not a format we read; accepted: PNG, JPEG"),
    "blank PNG": ([b64(_BLANK.getvalue())], "image 1: blank image, nothing to classify"),
    "cut PNG": ([b64(_BLANK.getvalue()[:60])], "image 1: corrupt or truncated image"),
    "a number": ([7], "expected images [N, 28, 28] of numbers, or image files [N]"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_file_gets_a_400_naming_what_is_wrong(
    packaged: tuple[PyFuncModel, Path], drawings: list[Path], case: str
) -> None:
    model, _ = packaged
    extra, expected = BAD_REQUESTS[case]
    body = json.dumps({"inputs": [b64(drawings[0].read_bytes()), *extra]})
    with pytest.raises(MlflowException) as refused:
        invocations(body, "application/json", model, model.metadata.get_input_schema())
    assert refused.value.get_http_status_code() == 400
    assert expected in refused.value.message
    assert "Traceback" not in refused.value.message


def test_the_model_folder_holds_the_conversion_code(
    packaged: tuple[PyFuncModel, Path], tmp_path: Path
) -> None:
    """Where this project is not importable, the model imports pipeline.images from its own code
    folder, which needs nothing else from the project (the slow test serves such a model)."""
    _, folder = packaged
    code = folder / "code"
    assert (code / "pipeline/images.py").read_bytes() == (ROOT / "pipeline/images.py").read_bytes()
    probe = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('pipeline') is None, 'the project is importable'\n"
        f"sys.path.insert(0, {str(code)!r})\n"
        "import pipeline.images\n"
        "print({n: m.__file__ for n, m in sys.modules.items() if n.startswith('pipeline')})\n"
    )
    env = env_without_project(tmp_path / "site")
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    files = ast.literal_eval(out.stdout)
    assert sorted(files) == ["pipeline", "pipeline.images", "pipeline.io", "pipeline.stage"]
    assert all(Path(file).is_relative_to(code) for file in files.values()), files


# ---- pixels no image has, through `mlflow models serve` -----------------------------------------


@pytest.fixture(scope="module")
def serving(
    packaged: tuple[PyFuncModel, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`mlflow models serve` of the packaged model, where this project is not importable."""
    _, folder = packaged
    here = tmp_path_factory.mktemp("serving")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(folder)]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    env = env_without_project(here / "site", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    with (here / "serve.log").open("w") as log:
        server = subprocess.Popen(
            command, cwd=here, env=env, stdout=log, stderr=log, start_new_session=True
        )
    try:
        # importing TensorFlow takes minutes on a machine busy with other tests
        wait_until_up(f"http://127.0.0.1:{port}/ping", server, seconds=300)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


BAD_PIXELS: dict[str, tuple[object, str]] = {  # one pixel of image 1, JSON as Python writes it
    "NaN": (math.nan, "image 1: pixel values must be finite numbers, found NaN or infinity"),
    "Infinity": (math.inf, "image 1: pixel values must be finite numbers, found NaN or infinity"),
    "-Infinity": (-math.inf, "image 1: pixel values must be finite numbers, found NaN or infinity"),
    "negative": (-1, "image 1: pixel values must lie in 0-255 (or 0-1), found -1..200"),
    "slightly negative": (-0.001, "image 1: pixel values must lie in 0-255 (or 0-1), found"),
    "above 255": (255.5, "image 1: pixel values must lie in 0-255 (or 0-1), found 0..255.5"),
    "beyond any float": (10**400, "pixel values must lie in 0-255 (or 0-1), found a number beyond"),
    "null": (None, "got int, null [2, 28, 28]"),
    "true": (True, "got bool, int [2, 28, 28]"),
    "a string": ("7", "got int, str [2, 28, 28]"),
}


@pytest.mark.slow  # a server process: the quick loop has test_bad_images_are_refused in process
@pytest.mark.parametrize("case", BAD_PIXELS)
def test_the_served_model_refuses_pixels_no_image_has(serving: str, case: str) -> None:
    """A 400 whose message ends in one sentence naming the image, never an answer (NaN gave
    class 0 and NaN probabilities) nor a stack trace (an integer beyond float's range did)."""
    digits = np.zeros((2, 28, 28), np.int64)
    digits[:, 6:22, 12:16] = 200  # a "1" in each image
    images = digits.tolist()
    value, expected = BAD_PIXELS[case]
    images[1][0][0] = value
    status, reply = post(serving, {"inputs": images})
    assert status == 400, reply
    assert reply["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "stack_trace" not in reply and "Traceback" not in json.dumps(reply)
    assert expected in reply["message"].rsplit("Error: ", 1)[1], reply["message"]
    status, answer = post(serving, {"inputs": digits.tolist()})
    assert status == 200 and len(answer["predictions"]["class"]) == 2  # the same server answers
