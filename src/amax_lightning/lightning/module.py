"""ActMaxModule: Lightning glue around the row objective (``optimize/objective.py``) and a method (``optimize/methods/``): steps,
logging, DDP, checkpoints."""

from __future__ import annotations

import sys
from typing import Optional, Union

import torch
from lightning.pytorch import LightningModule
from torch import nn

from amax_lightning.analysis.results import Protocol
from amax_lightning.analysis.sweep import BLOCK_UNITS
from amax_lightning.base.checks import (
    COMPILE_MODES,
    MATMUL_PRECISIONS,
    FiniteCheck,
    check_choice,
    check_int,
    check_number,
    check_precision,
    check_resumable,
    check_world_size,
)
from amax_lightning.base.errors import UserError
from amax_lightning.base.seeds import parse_seeds
from amax_lightning.lightning.data import step_loader
from amax_lightning.model.backbone import Backbone, load_backbone
from amax_lightning.model.chunking import (
    automatic_chunk_rows,
    chunk_slices,
    float32_matmul_precision,
    free_memory_bytes,
    surrogate_loss,
)
from amax_lightning.model.targets import Target
from amax_lightning.optimize.methods import METHODS, ContinuousMethod, TokenSearchMethod
from amax_lightning.optimize.objective import AGGREGATIONS, RowTensors, build_objective
from amax_lightning.optimize.param import perturbation_copies
from amax_lightning.optimize.priors import L2, parse_priors
from amax_lightning.optimize.search import SearchState, TokenSearch

DEFAULT_SEEDS = list(range(10))
MAX_LR = 1e6  # Adam moves each coordinate by about lr per step; far larger values overflow its step size


def gigabytes(n_bytes: int) -> str:
    """``n_bytes`` as ``1.23 GB``, ``45.6 MB`` or ``7.8 kB`` (powers of 10^3), 3 significant digits."""
    for scale, name in ((1e9, "GB"), (1e6, "MB")):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {name}"
    return f"{n_bytes / 1e3:.3g} kB"


