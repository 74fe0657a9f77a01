"""How many rows (unit x seed) one forward/backward may hold: measured memory per row against free memory.

A step's memory is dominated by the tensors autograd saves for the backward, and those grow linearly with
the rows in the batch. ``saved_bytes_per_row`` measures that slope exactly, on the run's own device, by
counting the storages autograd saves for two small batches; ``choose_chunk_rows`` divides a share of the
device's free memory by it. On CPU, chunks are also kept near the size that runs fastest per row.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from lightning.pytorch.utilities import rank_zero_info

MEMORY_SHARE = 0.5  # of the free memory a step's saved tensors may use; the rest covers transient buffers
PROBE_ROWS = (1, 3)
# On CPU, big chunks run slower per row. GPT-2 small, block 8, 5 tokens, 2 cores, forward + input gradient
# per row: 4.6 ms at 128 rows, 4.1-4.2 ms at 256-640, 5.4 ms at 1024, 6.4 ms at 3072, 7.5 ms at 7680 (one chunk).
CPU_CHUNK_TOKENS = 2560


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


def fastest_chunk_rows(device: torch.device, n_tokens: int) -> int | None:
    """The most rows per chunk before steps get slower per row: on CPU ``CPU_CHUNK_TOKENS`` token rows; else None."""
    return max(1, CPU_CHUNK_TOKENS // n_tokens) if device.type == "cpu" else None


def choose_chunk_rows(rows: int, bytes_per_row: int, free_bytes: int | None, cap: int | None = None,
                      share: float = MEMORY_SHARE) -> int:
    """Rows per chunk: all ``rows`` if they fit in ``share`` of ``free_bytes`` and ``cap``, else the most that do.

    Unknown free memory (None) sets no memory limit; the result is at least 1.
    """
    fits = rows if free_bytes is None else int(free_bytes * share) // bytes_per_row
    return max(1, min(rows, fits, cap if cap is not None else rows))


def automatic_chunk_rows(loss_of_rows: Callable[[int], torch.Tensor], n_rows: int, device: torch.device,
                         n_tokens: int) -> int:
    """Rows per chunk for ``n_rows`` rows: measured bytes per row against free memory, capped by the fastest size.

    ``loss_of_rows(n)`` builds the step's graph for the first ``n`` rows. Says so when the rows need chunks.
    """
    if n_rows <= PROBE_ROWS[-1]:
        return n_rows
    with torch.enable_grad():
        per_row = saved_bytes_per_row(loss_of_rows)
    free = free_memory_bytes(device)
    fastest = fastest_chunk_rows(device, n_tokens)
    chunk = choose_chunk_rows(n_rows, per_row, free, cap=fastest)
    if chunk < n_rows:
        free_text = "unknown" if free is None else f"{free / 2**20:.0f} MiB"
        rank_zero_info(
            f"amax_lightning: running {n_rows} rows as {math.ceil(n_rows / chunk)} chunks of {chunk} rows: "
            f"{per_row / 2**20:.2f} MiB saved per row, {free_text} free on {device.type}, fastest chunk "
            f"{fastest or 'as large as fits'} rows (set --model.chunk_rows to choose)"
        )
    return chunk


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """``torch.set_float32_matmul_precision(precision)`` inside the block; the previous setting after it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def chunk_slices(start: int, stop: int, chunk_rows: int) -> list[slice]:
    """Consecutive slices of at most ``chunk_rows`` rows covering ``[start, stop)``."""
    return [slice(a, min(a + chunk_rows, stop)) for a in range(start, stop, chunk_rows)]


def chunked_value_and_grad(forward: Callable[[torch.Tensor, slice], tuple[torch.Tensor, ...]], parameter: torch.Tensor,
                           chunks: list[slice], grad_scale: float = 1.0, loss_scale: float = 1.0
                           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The exact gradient of ``grad_scale * sum(loss)`` over the rows in ``chunks``, one chunk's graph at a time.

    Parameters
    ----------
    forward
        ``forward(parameter_rows, rows)`` returns a tuple of per-row tensors whose last entry is the loss (rows,).
    parameter
        The full parameter (rows, ...); only the rows in ``chunks`` are used.
    chunks
        Consecutive slices covering this process's rows (``chunk_slices``).
    grad_scale
        Multiplies the gradient (the world size under DDP, whose gradient average then equals the sum).
    loss_scale
        Under fp16 autocast, each chunk's backward runs on the loss times this (a GradScaler's scale) and the
        gradient is divided by it again, so fp16 gradients neither underflow nor hide an overflow.

    Returns
    -------
    grad, outputs
        ``grad`` of shape (chunk rows, ...), and ``forward``'s outputs for all chunk rows, detached.
        Each chunk's outputs are copied out at once: the next call may reuse their memory (CUDA graphs).
    """
    start = chunks[0].start
    n_rows = chunks[-1].stop - start
    grad = parameter.new_zeros((n_rows, *parameter.shape[1:]))
    outputs: list[torch.Tensor] = []
    for rows in chunks:
        piece = parameter[rows].detach().requires_grad_()
        values = forward(piece, rows)
        (chunk_grad,) = torch.autograd.grad(values[-1].sum() * (grad_scale * loss_scale), piece)
        done = slice(rows.start - start, rows.stop - start)
        grad[done] = chunk_grad / loss_scale
        outputs = outputs or [v.new_empty((n_rows, *v.shape[1:])) for v in values]
        for out, value in zip(outputs, values):
            out[done] = value.detach()
    return grad, outputs


def surrogate_loss(parameter_rows: torch.Tensor, grad: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A scalar whose value is ``value`` and whose gradient with respect to ``parameter_rows`` is ``grad``.

    Lightning's backward, DDP's gradient average and the optimizer then see the step computed in chunks.
    """
    linear = (parameter_rows * grad).sum()
    return linear - linear.detach() + value.detach()
