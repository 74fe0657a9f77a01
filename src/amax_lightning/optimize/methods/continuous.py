"""The continuous method: Adam on every row's input embedding, with exact gradients computed chunk by chunk."""

from __future__ import annotations

from collections.abc import Callable

import torch

from amax_lightning.model.chunking import chunked_value_and_grad
from amax_lightning.optimize.objective import RowObjective


class ContinuousMethod:
    """Adam on the parameter (rows, n_tokens, width); the priors' projections run inside every optimizer step.

    Parameters
    ----------
    objective
        The row objective the parameter feeds.
    lr
        Adam learning rate.
    compile_mode
        ``none`` (eager) or a ``torch.compile`` mode for the objective's forward (static shapes).
    """

    search = None  # no token search

    def __init__(self, objective: RowObjective, lr: float, compile_mode: str) -> None:
        self.objective = objective
        self.lr = lr
        self.compile_mode = compile_mode
        self._compiled_forward = None  # made at the first step; kept out of the module tree (not a submodule)

    def initial_parameter(self, n_tokens: int) -> torch.Tensor:
        """Every row's start, from its seed's own generator (``RowObjective.initial_parameter``)."""
        return self.objective.initial_parameter(n_tokens)

    def record(self) -> None:
        """Search settings for results.json: none for the continuous method."""
        return None

    def optimizer(self, parameter: torch.nn.Parameter) -> torch.optim.Optimizer:
        """Adam; the priors' projections run inside each step, after the update, so a checkpoint or an interrupt
        never sees an unprojected parameter (Lightning calls callbacks' batch-end hooks before the module's)."""
        optimizer = torch.optim.Adam([parameter], lr=self.lr)
        optimizer.register_step_post_hook(lambda *_: self.objective.project_(parameter.data))
        return optimizer

    def forward(self, parameter_rows: torch.Tensor, rows: slice):
        """The objective on parameter rows ``rows``, through ``torch.compile`` when ``compile_mode`` asks for it."""
        if self.compile_mode == "none":
            return self.objective(parameter_rows, rows)
        if self._compiled_forward is None:
            mode = None if self.compile_mode == "default" else self.compile_mode
            self._compiled_forward = torch.compile(self.objective.forward, mode=mode, dynamic=False)
        if self.compile_mode == "reduce-overhead":  # CUDA graphs: this call starts a new step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled_forward(parameter_rows, rows)

    def step(self, parameter: torch.Tensor, chunks: list[slice], grad_scale: float, loss_scale: float):
        """Every chunk's forward and exact gradient: ``(grad, (embedding, activations, loss))`` for the chunks'
        rows (``chunking.chunked_value_and_grad``)."""
        return chunked_value_and_grad(self.forward, parameter, chunks, grad_scale=grad_scale, loss_scale=loss_scale)

    def probe(self, parameter: torch.Tensor, start: int) -> Callable[[int], torch.Tensor]:
        """``n -> loss`` of rows ``start .. start + n``, eager (the saved tensors of the plain graph, and no extra
        compiles), for ``chunking.automatic_chunk_rows``."""
        def loss_of_rows(n: int) -> torch.Tensor:
            rows = slice(start, start + n)
            return self.objective(parameter[rows].detach().requires_grad_(), rows).loss.sum()

        return loss_of_rows
