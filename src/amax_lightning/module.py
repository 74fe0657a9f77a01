"""ActMaxModule: Lightning glue around the row objective (``objective.py``) and Adam: steps, logging, DDP, checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Optional, Union

import torch
from lightning.pytorch import LightningModule
from torch import nn

from amax_lightning.analysis import Protocol
from amax_lightning.backbone import Backbone, load_backbone
from amax_lightning.checks import (
    COMPILE_MODES,
    MATMUL_PRECISIONS,
    check_choice,
    check_int,
    check_number,
    check_precision,
    check_run_size,
    check_world_size,
)
from amax_lightning.chunking import automatic_chunk_rows, chunk_slices, chunked_value_and_grad, surrogate_loss
from amax_lightning.data import step_loader
from amax_lightning.errors import NonFiniteError, UserError
from amax_lightning.objective import AGGREGATIONS, RowLayout, RowObjective, RowTensors
from amax_lightning.priors import L2, parse_priors
from amax_lightning.readout import build_readout
from amax_lightning.search import (
    METHODS,
    TOKEN_METHODS,
    SearchSettings,
    SearchState,
    TokenSearch,
    allowed_tokens,
    log_spaced_weights,
    parse_exclude_tokens,
)
from amax_lightning.seeds import parse_seeds
from amax_lightning.targets import Target

DEFAULT_SEEDS = list(range(10))
MAX_LR = 1e6  # Adam moves each coordinate by about lr per step; far larger values overflow its step size


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """``torch.set_float32_matmul_precision(precision)`` inside the block; the previous setting after it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


