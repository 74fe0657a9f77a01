"""The token-search method: GCG / EPO steps (``optimize/search.py``) over real tokens, as the module runs them."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import torch

from amax_lightning.base.checks import check_int, check_number, check_run_size
from amax_lightning.base.errors import UserError
from amax_lightning.optimize.objective import RowObjective
from amax_lightning.optimize.search import SearchSettings, SearchState, TokenSearch, log_spaced_weights
from amax_lightning.optimize.search_space import allowed_tokens, parse_exclude_tokens

MAX_FLUENCY_WEIGHT = 1e6


class TokenSearchMethod:
    """GCG or EPO over the objective's rows, its options checked (one-line UserErrors).

    The search state lives in the module's buffers (``search_<field>``, so checkpoints hold it); the module's
    parameter holds each row's best sequence, embedded (DDP needs a parameter; the end-of-fit evaluation reads it).

    Parameters
    ----------
    objective
        The run's rows.
    method
        ``gcg`` or ``epo``.
    n_tokens
        Positions per sequence.
    top_k, candidates, population, fluency_weights, exclude_tokens, retokenize, restart_every
        The module's options of the same names (``ActMaxModule``).
    prior_names, compile_mode
        The run's priors and compile mode: token search takes neither (a UserError names them).
    """

    def __init__(self, objective: RowObjective, method: str, n_tokens: int, top_k: int, candidates: int, population: int,
                 fluency_weights: Sequence[float] | None, exclude_tokens: str, retokenize: bool, restart_every: int,
                 prior_names: Sequence[str], compile_mode: str) -> None:
        backbone = objective.backbone
        if prior_names:
            raise UserError(f"priors {', '.join(prior_names)} act on continuous embeddings; method {method} "
                            "searches real tokens: drop --model.priors and --model.l2")
        if compile_mode != "none":
            raise UserError(f"compile_mode {compile_mode!r} applies to method continuous; token search runs eager")
        if method == "epo" and not backbone.is_gpt2:
            raise UserError("method 'epo' needs a GPT-2 model (its cross-entropy uses the tied LM head)")
        top_k = check_int("top_k", top_k, low=1)  # at most the allowed tokens are used (TokenSearch.top_k)
        candidates = check_int("candidates", candidates, low=1)
        if method == "gcg":
            weights = (0.0,)
        elif fluency_weights is None:
            weights = tuple(log_spaced_weights(check_int("population", population, low=1, high=candidates)))
        else:
            weights = tuple(check_number("fluency_weights", float(w), low_open=False, high=MAX_FLUENCY_WEIGHT)
                            for w in fluency_weights)
            if not weights:
                raise UserError("fluency_weights is empty; give one weight per population member, e.g. [0.1, 1, 10]")
        check_run_size(objective.layout.n_rows * max(candidates, len(weights)), n_tokens, backbone.d_model)
        exclude = parse_exclude_tokens(exclude_tokens, backbone.vocab_embeddings.shape[0])
        restart_every = check_int("restart_every", restart_every, low=0)
        settings = SearchSettings(method, top_k, candidates, weights, bool(retokenize), restart_every)
        self.search = TokenSearch(objective, settings, allowed_tokens(backbone, exclude))

    def initial_parameter(self, state: SearchState) -> torch.Tensor:
        """The embedding (rows, n_tokens, d_model) of every row's best initial sequence."""
        return self.search.backbone.embed_tokens(TokenSearch.best(state)[0]).detach()

    @staticmethod
    def optimizer(parameter: torch.nn.Parameter) -> torch.optim.Optimizer:
        """SGD with lr 0, whose closure is the search step: the parameter never has a gradient, so SGD leaves it
        alone, and Lightning (which counts optimizer steps) counts the search's steps."""
        return torch.optim.SGD([parameter], lr=0.0)

    def probe(self, tokens: torch.Tensor, start: int) -> Callable[[int], torch.Tensor]:
        """``n -> loss`` of rows ``start .. start + n`` with all their candidates, and the graph of the one-hot
        gradient (a row's step holds its candidates), for ``chunking.automatic_chunk_rows``; ``tokens`` are the
        rows' sequences (rows, population, n_tokens)."""
        candidates = self.search.settings.candidates

        def loss_of_rows(n: int) -> torch.Tensor:
            rows = slice(start, start + n)
            sequences = tokens[rows, :1].expand(-1, candidates, -1)
            embedding = self.search.backbone.embed_tokens(sequences).detach().requires_grad_()
            activation, ce = self.search.values(embedding, sequences, rows)
            return (activation - ce).sum()

        return loss_of_rows

    def record(self) -> dict:
        """The search's settings as results.json records them."""
        settings = self.search.settings
        return {"top_k": self.search.top_k, "candidates": settings.candidates,
                "fluency_weights": list(settings.fluency_weights) if settings.fluency else None,
                "retokenize": settings.retokenize, "allowed_tokens": len(self.search.allowed_ids),
                "restart_every": settings.restart_every if settings.fluency else None}

    def best_sequences_markdown(self, seeds: Sequence[int], best: torch.Tensor, objective: torch.Tensor) -> str:
        """A markdown table of every seed's best sequence (rows, n_tokens), its objective and its text."""
        lines = ["| seed | objective | text |", "|---:|---:|---|"]
        for seed, ids, value in zip(seeds, best.tolist(), objective.tolist()):
            text = self.search.backbone.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
            lines.append(f"| {seed} | {value:.4g} | {json.dumps(text)} |")
        return "\n".join(lines)
