"""A trained network packaged as an image model, as register logs it and predict loads it.

The packaged model (pipeline/image_model.py, MLflow's models-from-code) takes images [N, 28, 28]
or PNG/JPEG files and reads pixels in the run's sequence order, `sequence_index`, which is also
how preprocess made the training sequences. Stored with it: the network, that order, the class
names, and the code that converts image files as predict does (pipeline/images.py).
MLflow and TensorFlow are imported inside functions only: preprocess imports this module.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
IMAGE_MODEL = HERE / "image_model.py"  # stored with the model as its code
# pipeline/images.py and the project modules it imports (numpy and Pillow besides): stored with the
# model so that it converts image files with predict's code where this project is not installed
SERVED_CODE = ("__init__.py", "stage.py", "io.py", "images.py", "tf.py")
FASHION_CLASSES = [
    *("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"),
    *("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
]
INPUT = (
    "images [N, 28, 28], pixel values 0-255 or 0-1, ink bright; "
    "or image files [N], PNG or JPEG as base64 strings or bytes, converted as predict converts them"
)


def sequence_index(order: str, seed: int) -> np.ndarray:
    """[T, F]: step t, feature f of a sequence reads pixel index[t, f] of the row-major image."""
    pixels = np.arange(784)
    if order == "rows":  # step t reads row t
        return pixels.reshape(28, 28)
    if order == "columns":  # step t reads column t
        return pixels.reshape(28, 28).T
    if order == "pixels":  # step t reads pixel t in row-major order
        return pixels.reshape(784, 1)
    if order == "permuted_pixels":  # one fixed order of the pixels, drawn from the seed
        return permutation(seed).reshape(784, 1)
    raise ValueError(f"sequence.order: unknown order {order!r}")


def permutation(seed: int) -> np.ndarray:
    """The one fixed pixel order of `permuted_pixels` for this seed."""
    return np.random.default_rng([seed, 784]).permutation(784)


def class_names(dataset: str) -> list[str]:
    return FASHION_CLASSES if dataset == "fashion_mnist" else [str(c) for c in range(10)]


def signature():  # -> mlflow.models.ModelSignature
    """Input: one tensor of objects, shape [-1]. MLflow checks no other input spec loosely enough
    to let both images [N, 28, 28] of numbers and files [N] of strings through: a float tensor
    fails to parse strings, named tensors are all required, and a column schema turns arrays into
    a DataFrame. The model checks its input itself (image_model.py)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(object), (-1,))]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, 10), "probabilities"),
                TensorSpec(np.dtype(np.int64), (-1,), "class"),
            ]
        ),
    )


@contextlib.contextmanager
def image_model(network: Path, index: np.ndarray, dataset: str) -> Iterator[dict]:
    """What mlflow.pyfunc.log_model/save_model take to store a network as an image model."""
    import mlflow
    import PIL

    from pipeline.tf import keras, tf  # only to pin the versions the model needs

    classes = class_names(dataset)
    spec = {"index": index.tolist(), "dataset": dataset, "classes": classes}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sequence.json").write_text(json.dumps(spec))
        code = Path(tmp) / "pipeline"  # the package, so the model imports `pipeline.images`
        code.mkdir()
        for name in SERVED_CODE:
            shutil.copy2(HERE / name, code / name)
        yield {
            "python_model": str(IMAGE_MODEL),
            "artifacts": {"network": str(network), "sequence": f"{tmp}/sequence.json"},
            "code_paths": [str(code)],
            "signature": signature(),
            "metadata": {"dataset": dataset, "classes": classes, "input": INPUT},
            "pip_requirements": [
                f"mlflow=={mlflow.__version__}",
                f"tensorflow=={tf.__version__}",
                f"keras=={keras.__version__}",
                f"pillow=={PIL.__version__}",
            ],
        }