class ActMaxModule(LightningModule):
    """Activation maximization of units of a frozen language model, for many seeds at once.

    All rows (units x seeds) share one parameter of shape (rows, n_tokens, d_model) (or (rows, n_tokens, V)
    logits with the ``softmax`` prior); ``objective`` turns it into per-row losses. Under DDP each process
    holds the full parameter but runs only its contiguous shard of rows; its gradient is multiplied by the
    world size so that DDP's gradient *average* equals the exact per-row gradient.

    Parameters
    ----------
    model_name_or_path
        HF hub id (``gpt2``) or local model folder; the model and tokenizer are loaded from it.
    target
        Unit(s) to maximize in TransformerLens naming, e.g. ``blocks.8.hook_resid_pre:91``; see ``targets.py``.
    n_tokens
        Number of input positions learned per row.
    lr
        Adam learning rate, in (0, 1e6].
    l2
        Weight of the squared L2 norm of each row's embedding (sum over tokens and dims) in the loss; 0 = off.
    seeds
        Seeds, one optimization each; set from the CLI's ``--seed`` / ``--seeds``.
    aggregate
        How a row's activations over positions become its objective: ``mean`` (the study), ``last`` or ``max``.
    priors
        Comma-separated priors, e.g. ``"clamp,vocab_distance=0.1,straight_through"``; see ``priors.parse_priors``.
    trust_remote_code
        Passed to HF ``from_pretrained``; only set it for model code you trust.
    matmul_precision
        ``torch.set_float32_matmul_precision`` inside each training step (forward and backward): ``highest``
        (true fp32, the default), ``high`` (TF32 on NVIDIA GPUs) or ``medium`` (bf16 products).
    compile_mode
        ``none`` (eager, the default), or a ``torch.compile`` mode for the step's forward: ``default``,
        ``reduce-overhead`` (CUDA graphs on GPU) or ``max-autotune``. Shapes are static.
    chunk_rows
        Rows (unit x seed) per forward/backward; 0 = automatic (``chunking.py``). Each row's gradient is exact
        either way, so this changes memory and speed, not the optimization.
    sae_activation
        For ``sae:`` targets: ``pre`` (the encoder output before its ReLU, sae-lens's ``hook_sae_acts_pre``; the
        default, since the ReLU's zero region gives no gradient) or ``post`` (``hook_sae_acts_post``).
    center_residual
        Read residual-stream hooks minus their mean over d_model (TransformerLens's ``center_writing_weights``):
        ``auto`` (when an SAE was trained so; see ``readout.py``), ``true`` or ``false``.
    method
        How rows are optimized: ``continuous`` (Adam on the input embeddings; the study's protocol), or token search
        over real tokens (``search.py``): ``gcg`` (gradient-guided single-token swaps) or ``epo`` (a population
        trading activation against the model's own cross-entropy, with a Pareto frontier).
    top_k
        Token search: candidate tokens per position, ranked by the one-hot gradient.
    candidates
        Token search: sequences scored per seed per step (EPO: shared among the population's members).
    population
        EPO: members per seed; their fluency weights are log-spaced over [0.1, 10] unless ``fluency_weights``.
    fluency_weights
        EPO: one cross-entropy weight per member (>= 0), instead of the log-spaced ones.
    exclude_tokens
        Token search: ids (``"13,198"``) or a file of ids never used; special tokens are always excluded.
    retokenize
        Token search: keep only sequences whose decoded text encodes back to the same ids.
    finite_check_every
        Look at the finiteness of losses and activations on the host every N steps (and at the last step and
        before every checkpoint) instead of every step: a GPU step then never waits for the host. A bad run still
        stops naming the seeds and the step it went bad at, and writes nothing.
    perturb_sizes
        The sensitivity study (``sensitivity.py``): run every seed from its start perturbed by each of these
        relative sizes (a random direction per vector, scaled to ``size`` x that vector's norm; 0 = unperturbed).
    replicas
        Perturbed starts per seed and size (each from its own generator), with ``perturb_sizes``.
    backbone
        A ready ``Backbone`` to use instead of loading ``model_name_or_path`` (tests, benchmarks, notebooks).
    """

    PROTOCOL_KEYS = ("model_name_or_path", "target", "n_tokens", "lr", "l2", "seeds", "aggregate", "priors",
                     "sae_activation", "center_residual", "method", "top_k", "candidates", "population", "fluency_weights",
                     "exclude_tokens", "retokenize", "perturb_sizes", "replicas")

    def __init__(
        self,
        model_name_or_path: str = "gpt2",
        target: str = "blocks.8.hook_resid_pre:91",
        n_tokens: int = 5,
        lr: float = 1e-3,
        l2: float = 0.0,
        seeds: Union[str, list[int]] = DEFAULT_SEEDS,
        aggregate: str = "mean",
        priors: str = "",
        trust_remote_code: bool = False,
        matmul_precision: str = "highest",
        compile_mode: str = "none",
        chunk_rows: int = 0,
        sae_activation: str = "pre",
        center_residual: str = "auto",
        method: str = "continuous",
        top_k: int = 256,
        candidates: int = 128,
        population: int = 8,
        fluency_weights: Optional[list[float]] = None,
        exclude_tokens: str = "",
        retokenize: bool = True,
        finite_check_every: int = 1,
        perturb_sizes: Optional[list[float]] = None,
        replicas: int = 1,
        backbone: Optional[Backbone] = None,
    ):
        super().__init__()
        seeds = parse_seeds(seeds)
        self.lr = check_number("lr", lr, low_open=True, high=MAX_LR)
        self.l2 = check_number("l2", l2, low_open=False)
        self.n_tokens = check_int("n_tokens", n_tokens, low=1)
        self.chunk_rows = check_int("chunk_rows", chunk_rows, low=0)
        self.finite_check_every = check_int("finite_check_every", finite_check_every, low=1)
        self._first_bad_step: torch.Tensor | None = None  # deferred finiteness check: first bad step, -1 none yet
        self._first_bad_rows: torch.Tensor | None = None
        self.matmul_precision = check_choice("matmul_precision", matmul_precision, MATMUL_PRECISIONS)
        self.compile_mode = check_choice("compile_mode", compile_mode, COMPILE_MODES)
        check_choice("aggregate", aggregate, AGGREGATIONS)
        self.method = check_choice("method", method, METHODS)
        parsed = parse_priors(priors)
        priors_used = parsed.priors + ([L2(self.l2)] if self.l2 else [])
        self.prior_names = parsed.names + ([priors_used[-1].describe()] if self.l2 else [])
        self.save_hyperparameters(ignore=["backbone"])
        backbone = backbone if backbone is not None else load_backbone(model_name_or_path, trust_remote_code)
        if backbone.max_positions is not None and self.n_tokens > backbone.max_positions:
            raise UserError(f"n_tokens {n_tokens} is out of range; this model's context allows 1..{backbone.max_positions}")
        perturbations = self._perturbations(perturb_sizes, replicas)
        copies = len(perturbations) if perturbations else 1
        built = build_readout(target, backbone, len(seeds) * copies, sae_activation, center_residual)
        targets = built.targets
        if not backbone.supports(targets[0]):
            raise UserError(f"target hook {targets[0].hook!r} needs a GPT-2 model; this model offers hook_resid_pre")
        if any(p.needs_gpt2 for p in priors_used) and not backbone.is_gpt2:
            raise UserError("prior 'fluency' needs a GPT-2 model (its LM head is the input embedding)")
        if perturbations is not None and (len(targets) > 1 or self.method != "continuous"):
            raise UserError("perturb_sizes needs one unit and method continuous; give the sensitivity study one "
                            "target per run")
        layout = RowLayout(len(targets), tuple(seeds), copies=copies)
        check_run_size(layout.n_rows, self.n_tokens, parsed.parameterization.width(backbone))
        self.objective = RowObjective(backbone, targets, layout, built.readout, aggregate, parsed.parameterization,
                                      priors_used, perturbations)
        self.unit_records = built.records  # per unit: the SAE latent or direction it reads (results.json)
        self.search: TokenSearch | None = None
        if self.method in TOKEN_METHODS:
            self.automatic_optimization = False  # the step picks tokens; no optimizer
            self.search = self._token_search(top_k, candidates, population, fluency_weights, exclude_tokens,
                                             retokenize)
            for name, tensor in zip(SearchState._fields, self.search.initial_state(self.n_tokens)):
                self.register_buffer(f"search_{name}", tensor)
            initial = backbone.embed_tokens(TokenSearch.best_member(self.search_state())).detach()
            self.parameter = nn.Parameter(initial)  # the best sequence's input embedding, per row
        else:
            self.parameter = nn.Parameter(self.objective.initial_parameter(self.n_tokens))
        self.model_name_or_path = model_name_or_path
        self.init_scale = backbone.embedding_std
        self.vocab_norm = float(backbone.vocab_embeddings.detach().norm(dim=-1).mean())
        self.precision_name = "32-true"  # Lightning's precision, set in setup
        self._compiled_forward = None  # torch.compile of the objective's forward, made at the first step
        self.chunk_rows_used: int | None = None  # decided at the first step (automatic) or from a checkpoint
        self._resumed_chunks: dict | None = None  # a checkpoint's chunk size, and where it was chosen
        self.history_steps: list[int] = []
        self.history: list[torch.Tensor] = []  # per step: every row's objective, shape (rows,)
        self.strict_loading = False  # checkpoints hold the learned parameter, not the frozen backbone

    @staticmethod
    def _perturbations(sizes: Optional[list[float]], replicas: int) -> list[tuple[int, float, int]] | None:
        """Each copy of a seed, as (size index, relative size, replica); None without ``perturb_sizes``."""
        replicas = check_int("replicas", replicas, low=1)
        if sizes is not None and replicas < 2:
            raise UserError(f"replicas {replicas} with perturb_sizes: give at least 2, so replicas can be compared")
        if sizes is None:
            if replicas != 1:
                raise UserError(f"replicas {replicas} needs perturb_sizes, e.g. --model.perturb_sizes [0,1e-7,1e-3]")
            return None
        if not sizes:
            raise UserError("perturb_sizes is empty; give relative sizes, e.g. [0, 1e-7, 1e-5, 1e-3, 1e-1]")
        sizes = [check_number("perturb_sizes", float(size), low_open=False, high=10.0) for size in sizes]
        return [(index, size, replica) for index, size in enumerate(sizes) for replica in range(replicas)]

    def _token_search(self, top_k, candidates, population, fluency_weights, exclude_tokens, retokenize) -> TokenSearch:
        """The GCG / EPO search of this run's rows, its options checked (one-line UserErrors)."""
        if self.prior_names:
            raise UserError(f"priors {', '.join(self.prior_names)} act on continuous embeddings; method {self.method} "
                            "searches real tokens: drop --model.priors and --model.l2")
        if self.compile_mode != "none":
            raise UserError(f"compile_mode {self.compile_mode!r} applies to method continuous; token search runs eager")
        if self.method == "epo" and not self.backbone.is_gpt2:
            raise UserError("method 'epo' needs a GPT-2 model (its cross-entropy uses the tied LM head)")
        top_k = check_int("top_k", top_k, low=1)
        candidates = check_int("candidates", candidates, low=1)
        if self.method == "gcg":
            weights = (0.0,)
        elif fluency_weights is None:
            weights = tuple(log_spaced_weights(check_int("population", population, low=1, high=candidates)))
        else:
            weights = tuple(check_number("fluency_weights", float(w), low_open=False, high=1e6) for w in fluency_weights)
            if not weights:
                raise UserError("fluency_weights is empty; give one weight per population member, e.g. [0.1, 1, 10]")
        check_run_size(self.n_rows * max(candidates, len(weights)), self.n_tokens, self.backbone.d_model)
        exclude = parse_exclude_tokens(exclude_tokens, self.backbone.vocab_embeddings.shape[0])
        settings = SearchSettings(self.method, top_k, candidates, weights, bool(retokenize))
        return TokenSearch(self.objective, settings, allowed_tokens(self.backbone, exclude))

    def search_state(self) -> SearchState:
        """Every row's token-search state (token search only)."""
        return SearchState(*(getattr(self, f"search_{name}") for name in SearchState._fields))

    # --- what the run is ----------------------------------------------------------------------------
    @property
    def backbone(self) -> Backbone:
        return self.objective.backbone

    @property
    def layout(self) -> RowLayout:
        return self.objective.layout

    @property
    def targets(self) -> list[Target]:
        return self.objective.targets

    @property
    def target(self) -> Target:
        """The target, for runs of one unit."""
        if len(self.targets) != 1:
            raise AttributeError("this run sweeps several units; use .targets")
        return self.targets[0]

    @property
    def seeds(self) -> list[int]:
        return list(self.layout.seeds)

    @property
    def n_rows(self) -> int:
        return self.layout.n_rows

    @property
    def aggregate(self) -> str:
        return self.objective.aggregation

    def protocol(self) -> Protocol:
        """The settings every unit's results repeat."""
        return Protocol(
            model=self.model_name_or_path, aggregate=self.aggregate, priors=list(self.prior_names),
            n_tokens=self.n_tokens, lr=self.lr, l2=self.l2, seeds=self.seeds, init_scale=self.init_scale,
            vocab_norm=self.vocab_norm, numerics=self.numerics(), method=self.method, search=self.search_settings(),
        )

    def search_settings(self) -> dict | None:
        """Token search's settings as results.json records them; None for the continuous method."""
        if self.search is None:
            return None
        settings = self.search.settings
        return {"top_k": self.search.top_k, "candidates": settings.candidates,
                "fluency_weights": list(settings.fluency_weights) if settings.fluency else None,
                "retokenize": settings.retokenize, "allowed_tokens": len(self.search.allowed_ids)}

    def numerics(self) -> dict:
        """How the run computed: Lightning precision, fp32 matmul precision, compile mode, rows per chunk, CPU threads."""
        return {"precision": self.precision_name, "matmul_precision": self.matmul_precision,
                "compile_mode": self.compile_mode, "chunk_rows": self.chunk_rows_used,
                "cpu_threads": torch.get_num_threads()}

    # --- processes and chunks -----------------------------------------------------------------------
    def check_trainer(self, trainer) -> None:
        """Raise a UserError if ``trainer`` cannot run this module: a half-precision parameter, or fewer rows than
        processes. The CLI calls it before anything is written; ``setup`` calls it for every other Trainer."""
        check_precision(trainer.precision)
        check_world_size(self.n_rows, trainer.world_size)
        if self.search is not None and str(trainer.precision) == "16-mixed":  # its GradScaler needs gradients
            raise UserError(f"precision 16-mixed cannot run method {self.method} (it steps no gradient); "
                            "use 32-true or bf16-mixed")

    def setup(self, stage: str) -> None:
        self.check_trainer(self.trainer)
        self.precision_name = str(self.trainer.precision)
        self.objective.layout = self.layout.for_process(self.trainer.world_size, self.trainer.global_rank)
        self.chunk_rows_used = None  # chosen again for this fit's device and shard (or taken from its checkpoint)

    def row_chunks(self) -> list[slice]:
        """This process's rows as consecutive chunks of ``chunk_rows`` (decided once; see ``chunk_rows``)."""
        if self.chunk_rows_used is None:
            self.chunk_rows_used = self.chunk_rows or self._resumed_chunk_rows() or self._automatic_chunk_rows()
        shard = self.layout.shard
        return chunk_slices(shard.start, shard.stop, self.chunk_rows_used)

    def _resumed_chunk_rows(self) -> int | None:
        """The checkpoint's automatic chunk size if it was chosen on this kind of device and world size."""
        saved = self._resumed_chunks
        where = {"device": self.device.type, "world_size": self.layout.world_size}
        if saved and all(saved.get(key) == value for key, value in where.items()):
            return int(saved["rows"])
        return None

    def _automatic_chunk_rows(self) -> int:
        shard = self.layout.shard
        if self.search is not None:  # a row's step holds its candidates: size chunks for them, with their graph
            candidates = self.search.settings.candidates

            def probe_search(n: int) -> torch.Tensor:
                rows = slice(shard.start, shard.start + n)
                tokens = self.search_tokens[rows, :1].expand(-1, candidates, -1)
                embedding = self.backbone.embed_tokens(tokens).detach().requires_grad_()
                activation, ce = self.search.values(embedding, tokens, rows)
                return (activation - ce).sum()

            return automatic_chunk_rows(probe_search, shard.stop - shard.start, self.device,
                                        self.n_tokens * candidates)

        def probe(n: int) -> torch.Tensor:  # eager: the saved tensors of the plain graph, and no extra compiles
            rows = slice(shard.start, shard.start + n)
            return self.objective(self.parameter[rows].detach().requires_grad_(), rows).loss.sum()

        return automatic_chunk_rows(probe, shard.stop - shard.start, self.device, self.n_tokens)

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's per-row tensor (shard, ...) into (rows, ...) in row order."""
        layout = self.layout
        if layout.world_size == 1:
            return local
        size = math.ceil(layout.n_rows / layout.world_size)
        padded = local.new_zeros((size, *local.shape[1:]))
        padded[: local.shape[0]] = local
        stacked = self.all_gather(padded)  # (world, size, ...)
        shards = [layout.shard_of(rank) for rank in range(layout.world_size)]
        return torch.cat([stacked[rank, : s.stop - s.start] for rank, s in enumerate(shards)])

    # --- the step ------------------------------------------------------------------------------------
    def step_forward(self, parameter_rows: torch.Tensor, rows: slice):
        """The objective on parameter rows ``rows``, through ``torch.compile`` when ``compile_mode`` asks for it."""
        if self.compile_mode == "none":
            return self.objective(parameter_rows, rows)
        if self._compiled_forward is None:
            mode = None if self.compile_mode == "default" else self.compile_mode
            self._compiled_forward = torch.compile(self.objective.forward, mode=mode, dynamic=False)
        if self.compile_mode == "reduce-overhead":  # CUDA graphs: this call starts a new step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled_forward(parameter_rows, rows)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Forward and exact gradient of every chunk of this process's rows, all inside ``matmul_precision``.

        Returns a surrogate with the true loss as its value and exactly these gradients, so Lightning's
        backward, DDP's average and Adam see the same step as for one batch. Token search: one search step.
        """
        if self.search is not None:
            self.optimizers().step(closure=self._search_step)
            return None
        world = self.layout.world_size
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # 16-mixed: scale each chunk's backward too
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        with float32_matmul_precision(self.matmul_precision):
            grad, (embedding, activations, loss) = chunked_value_and_grad(
                self.step_forward, self.parameter, self.row_chunks(), grad_scale=world, loss_scale=loss_scale)
        self._check_finite(activations, loss)  # once per step, after all chunks: one host sync
        self._log_step(self.objective.objective(activations), loss, embedding.norm(dim=-1).mean(-1))
        return surrogate_loss(self.parameter[self.layout.shard], grad, loss.sum() * world)

    def _search_step(self) -> None:
        """One GCG / EPO step of this process's rows; every process then holds every row's new state."""
        shard = self.layout.shard
        with float32_matmul_precision(self.matmul_precision):
            local, _ = self.search.step(self.search_state().rows(shard), self.row_chunks(), self.global_step)
        self._check_finite(local.activation, local.activation.max(dim=1).values)
        for name, tensor in zip(SearchState._fields, local):
            getattr(self, f"search_{name}").copy_(self.gather_rows(tensor))
        state = self.search_state()
        best = TokenSearch.best_member(state)
        self.parameter.data.copy_(self.backbone.embed_tokens(best))
        objective = state.activation.max(dim=1).values
        self._log_step(objective, -objective, self.parameter.detach().norm(dim=-1).mean(-1), gathered=True)
        if not (self.global_step + 1) % self.trainer.log_every_n_steps and len(self.targets) == 1:
            self._log_sequences(best, objective)

    def _log_sequences(self, best: torch.Tensor, objective: torch.Tensor) -> None:
        """The best sequence of every seed as a TensorBoard text table (rank 0, TensorBoard loggers only)."""
        from lightning.pytorch.loggers import TensorBoardLogger

        if not self.trainer.is_global_zero:
            return
        lines = ["| seed | objective | text |", "|---:|---:|---|"]
        for seed, ids, value in zip(self.seeds, best.tolist(), objective.tolist()):
            text = self.backbone.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
            lines.append(f"| {seed} | {value:.4g} | {json.dumps(text)} |")
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("search/best_sequences", "\n".join(lines), self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam on the parameter; the priors' projections run inside every optimizer step, after the update,
        so a checkpoint or an interrupt never sees an unprojected parameter.

        Token search updates tokens, not by gradient: its step runs as the closure of an SGD step with lr 0 (the
        parameter never has a gradient, so SGD leaves it alone), because Lightning counts optimizer steps."""
        if self.search is not None:
            return torch.optim.SGD([self.parameter], lr=0.0)
        optimizer = torch.optim.Adam([self.parameter], lr=self.lr)
        optimizer.register_step_post_hook(lambda *_: self.objective.project_(self.parameter.data))
        return optimizer

    def train_dataloader(self):
        return step_loader()

    def configure_callbacks(self):
        """The end-of-fit ResultsWriter and the interrupt handling, unless the Trainer already has them."""
        from amax_lightning.callbacks import DeferInterrupts, ResultsWriter
        from amax_lightning.sensitivity import SensitivityRecorder

        present = lambda kind: any(isinstance(cb, kind) for cb in self.trainer.callbacks)  # noqa: E731
        writer = SensitivityRecorder if self.layout.copies > 1 else ResultsWriter  # copies: the sensitivity study
        return [kind() for kind in (DeferInterrupts, writer) if not present(kind)]

    def _check_finite(self, activations: torch.Tensor, loss: torch.Tensor) -> None:
        """Raise NonFiniteError naming the seeds of this process's rows that went non-finite, and the step.

        With ``finite_check_every`` N > 1 the host looks only every N steps, at the last step and before every
        checkpoint (no per-step device sync); the device remembers the first bad step and its rows, so the error
        names the step the run went bad at either way, and nothing is written.
        """
        finite = torch.isfinite(activations).all(dim=-1) & torch.isfinite(loss)
        if self.finite_check_every == 1:
            if not bool(finite.all()):
                self._raise_non_finite(~finite, self.global_step)
            return
        if self._first_bad_step is None or self._first_bad_step.device != finite.device:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=finite.device)
            self._first_bad_rows = torch.zeros_like(finite)
        first = (self._first_bad_step < 0) & ~finite.all()
        self._first_bad_step = torch.where(first, self.global_step, self._first_bad_step)
        self._first_bad_rows = torch.where(first, ~finite, self._first_bad_rows)
        step = self.global_step + 1
        if step % self.finite_check_every == 0 or step == self.trainer.max_steps:
            self.flush_finite_check()

    def flush_finite_check(self) -> None:
        """Raise NonFiniteError if a deferred finiteness check (``finite_check_every``) has seen a bad step."""
        if self._first_bad_step is not None and int(self._first_bad_step) >= 0:
            self._raise_non_finite(self._first_bad_rows, int(self._first_bad_step))

    def _raise_non_finite(self, bad_rows: torch.Tensor, step: int) -> None:
        start = self.layout.shard.start
        bad = sorted({self.layout.seed_of(start + i) for i in bad_rows.nonzero().flatten().tolist()})
        raise NonFiniteError(
            f"non-finite loss or activation for seed(s) {bad} at step {step}; "
            f"try a smaller lr (now {self.lr}) or an l2 penalty"
        )

    def _log_step(self, objective: torch.Tensor, loss: torch.Tensor, norm: torch.Tensor, gathered: bool = False) -> None:
        """Record each row's objective (rows,) for the history; log objective, loss and mean vector norm."""
        with torch.no_grad():
            stats = torch.stack([objective, loss, norm], dim=-1)
            stats = stats if gathered else self.gather_rows(stats)  # (rows, 3): objective, loss, mean vector norm
        self.history_steps.append(self.global_step)
        self.history.append(stats[:, 0].detach())
        if (self.global_step + 1) % self.trainer.log_every_n_steps:
            return  # Lightning would drop these values anyway; building them costs ~7% of a CPU step
        if len(self.targets) == 1 and self.layout.copies == 1:
            metrics = {f"activation/seed_{s}": stats[i, 0] for i, s in enumerate(self.seeds)}
        else:  # a sweep: thousands of rows, so their spread rather than a curve each
            metrics = {"activation/min": stats[:, 0].min(), "activation/max": stats[:, 0].max()}
        metrics["activation/mean"] = stats[:, 0].mean()
        metrics["embedding/norm"] = stats[:, 2].mean()
        metrics["embedding/vocab_norm"] = self.vocab_norm
        self.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        self.log("loss", stats[:, 1].sum(), on_step=True, on_epoch=False, prog_bar=True, rank_zero_only=True)

    def activation_history(self) -> tuple[list[int], torch.Tensor]:
        """Steps and each row's objective at them, shape (steps, rows), from the optimization so far."""
        if not self.history:
            return [], torch.empty(0, self.n_rows)
        return list(self.history_steps), torch.stack(self.history).cpu()

    # --- end of fit ----------------------------------------------------------------------------------
    def evaluate(self) -> RowTensors:
        """Every row's end-of-fit tensors (``RowObjective.evaluate``), gathered from all processes (a collective
        under DDP), outside autocast and any step's matmul precision."""
        chunks = self.row_chunks()
        token_ids = None
        if self.search is not None:  # the searched tokens themselves, not the nearest tokens of their embeddings
            token_ids = TokenSearch.best_member(self.search_state())[self.layout.shard]
        local = self.objective.evaluate(self.parameter, chunks, token_ids=token_ids)
        return RowTensors(*(self.gather_rows(t) for t in local))

    # --- checkpoints ---------------------------------------------------------------------------------
    def check_resumable(self, checkpoint: dict) -> None:
        """Raise a UserError if ``checkpoint`` was made with another protocol (model, target, seeds, lr, ...)."""
        saved = checkpoint.get("hyper_parameters", {})
        for key in self.PROTOCOL_KEYS:
            if key not in saved:
                continue
            theirs, ours = saved[key], self.hparams[key]
            if key == "seeds":  # "0,1,2", "0-2" and [0, 1, 2] are the same seeds
                theirs, ours = parse_seeds(theirs), parse_seeds(ours)
            if theirs != ours:
                raise UserError(
                    f"checkpoint was made with {key}={theirs!r} but this run has {key}={ours!r}; "
                    "resume with the same settings"
                )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep checkpoints small: only the learned parameter (the frozen backbone is reloaded from its source).

        The activation history rides along, so a resumed run's report shows the whole optimization. A deferred
        finiteness check is flushed first: a checkpoint never holds a non-finite run.
        """
        self.flush_finite_check()
        checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items()
                                    if key == "parameter" or key.startswith("search_")}
        steps, values = self.activation_history()
        checkpoint["activation_history"] = {"steps": torch.tensor(steps, dtype=torch.long), "values": values}
        if self.chunk_rows_used is not None:  # a resumed automatic run keeps its chunks where it can: same arithmetic
            checkpoint["chunk_rows"] = {"rows": self.chunk_rows_used, "device": self.device.type,
                                        "world_size": self.layout.world_size}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if isinstance(checkpoint.get("chunk_rows"), dict):
            self._resumed_chunks = checkpoint["chunk_rows"]
        history = checkpoint.get("activation_history")
        if history is not None:
            self.history_steps = history["steps"].tolist()
            self.history = list(history["values"].to(self.device))
