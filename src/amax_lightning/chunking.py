"""How many rows (unit x seed) one forward/backward may hold: measured memory per row against free memory.

A step's memory is dominated by the tensors autograd saves for the backward, and those grow linearly with
the rows in the batch. ``saved_bytes_per_row`` measures that slope exactly, on the run's own device, by
counting the storages autograd saves for two small batches; ``choose_chunk_rows`` divides a share of the
device's free memory by it.
"""

from __future__ import annotations

from typing import Callable

import torch

MEMORY_SHARE = 0.5  # of the free memory a step's saved tensors may use; the rest covers transient buffers
PROBE_ROWS = (1, 3)


def _saved_bytes(loss_of_rows: Callable[[int], torch.Tensor], rows: int) -> int:
    """Bytes of the distinct storages autograd saves to backpropagate ``loss_of_rows(rows)``."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_of_rows(rows)
    return sum(storages.values())


def saved_bytes_per_row(loss_of_rows: Callable[[int], torch.Tensor]) -> int:
    """Bytes that autograd saves per extra row, measured on batches of 1 and 3 rows (weights cancel out).

    ``loss_of_rows(n)`` must build the step's graph for ``n`` rows (forward only; it is never backpropagated).
    """
    small, large = (_saved_bytes(loss_of_rows, n) for n in PROBE_ROWS)
    return max(1, (large - small) // (PROBE_ROWS[1] - PROBE_ROWS[0]))


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a step may still allocate on ``device``, in bytes; None where it cannot be read.

    CUDA: the driver's free memory plus what PyTorch's allocator holds but does not use.
    CPU: ``MemAvailable`` of ``/proc/meminfo`` (Linux).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def choose_chunk_rows(rows: int, bytes_per_row: int, free_bytes: int | None, share: float = MEMORY_SHARE) -> int:
    """Rows per chunk: all ``rows`` if they fit in ``share`` of ``free_bytes``, else the most that do (>= 1).

    Unknown free memory (None) means one chunk of all rows.
    """
    if free_bytes is None:
        return rows
    return max(1, min(rows, int(free_bytes * share) // bytes_per_row))


def chunk_slices(start: int, stop: int, chunk_rows: int) -> list[slice]:
    """Consecutive slices of at most ``chunk_rows`` rows covering ``[start, stop)``."""
    return [slice(a, min(a + chunk_rows, stop)) for a in range(start, stop, chunk_rows)]