def plan_text(plan: dict[str, int]) -> str:
    """A memory plan as ``parameter 0.315 GB, gradient 0.315 GB, ...`` (its non-zero parts)."""
    return ", ".join(f"{name} {gigabytes(value)}" for name, value in plan.items() if value)


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
        Unit(s) to maximize in TransformerLens naming, e.g. ``blocks.8.hook_resid_pre:91``; see ``model/targets.py``.
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
        Rows (unit x seed) per forward/backward; 0 = automatic (``model/chunking.py``). Each row's gradient is exact
        either way, so this changes memory and speed, not the optimization.
    sae_activation
        For ``sae:`` targets: ``pre`` (the encoder output before its ReLU, sae-lens's ``hook_sae_acts_pre``; the
        default, since the ReLU's zero region gives no gradient) or ``post`` (``hook_sae_acts_post``).
    center_residual
        Read residual-stream hooks minus their mean over d_model (TransformerLens's ``center_writing_weights``):
        ``auto`` (when an SAE was trained so; see ``model/readout.py``), ``true`` or ``false``.
    method
        How rows are optimized: ``continuous`` (Adam on the input embeddings; the study's protocol), or token search
        over real tokens (``optimize/search.py``): ``gcg`` (gradient-guided single-token swaps) or ``epo`` (a population
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
    restart_every
        EPO: every this many steps (step 0 included) each seed's population restarts from the best sequence of its
        pool under a random cross-entropy penalty (2 x [1/3, 3], as dreamy's EPO); 0 = never.
    finite_check_every
        Look at the finiteness of losses and activations on the host every N steps (and at the last step and
        before every checkpoint) instead of every step: a GPU step then never waits for the host. A bad run still
        stops naming the seeds and the step it went bad at, and writes nothing.
    perturb_sizes
        The sensitivity study (``analysis/sensitivity.py``): run every seed from its start perturbed by each of these
        relative sizes (a random direction per vector, scaled to ``size`` x that vector's norm; 0 = unperturbed).
    replicas
        Perturbed starts per seed and size (each from its own generator), with ``perturb_sizes``.
    backbone
        A ready ``Backbone`` to use instead of loading ``model_name_or_path`` (tests, benchmarks, notebooks).
    """

    PROTOCOL_KEYS = ("model_name_or_path", "target", "n_tokens", "lr", "l2", "seeds", "aggregate", "priors",
                     "sae_activation", "center_residual", "method", "top_k", "candidates", "population", "fluency_weights",
                     "exclude_tokens", "retokenize", "restart_every", "perturb_sizes", "replicas")

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
        restart_every: int = 50,
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
        self.finite_check = FiniteCheck(check_int("finite_check_every", finite_check_every, low=1), self._non_finite)
        self.matmul_precision = check_choice("matmul_precision", matmul_precision, MATMUL_PRECISIONS)
        self.compile_mode = check_choice("compile_mode", compile_mode, COMPILE_MODES)
        check_choice("aggregate", aggregate, AGGREGATIONS)
        self.method = check_choice("method", method, METHODS)
        parsed = parse_priors(priors)
        priors_used = parsed.priors + ([L2(self.l2)] if self.l2 else [])
        self.prior_names = parsed.names + ([priors_used[-1].describe()] if self.l2 else [])
        self.save_hyperparameters(ignore=["backbone"])
        backbone = backbone if backbone is not None else load_backbone(model_name_or_path, trust_remote_code)
        perturbations = perturbation_copies(perturb_sizes, replicas)
        self.objective, self.unit_records = build_objective(
            backbone, target, seeds, self.n_tokens, aggregate, parsed.parameterization, priors_used, sae_activation,
            center_residual, perturbations)
        if perturbations is not None and (len(self.targets) > 1 or self.method != "continuous"):
            raise UserError("perturb_sizes needs one unit and method continuous; give the sensitivity study one "
                            "target per run")
        if self.method == "continuous":
            self.algorithm = ContinuousMethod(self.objective, self.lr, self.compile_mode)
            self.parameter = nn.Parameter(self.algorithm.initial_parameter(self.n_tokens))
        else:
            self.automatic_optimization = False  # the step picks tokens: its search runs as an optimizer's closure
            self.algorithm = TokenSearchMethod(self.objective, self.method, self.n_tokens, top_k, candidates,
                                               population, fluency_weights, exclude_tokens, retokenize,
                                               restart_every, self.prior_names, self.compile_mode)
            for name, tensor in zip(SearchState._fields, self.search.initial_state(self.n_tokens)):
                self.register_buffer(f"search_{name}", tensor)  # checkpoints hold the search state
            self.parameter = nn.Parameter(self.algorithm.initial_parameter(self.search_state()))
        self.model_name_or_path = model_name_or_path
        self.init_scale = backbone.embedding_std
        self.vocab_norm = float(backbone.vocab_embeddings.detach().norm(dim=-1).mean())
        self.precision_name = "32-true"  # Lightning's precision, set in setup
        self.chunk_rows_used: int | None = None  # decided at the first step (automatic) or from a checkpoint
        self._resumed_chunks: dict | None = None  # a checkpoint's chunk size, and where it was chosen
        self.history_steps: list[int] = []
        self.history: list[torch.Tensor] = []  # per step: every row's objective, shape (rows,); one unit only
        self.last_objective: torch.Tensor | None = None  # every row's objective in the last step (rows,)
        self.strict_loading = False  # checkpoints hold the learned parameter, not the frozen backbone

    # --- what the run is ----------------------------------------------------------------------------
    @property
    def search(self) -> TokenSearch | None:
        """The GCG / EPO search (``optimize/search.py``) of a token-search run; None for the continuous method."""
        return self.algorithm.search

    def search_state(self) -> SearchState:
        """Every row's token-search state (token search only)."""
        return SearchState(*(getattr(self, f"search_{name}") for name in SearchState._fields))

    backbone = property(lambda self: self.objective.backbone, doc="The frozen model.")
    layout = property(lambda self: self.objective.layout, doc="Rows = units x seeds x copies, and this process's shard.")
    targets = property(lambda self: self.objective.targets, doc="The units, in row order.")
    seeds = property(lambda self: list(self.layout.seeds), doc="The seeds, one optimization each.")
    n_rows = property(lambda self: self.layout.n_rows, doc="Units x seeds x copies.")
    aggregate = property(lambda self: self.objective.aggregation, doc="How positions become a row's objective.")

    @property
    def target(self) -> Target:
        """The target, for runs of one unit."""
        if len(self.targets) != 1:
            raise AttributeError("this run sweeps several units; use .targets")
        return self.targets[0]

    def protocol(self) -> Protocol:
        """The settings every unit's results repeat."""
        return Protocol(
            model=self.model_name_or_path, aggregate=self.aggregate, priors=list(self.prior_names),
            n_tokens=self.n_tokens, lr=self.lr, l2=self.l2, seeds=self.seeds, init_scale=self.init_scale,
            vocab_norm=self.vocab_norm, numerics=self.numerics(), method=self.method,
            search=self.algorithm.record(),
        )

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

    def memory_plan(self, block_units: int = BLOCK_UNITS) -> dict[str, int]:
        """Bytes each process holds for this run before any step's activations: the learned parameter (every
        process holds all rows), its gradient, the optimizer's state (Adam: 2 x the parameter; token search: the
        search state), and the end-of-fit analysis buffers of one block of ``block_units`` units (its embeddings
        and activations, and the checked decoder's work buffers: its (256 x V) scores in fp32 and bf16, their mask,
        and the candidates). Chunk activations come on top: automatic chunks take at most half of the memory still
        free (``model/chunking.py``)."""
        parameter = self.parameter.numel() * self.parameter.element_size()
        plan = {"parameter": parameter, "gradient": parameter if self.search is None else 0}
        if self.search is None:
            plan["Adam state"] = 2 * parameter
        else:
            plan["search state"] = sum(t.numel() * t.element_size() for t in self.search_state())
        vocab, width = self.backbone.vocab_embeddings.shape
        rows = min(block_units, len(self.targets)) * self.layout.n_seeds
        decoder = 256 * vocab * (4 + 2 + 1) + 2 * 256 * 32 * width * 4  # decode.CheckedNearestTokens, 256 rows a block
        plan["analysis buffers"] = rows * self.n_tokens * width * 4 * 3 + decoder
        return plan

    def check_memory(self, device: torch.device, block_units: int = BLOCK_UNITS) -> None:
        """Raise a UserError naming what would fit when ``memory_plan`` exceeds 90% of ``device``'s free memory.
        CUDA memory is read only where CUDA is already initialized (in each process's ``setup``, not the launcher)."""
        if device.type == "cuda" and not torch.cuda.is_initialized():
            return
        free = free_memory_bytes(device)
        plan = self.memory_plan(block_units)
        need = sum(plan.values())
        if free is None or need <= 0.9 * free:
            return
        per_unit = max(1, need // len(self.targets))
        fits = int(0.9 * free) // per_unit
        raise UserError(f"this run needs {gigabytes(need)} per process before any activation ({plan_text(plan)}) but "
                        f"{device} has {gigabytes(free)} free; every process holds the whole parameter, so more "
                        f"processes do not help: about {fits} units x {self.layout.n_seeds} seeds fit (fewer units or "
                        "seeds per fit)")

    def describe_memory(self, device: torch.device, block_units: int = BLOCK_UNITS) -> str:
        """One line: what each process holds (``memory_plan``), the free memory, and last.ckpt's size."""
        plan = self.memory_plan(block_units)
        free = free_memory_bytes(device)
        checkpoint = plan["parameter"] + plan.get("Adam state", 0) + plan.get("search state", 0)
        return (f"amax_lightning: memory per process: {plan_text(plan)} = {gigabytes(sum(plan.values()))} of "
                f"{'unknown' if free is None else gigabytes(free)} free on {device}, plus chunk activations (at most "
                f"half of what is left); last.ckpt about {gigabytes(checkpoint)}")

    def setup(self, stage: str) -> None:
        self.check_trainer(self.trainer)
        if len(self.targets) > 1:  # a sweep: what it will hold, before the first step
            self.check_memory(self.trainer.strategy.root_device)
            if self.trainer.is_global_zero:
                print(self.describe_memory(self.trainer.strategy.root_device), file=sys.stderr, flush=True)
        self.precision_name = str(self.trainer.precision)
        self.objective.layout = self.layout.for_process(self.trainer.world_size, self.trainer.global_rank)
        self.chunk_rows_used = None  # chosen again for this fit's device and shard (or taken from its checkpoint)

    def row_chunks(self) -> list[slice]:
        """This process's rows as consecutive chunks of ``chunk_rows`` (decided once; see ``chunk_rows``)."""
        shard = self.layout.shard
        if self.chunk_rows_used is None:
            self.chunk_rows_used = self.chunk_rows or self._resumed_chunk_rows() or self._automatic_chunk_rows(shard)
        return chunk_slices(shard.start, shard.stop, self.chunk_rows_used)

    def _resumed_chunk_rows(self) -> int | None:
        """The checkpoint's automatic chunk size if it was chosen on this kind of device and world size."""
        saved = self._resumed_chunks
        where = {"device": self.device.type, "world_size": self.layout.world_size}
        if saved and all(saved.get(key) == value for key, value in where.items()):
            return int(saved["rows"])
        return None

    def _automatic_chunk_rows(self, shard: slice) -> int:
        if self.search is not None:  # a row's step holds its candidates
            probe, units = self.algorithm.probe(self.search_tokens, shard.start), self.search.settings.candidates
        else:
            probe, units = self.algorithm.probe(self.parameter, shard.start), 1
        return automatic_chunk_rows(probe, shard.stop - shard.start, self.device, self.n_tokens * units)

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Every process's per-row tensor (shard, ...) as (rows, ...) in row order (a collective under DDP)."""
        return self.layout.gather(local, self.all_gather)

    # --- the step ------------------------------------------------------------------------------------
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
            grad, (embedding, activations, loss) = self.algorithm.step(self.parameter, self.row_chunks(), world,
                                                                       loss_scale)
        finite = torch.isfinite(activations).all(dim=-1) & torch.isfinite(loss)
        self._end_step(self.objective.objective(activations), loss, embedding.norm(dim=-1).mean(-1), finite)
        return surrogate_loss(self.parameter[self.layout.shard], grad, loss.sum() * world)

    def _search_step(self) -> None:
        """One GCG / EPO step of this process's rows; every process then holds every row's new state."""
        with float32_matmul_precision(self.matmul_precision):
            local, _ = self.search.step(self.search_state().rows(self.layout.shard), self.row_chunks(),
                                        self.global_step)
        for name, tensor in zip(SearchState._fields, local):
            getattr(self, f"search_{name}").copy_(self.gather_rows(tensor))
        state = self.search_state()
        best, objective = TokenSearch.best(state)
        self.parameter.data.copy_(self.backbone.embed_tokens(best))
        finite = torch.isfinite(state.activation).all(dim=1)
        self._end_step(objective, -objective, self.parameter.detach().norm(dim=-1).mean(-1), finite, gathered=True)
        if not (self.global_step + 1) % self.trainer.log_every_n_steps and len(self.targets) == 1 \
                and self.trainer.is_global_zero:
            from lightning.pytorch.loggers import TensorBoardLogger

            table = self.algorithm.best_sequences_markdown(self.seeds, best, objective)
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("search/best_sequences", table, self.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The method's optimizer: Adam with the priors' projections inside its step (continuous), or SGD with lr
        0 whose closure is the search step (token search; Lightning counts optimizer steps)."""
        return self.algorithm.optimizer(self.parameter)

    def train_dataloader(self):
        return step_loader()

    def reporter(self) -> type:
        """The callback that reports this run at its end: the ResultsWriter, or with perturbed copies of every seed
        the SensitivityRecorder (which also records every step)."""
        from amax_lightning.lightning.callbacks import ResultsWriter
        from amax_lightning.lightning.sensitivity_recorder import SensitivityRecorder

        return SensitivityRecorder if self.layout.copies > 1 else ResultsWriter

    def configure_callbacks(self):
        """The run's reporter and the interrupt handling, unless the Trainer already has them."""
        from amax_lightning.lightning.callbacks import DeferInterrupts, find_callback

        return [kind() for kind in (DeferInterrupts, self.reporter()) if find_callback(self.trainer, kind) is None]

    def flush_finite_check(self) -> None:
        """Raise NonFiniteError if a step so far had a non-finite value (the deferred check looks now)."""
        self.finite_check.flush()

    def _non_finite(self, bad_rows: torch.Tensor, step: int) -> str:
        bad = sorted({self.layout.seed_of(row) for row in bad_rows.nonzero().flatten().tolist()})
        return (f"non-finite loss or activation for seed(s) {bad} at step {step}; "
                f"try a smaller lr (now {self.lr}) or an l2 penalty")

    def _end_step(self, objective: torch.Tensor, loss: torch.Tensor, norm: torch.Tensor, finite: torch.Tensor,
                  gathered: bool = False) -> None:
        """After a step: gather every row's objective, loss, mean vector norm and finiteness (rows,) from all
        processes, stop at a non-finite row (``checks.FiniteCheck``: every process sees every row, so all stop at
        the same step, none is left waiting in a collective), record the history, log."""
        with torch.no_grad():
            stats = torch.stack([objective, loss, norm, finite.to(objective.dtype)], dim=-1)
            stats = stats if gathered else self.gather_rows(stats)  # (rows, 4)
        self.finite_check.observe(stats[:, 3] > 0, self.global_step, self.trainer.max_steps)
        self.last_objective = stats[:, 0].detach()
        if len(self.targets) == 1:  # a sweep's pages show no curves: (steps x rows) would grow with every unit
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
            token_ids = TokenSearch.best(self.search_state())[0][self.layout.shard]
        local = self.objective.evaluate(self.parameter, chunks, token_ids=token_ids)
        return RowTensors(*(self.gather_rows(t) for t in local))

    def evaluate_rows(self, rows: slice, decoder) -> RowTensors:
        """The end-of-fit tensors of rows ``rows`` from this process's own (full) parameter, decoded by ``decoder``
        (``decode.CheckedNearestTokens``), without neighbours and without any collective: a sweep's analysis block
        (``analysis/sweep.py``)."""
        self.row_chunks()  # the chunk size is decided (a resumed, finished run decides it here)
        token_ids = None
        if self.search is not None:  # the block's own rows only: blocks x all rows would grow with the sweep
            token_ids = TokenSearch.best(self.search_state().rows(rows))[0]
        return self.objective.evaluate(self.parameter, chunk_slices(rows.start, rows.stop, self.chunk_rows_used),
                                       token_ids=token_ids, decoder=decoder)

    # --- checkpoints ---------------------------------------------------------------------------------
    def check_resumable(self, checkpoint: dict) -> None:
        """Raise a UserError if ``checkpoint`` was made with another protocol (model, target, seeds, lr, ...)."""
        def normal(key, value):  # "0,1,2", "0-2" and [0, 1, 2] are the same seeds
            return parse_seeds(value) if key == "seeds" else value

        saved = {key: normal(key, value) for key, value in checkpoint.get("hyper_parameters", {}).items()
                 if key in self.PROTOCOL_KEYS}
        if self.method == "epo":
            saved.setdefault("restart_every", 0)  # made before EPO restarts existed: it ran without them
        else:
            saved.pop("restart_every", None)  # only EPO restarts
        check_resumable(saved, {key: normal(key, self.hparams[key]) for key in self.PROTOCOL_KEYS}, self.PROTOCOL_KEYS)

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
