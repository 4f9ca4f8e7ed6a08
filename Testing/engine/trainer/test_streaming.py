"""What keeps training's memory flat: slices read from the cache as batches need them, features kept on disk,
the selection on a bounded, seeded sample of validation patients, batches drawn from (seed, step) alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cldf.trainer.batches import StepBatches, share, step_generator
from cldf.trainer.slicecache import DiskSlices
from cldf.trainer.tensorstore import TensorStore
from cldf.trainer.train import selection_patients


def test_disk_slices_read_only_the_rows_asked_for_and_refuse_a_short_file(tmp_path):
    array = np.arange(5 * 2 * 4 * 4, dtype=np.float32).reshape(5, 2, 4, 4)
    np.save(tmp_path / "images.npy", array)
    slices = DiskSlices(tmp_path / "images.npy")
    assert slices.shape == (5, 2, 4, 4) and len(slices) == 5
    assert torch.equal(slices[3], torch.from_numpy(array[3]))
    assert torch.equal(slices[torch.tensor([4, 0, 4])], torch.from_numpy(array[[4, 0, 4]]))
    assert torch.equal(torch.cat(list(slices.split(2))), torch.from_numpy(array))
    with pytest.raises(IndexError, match="outside the 5 cached slices"):
        slices[5]
    with open(tmp_path / "images.npy", "r+b") as f:  # cut short after it was written
        f.truncate(f.seek(0, 2) - 10)
    with pytest.raises(OSError, match="delete the cache folder"):
        DiskSlices(tmp_path / "images.npy")[4]


def test_a_tensor_store_gives_back_what_it_was_given_and_leaves_nothing(tmp_path):
    blocks = [torch.randn(3, 7), torch.randn(0, 7), torch.randn(1, 2, 5, 5)]
    with TensorStore(tmp_path / "f.bin") as store:
        for b in blocks:
            store.append(b)
        assert len(store) == 3 and all(torch.equal(a, b) for a, b in zip(store, blocks))
    assert not (tmp_path / "f.bin").exists()


def test_selection_patients_are_all_of_them_or_a_seeded_sample():
    ids = [f"p{i:03d}" for i in range(100)]
    assert selection_patients(ids[:10], 24, 0) == ids[:10]
    picked = selection_patients(ids, 24, 0)
    assert len(picked) == 24 and set(picked) <= set(ids) and picked == sorted(picked)
    assert picked == selection_patients(list(reversed(ids)), 24, 0)  # the order given does not matter
    assert picked != selection_patients(ids, 24, 1)
    with pytest.raises(ValueError, match="at least 1"):
        selection_patients(ids, 0, 0)


def test_each_process_gets_its_share_of_the_batch_one_process_would_draw():
    def draw(g):
        return torch.randint(1000, (8,), generator=g)

    whole = list(StepBatches(draw, seed=3, start=5, stop=9))
    parts = [list(StepBatches(draw, seed=3, start=5, stop=9, rank=r, world=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*parts)] == whole
    assert whole[0] == draw(step_generator(3, 5)).tolist()  # step 5 of a resumed run draws what step 5 did
    with pytest.raises(ValueError, match="divisible by 3"):
        share(8, 0, 3)
