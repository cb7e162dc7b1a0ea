"""The served model: images [N, 28, 28] or image files [N] in, class probabilities and the class out.

Logged by the register stage with MLflow's models-from-code (pipeline/packaging.py). Stored with
this file inside the model, and all it needs besides numpy, Pillow, Keras and MLflow:
- `network`: the trained .keras model, unchanged, which reads sequences [N, T, F] (safe mode);
- `sequence`: JSON {"index": [T][F] pixel numbers, "dataset": ..., "classes": [...]}: step t,
  feature f of a sequence is pixel index[t][f] of the row-major image, as pipeline/preprocess.py
  made the training data, so `permuted_pixels` needs nothing from the client;
- code/pipeline/: pipeline/images.py, tf.py and the modules they import, which MLflow puts on sys.path,
  so a client loads the model with mlflow.pyfunc or `mlflow models serve` alone.
Input, one of:
- numbers [N, 28, 28] (or one image [28, 28]): pixel values 0-255 or 0-1, ink bright on dark; an
  input whose largest value is above 1 is taken as 0-255; NaN, infinity, values outside 0-255 and
  non-numbers (null, true, "7") are refused, not clipped or converted;
- image files [N] (or one): PNG or JPEG, as base64 strings (JSON) or bytes, converted by
  pipeline/images.py exactly as `python -m pipeline.predict FILE` converts them (a black-on-white
  drawing is inverted, its digit scaled and centred as MNIST's were).
A bad input raises MlflowException INVALID_PARAMETER_VALUE naming what is wrong: the scoring
server answers 400 with that message. The network runs as one compiled function, without
model.predict's per-call overhead and progress bar.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

from pipeline.images import picture  # the model's own copy, from its code/ folder
from pipeline.stage import DataError

BATCH = 1024  # as evaluate scores the test set, so that both compute the same logits
NUMBERS = (int, float, np.integer, np.floating)
BOOLS = (bool, np.bool_)
EXPECTED = (
    "images [N, 28, 28] of numbers, or image files [N] (PNG or JPEG, base64 strings or bytes)"
)


def bad(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


class ImageClassifier(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        # The model's copy of pipeline/tf.py: TensorFlow without its C++ start-up notices (a
        # served model printed "failed call to cuInit: ... CUDA error" on a machine without GPU).
        from pipeline.tf import keras, tf

        spec = json.loads(Path(context.artifacts["sequence"]).read_text())
        self.index = np.asarray(spec["index"], dtype=np.int64)
        self.dataset = spec["dataset"]
        self.network = keras.saving.load_model(context.artifacts["network"], safe_mode=True)
        steps, features = self.index.shape
        signature = [tf.TensorSpec([None, steps, features], tf.float32)]
        # autograph off: nothing to convert, and no source to read if the code file is gone
        self.logits = tf.function(
            lambda x: self.network(x, training=False), signature, autograph=False
        )

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict | None = None
    ) -> dict[str, np.ndarray]:  # an ndarray hint: MLflow checks the signature, not the hint
        images = self.images(np.asarray(model_input))
        shape = list(images.shape)
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise bad(f"expected {EXPECTED}, got numbers of shape {shape}")
        check_pixels(images)
        images = images.astype(np.float32)
        if images.size and images.max() > 1:
            images = images / np.float32(255)
        sequences = images.reshape(len(images), 784)[:, self.index]
        logits = np.concatenate(
            [self.logits(sequences[i : i + BATCH]).numpy() for i in range(0, len(images), BATCH)]
            or [np.zeros((0, 10), np.float32)]
        )
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        return {"probabilities": probabilities, "class": logits.argmax(axis=1)}

    def images(self, x: np.ndarray) -> np.ndarray:
        """float64 pixels: numbers as they are, files converted as predict converts them."""
        if x.ndim <= 1 and x.size and all(isinstance(v, (str, bytes)) for v in x.flat):
            return np.stack([self.read(v, f"image {i}") for i, v in enumerate(x.flat)])
        # JSON numbers arrive as an array of objects: null, true or "7" would pass astype as
        # NaN, 1 or 7, so every element must be a number
        kinds = {type(v) for v in x.flat} if x.dtype == object else {x.dtype.type}
        if not all(issubclass(k, NUMBERS) and not issubclass(k, BOOLS) for k in kinds):
            names = sorted({"null" if k is type(None) else k.__name__ for k in kinds})
            raise bad(f"expected {EXPECTED}, got {', '.join(names)} {list(x.shape)}")
        try:
            return x.astype(np.float64)
        except OverflowError:  # an integer beyond any float: 1e400 as JSON digits
            raise bad("pixel values must lie in 0-255 (or 0-1), found a number beyond it") from None

    def read(self, file: str | bytes, name: str) -> np.ndarray:
        if isinstance(file, str):
            try:  # line breaks allowed: `base64` writes them
                file = base64.b64decode("".join(file.split()), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise bad(f"{name}: not base64 ({exc})") from None
        if not file:
            raise bad(f"{name}: empty file")
        try:
            return picture(file, name, self.dataset).astype(np.float64)
        except DataError as exc:
            raise bad(str(exc)) from None


def check_pixels(images: np.ndarray) -> None:
    """Refuse the first image [N, 28, 28] that holds a value no image has: predict refuses the same
    arrays (pipeline/images.py). NaN would give NaN probabilities and class 0; no clipping."""
    finite = np.isfinite(images).all(axis=(1, 2))
    if not finite.all():
        i = int(np.argmin(finite))
        raise bad(f"image {i}: pixel values must be finite numbers, found NaN or infinity")
    inside = ((images >= 0) & (images <= 255)).all(axis=(1, 2))
    if not inside.all():
        i = int(np.argmin(inside))
        lo, hi = float(images[i].min()), float(images[i].max())
        raise bad(f"image {i}: pixel values must lie in 0-255 (or 0-1), found {lo:g}..{hi:g}")


mlflow.models.set_model(ImageClassifier())
