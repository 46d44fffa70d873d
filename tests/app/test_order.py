"""lightcook.app.order and lightcook.app.timing: the training order depends on (seed, epoch) only,
a resumed position skips what was trained; tokens are counted without padding."""

import torch
from torch.utils.data import DataLoader

from lightcook.app.order import ResumableSampler
from lightcook.app.timing import StepTimer, batch_tokens

DATA = list(range(24))


def _global_batches(world: int, batch: int, epoch: int = 0) -> list[set[int]]:
    ranks = []
    for rank in range(world):
        sampler = ResumableSampler(DATA, world, rank, shuffle=True, seed=7, batch_size=batch)
        sampler.set_epoch(epoch)
        ranks.append(list(sampler.__iter__()))
    steps = len(ranks[0]) // batch
    return [{i for r in ranks for i in r[s * batch : (s + 1) * batch]} for s in range(steps)]


def test_one_process_and_two_see_the_same_global_batches():
    assert _global_batches(1, 4) == _global_batches(2, 2)


def test_epochs_differ_and_a_resumed_position_skips_the_trained_batches():
    sampler = ResumableSampler(DATA, 1, 0, shuffle=True, seed=7, batch_size=4, position=lambda: (1, 2))
    epoch1 = ResumableSampler(DATA, 1, 0, shuffle=True, seed=7, batch_size=4, position=lambda: (1, 0))
    assert list(sampler) == list(epoch1)[8:]
    assert _global_batches(1, 4, epoch=0) != _global_batches(1, 4, epoch=1)


def test_unshuffled_order_is_the_dataset_order():
    sampler = ResumableSampler(DATA, 2, 1, shuffle=False, seed=0, batch_size=3)
    assert list(sampler) == DATA[1::2]
    assert len(list(DataLoader(DATA, batch_size=3, sampler=sampler))) == 4


def test_batch_tokens_counts_the_attention_mask():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert batch_tokens({"input_ids": torch.zeros(2, 3), "attention_mask": mask}) == 3
    assert batch_tokens({"input_ids": torch.zeros(2, 3)}) == 6 and batch_tokens([1, 2]) == 0
    assert (StepTimer().seconds, StepTimer().tokens) == (0.0, 0)
