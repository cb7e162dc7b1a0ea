"""Each epoch sees every training sample once, in a fresh order drawn from (seed, epoch)."""

import numpy as np

from pipeline.train import epoch_batches


def test_epoch_batches_cover_every_sample_once_in_batches_of_the_given_size() -> None:
    batches = epoch_batches(1000, 128, seed=5, epoch=0)
    assert [len(b) for b in batches] == [128] * 7 + [104]
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))


def test_epoch_batches_reshuffle_each_epoch_deterministically() -> None:
    first = np.concatenate(epoch_batches(500, 50, seed=5, epoch=0))
    np.testing.assert_array_equal(first, np.concatenate(epoch_batches(500, 50, seed=5, epoch=0)))
    assert not np.array_equal(first, np.concatenate(epoch_batches(500, 50, seed=5, epoch=1)))
    assert not np.array_equal(first, np.concatenate(epoch_batches(500, 50, seed=6, epoch=0)))
