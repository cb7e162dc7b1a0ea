"""Stage 2, preprocess: data/raw/ -> data/prepared/ (sequences.npz + meta.json).

Each image becomes a sequence [T, F] of float32 in [0, 1]: `rows` (the blog post: 28 steps of
28 pixels), `columns`, `pixels` (784 steps of 1) or `permuted_pixels` (784 steps in one fixed order
drawn from `seed`), read in the order `packaging.sequence_index` gives, as the served model reads
images. A stratified validation split comes out of train; test is left untouched.
Params: seed, data.val_size, sequence.order.
"""

from __future__ import annotations

import numpy as np

from pipeline import params as P
from pipeline.io import atomic_path, load_npz, read_json, save_npz, sha256_of, write_json
from pipeline.packaging import sequence_index
from pipeline.stage import PREPARED, RAW, run_stage

SPLITS = ("train", "val", "test")


def to_sequences(images: np.ndarray, order: str, seed: int) -> np.ndarray:
    """uint8 images [N, 28, 28] -> float32 sequences [N, T, F] in [0, 1]."""
    x = images.reshape(len(images), 784).astype(np.float32) / 255.0
    return np.ascontiguousarray(x[:, sequence_index(order, seed)])


def stratified_split(y: np.ndarray, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): each class gives round(val_size * its count) to val."""
    rng = np.random.default_rng([seed, 1])
    val = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        val.append(members[: round(val_size * len(members))])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(y)), val_idx)
    return train_idx, val_idx


def main() -> None:
    params = P.load()
    raw = load_npz(RAW / "dataset.npz", ("x_train", "y_train", "x_test", "y_test"))
    source = read_json(RAW / "source.json")
    order, seed = params.sequence.order, params.seed

    train_idx, val_idx = stratified_split(raw["y_train"], params.data.val_size, seed)
    images = {"train": raw["x_train"][train_idx], "val": raw["x_train"][val_idx]}
    labels = {"train": raw["y_train"][train_idx], "val": raw["y_train"][val_idx]}
    images["test"], labels["test"] = raw["x_test"], raw["y_test"]
    arrays = {}
    for split in SPLITS:
        arrays[f"x_{split}"] = to_sequences(images[split], order, seed)
        arrays[f"y_{split}"] = labels[split].astype(np.int32)

    with atomic_path(PREPARED, directory=True) as tmp:
        save_npz(tmp / "sequences.npz", **arrays)
        digest = sha256_of(tmp / "sequences.npz")
        _, steps, features = arrays["x_train"].shape
        meta = {
            "order": order,
            "steps": steps,
            "features": features,
            "counts": {split: len(arrays[f"y_{split}"]) for split in SPLITS},
            "sha256": digest,  # becomes the MLflow tag data.sha256
            "source": source,
        }
        write_json(tmp / "meta.json", meta)
    counts = ", ".join(f"{n:,} {s}" for s, n in meta["counts"].items())
    print(f"preprocess: {order} -> [N, {steps}, {features}]; {counts} -> {PREPARED}/")


if __name__ == "__main__":
    run_stage(main)
