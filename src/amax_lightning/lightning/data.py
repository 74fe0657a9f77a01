"""The loop's fuel: activation maximization has no data, so each optimizer step gets one empty batch."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset


class EmptyBatches(IterableDataset):
    """An endless stream of empty tensors; ``Trainer(max_steps=...)`` decides how many steps run."""

    def __iter__(self):
        empty = torch.empty(0)
        while True:
            yield empty


def step_loader() -> DataLoader:
    """A DataLoader that yields one empty batch per optimizer step, in the main process."""
    return DataLoader(EmptyBatches(), batch_size=None, num_workers=0)
