"""ActMaxModule: the learnable input embeddings of all seeds, the frozen backbone, the loss and its logging."""

from __future__ import annotations

import contextlib
import math

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from amax_lightning.backbone import load_backbone
from amax_lightning.data import step_loader
from amax_lightning.checks import check_choice, check_int, check_number
from amax_lightning.chunking import (
    PROBE_ROWS,
    choose_chunk_rows,
    chunk_slices,
    fastest_chunk_rows,
    free_memory_bytes,
    saved_bytes_per_row,
)
from amax_lightning.errors import NonFiniteError, UserError
from amax_lightning.priors import L2, Fluency, VocabSoftmax, parse_priors
from amax_lightning.seeds import parse_seeds, shard_bounds
from amax_lightning.targets import AGGREGATIONS, Target, parse_targets

DEFAULT_SEEDS = list(range(10))


def initial_embedding(seed: int, n_tokens: int, d_model: int, scale: float) -> torch.Tensor:
    """The study's start point: ``randn(n_tokens, d_model)`` from a CPU generator seeded ``seed``, times ``scale``.

    A CPU generator per seed makes a seed start at the same point on every device and in every batch.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, d_model, generator=generator) * scale


PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed")  # the learned embedding and Adam stay >= fp32
MATMUL_PRECISIONS = ("highest", "high", "medium")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


def check_precision(precision: str) -> str:
    """Return Lightning's ``precision`` if the run may use it; a UserError for half-precision parameters."""
    if str(precision) not in PRECISIONS:
        raise UserError(
            f"trainer.precision {precision!r} is not supported; allowed: {', '.join(PRECISIONS)} "
            "(the learned embedding and its Adam state must stay in fp32 or fp64)"
        )
    return str(precision)


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """``torch.set_float32_matmul_precision(precision)`` inside the block; the previous setting after it."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def check_world_size(n_rows: int, world_size: int) -> None:
    """Raise a UserError unless every process gets at least one row (unit x seed)."""
    if n_rows < world_size:
        raise UserError(f"{n_rows} run(s) (units x seeds) for {world_size} processes; give at least one per process")


MAX_LR = 1e6  # Adam moves each coordinate by about lr per step; far larger values overflow its step size


class ActMaxModule(LightningModule):
    """Activation maximization of one unit of a frozen language model, for many seeds at once.

    All seeds share one parameter of shape (seeds, n_tokens, d_model) (or (seeds, n_tokens, V) logits with
    the ``softmax`` prior). The loss is a sum of per-seed terms, ``-aggregate_t activation[seed, t]`` plus the
    priors' penalties, and Adam is elementwise, so every seed follows exactly the trajectory it would follow
    alone.

    Under DDP each process holds the full parameter but runs the forward only on its contiguous shard of
    seeds; its loss is multiplied by the world size so that DDP's gradient *average* equals the exact
    per-seed gradient, and every process ends with the same full parameter.

    Parameters
    ----------
    model_name_or_path
        HF hub id (``gpt2``) or local model folder; the model and tokenizer are loaded from it.
    target
        Unit to maximize in TransformerLens naming, e.g. ``blocks.8.hook_resid_pre:91``; see ``targets.HOOKS``.
    n_tokens
        Number of input positions learned per seed.
    lr
        Adam learning rate, in (0, 1e6].
    l2
        Weight of the squared L2 norm of each seed's embedding (sum over tokens and dims) in the loss; 0 = off.
    seeds
        Seeds, one optimization each; set from the CLI's ``--seed`` / ``--seeds``.
    aggregate
        How a seed's activations over positions become its objective: ``mean`` (the study), ``last`` or ``max``.
    priors
        Comma-separated priors, e.g. ``"clamp,vocab_distance=0.1,straight_through"``; see ``priors.parse_priors``.
    trust_remote_code
        Passed to HF ``from_pretrained``; only set it for model code you trust.
    matmul_precision
        ``torch.set_float32_matmul_precision`` inside each training step (forward and backward): ``highest``
        (true fp32, the default), ``high`` (TF32 on NVIDIA GPUs) or ``medium`` (bf16 products).
    compile_mode
        ``none`` (eager, the default), or a ``torch.compile`` mode for the step's forward: ``default``,
        ``reduce-overhead`` (CUDA graphs on GPU) or ``max-autotune``. Shapes are static; the first steps
        pay the compile time (seconds to minutes).
    chunk_rows
        Rows (unit x seed) per forward/backward; 0 = automatic: all rows at once if their saved activations
        fit in half the device's free memory, else the most that do (on CPU also at most
        ``chunking.CPU_CHUNK_TOKENS`` token rows, the fastest size). The gradient of each row is exact
        either way (rows are independent), so this changes memory and speed, not the optimization.
    """

    PROTOCOL_KEYS = ("model_name_or_path", "target", "n_tokens", "lr", "l2", "seeds", "aggregate", "priors")

    def __init__(
        self,
        model_name_or_path: str = "gpt2",
        target: str = "blocks.8.hook_resid_pre:91",
        n_tokens: int = 5,
        lr: float = 1e-3,
        l2: float = 0.0,
        seeds: list[int] = DEFAULT_SEEDS,
        aggregate: str = "mean",
        priors: str = "",
        trust_remote_code: bool = False,
        matmul_precision: str = "highest",
        compile_mode: str = "none",
        chunk_rows: int = 0,
    ):
        super().__init__()
        seeds = parse_seeds(seeds)
        lr = check_number("lr", lr, low_open=True, high=MAX_LR)
        l2 = check_number("l2", l2, low_open=False)
        n_tokens = check_int("n_tokens", n_tokens, low=1)
        self.chunk_rows = check_int("chunk_rows", chunk_rows, low=0)
        self.matmul_precision = check_choice("matmul_precision", matmul_precision, MATMUL_PRECISIONS)
        self.compile_mode = check_choice("compile_mode", compile_mode, COMPILE_MODES)
        self._compiled_forward = None
        self.chunk_rows_used: int | None = None  # decided at the first step (automatic) or from a checkpoint
        self._resumed_chunks: dict | None = None  # a checkpoint's chunk size, and where it was chosen
        self.aggregate = check_choice("aggregate", aggregate, AGGREGATIONS)
        self.priors = parse_priors(priors) + ([L2(l2)] if l2 else [])
        self.save_hyperparameters()
        self.backbone = load_backbone(model_name_or_path, trust_remote_code=trust_remote_code)
        if self.backbone.max_positions is not None and n_tokens > self.backbone.max_positions:
            raise UserError(
                f"n_tokens {n_tokens} is out of range; this model's context allows 1..{self.backbone.max_positions}"
            )
        self.targets = parse_targets(target, self.backbone.shape)
        if not self.backbone.supports(self.targets[0]):
            raise UserError(f"target hook {self.targets[0].hook!r} needs a GPT-2 model; this model offers hook_resid_pre")
        if any(isinstance(p, Fluency) for p in self.priors) and not self.backbone.is_gpt2:
            raise UserError("prior 'fluency' needs a GPT-2 model (its LM head is the input embedding)")
        self.seeds = seeds
        self.model_name_or_path, self.lr, self.l2, self.n_tokens = model_name_or_path, lr, l2, n_tokens
        wte = self.backbone.model.get_input_embeddings().weight.detach()
        self.init_scale = float(wte.std())
        self.vocab_norm = float(self.backbone.vocab_embeddings.detach().norm(dim=-1).mean())
        self.softmax = next((p for p in self.priors if isinstance(p, VocabSoftmax)), None)
        if self.softmax is None:
            init = [initial_embedding(s, n_tokens, self.backbone.d_model, self.init_scale) for s in seeds]
        else:  # logits per position over the vocabulary, standard normal from the seed's generator
            n_vocab = self.backbone.vocab_embeddings.shape[0]
            init = [initial_embedding(s, n_tokens, n_vocab, 1.0) for s in seeds]
        self.parameter = nn.Parameter(torch.stack(init).repeat(len(self.targets), 1, 1))
        self.n_rows = len(self.targets) * len(seeds)  # row r optimizes unit r // len(seeds) from seed r % len(seeds)
        d_head = self.backbone.shape.d_head
        row_units = [t.flat_index(d_head) for t in self.targets for _ in seeds]
        self.register_buffer("row_units", torch.tensor(row_units, dtype=torch.long), persistent=False)
        self.shard = (0, self.n_rows)
        self.history_steps: list[int] = []
        self.history: list[torch.Tensor] = []  # per step: every row's objective, shape (rows,)
        self.strict_loading = False  # checkpoints hold the learned parameter, not the frozen backbone

    # --- sharding across processes -------------------------------------------------------------------
    @property
    def target(self) -> Target:
        """The target, for runs of one unit."""
        if len(self.targets) != 1:
            raise AttributeError("this run sweeps several units; use .targets")
        return self.targets[0]

    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)
        check_world_size(self.n_rows, self.trainer.world_size)
        self.shard = shard_bounds(self.n_rows, self.trainer.world_size, self.trainer.global_rank)
        self.chunk_rows_used = None  # chosen again for this fit's device and shard (or taken from its checkpoint)

    @property
    def world_size(self) -> int:
        """Processes in this fit (1 outside a Trainer)."""
        return self.trainer.world_size if self._trainer is not None else 1

    def local_rows(self) -> slice:
        """This process's contiguous shard of rows (unit x seed)."""
        return slice(*self.shard)

    def embeddings(self, parameter: torch.Tensor) -> torch.Tensor:
        """The input embeddings (rows, n_tokens, d_model) a slice of the learned parameter stands for."""
        return parameter if self.softmax is None else self.softmax.embedding(parameter, self.backbone)

    def local_embedding(self) -> torch.Tensor:
        """This process's shard of the embeddings, shape (shard rows, n_tokens, d_model), built chunk by chunk
        (the softmax prior's (rows, n_tokens, V) intermediate would not fit for a large sweep)."""
        return torch.cat([self.embeddings(self.parameter[rows]) for rows in self.row_chunks()])

    def model_input(self, embedding: torch.Tensor) -> torch.Tensor:
        """What the model is fed for ``embedding``: the embedding, or its nearest tokens (straight-through)."""
        for prior in self.priors:
            embedding = prior.model_input(embedding, self.backbone)
        return embedding

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's per-row tensor (shard, ...) into (rows, ...) in row order."""
        world = self.world_size
        if world == 1:
            return local
        size = math.ceil(self.n_rows / world)
        padded = local.new_zeros((size, *local.shape[1:]))
        padded[: local.shape[0]] = local
        stacked = self.all_gather(padded)  # (world, size, ...)
        bounds = [shard_bounds(self.n_rows, world, r) for r in range(world)]
        return torch.cat([stacked[r, : stop - start] for r, (start, stop) in enumerate(bounds)])

    # --- the objective -------------------------------------------------------------------------------
    def position_activations(self, model_input: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Each row's own unit at every position, shape (rows, n_tokens), for model inputs (rows, n_tokens, d)
        and the rows' flat unit indices ``units`` (rows,) along the hook's last dimension."""
        values = self.backbone.hook_values(model_input, self.targets[0])  # (rows, n_tokens, hook width)
        return values.gather(-1, units.view(-1, 1, 1).expand(-1, values.shape[1], 1)).squeeze(-1)

    def objective(self, activations: torch.Tensor) -> torch.Tensor:
        """Each seed's objective, shape (seeds,): its activations (seeds, n_tokens) reduced by ``aggregate``."""
        if self.aggregate == "mean":
            return activations.mean(dim=-1)
        if self.aggregate == "last":
            return activations[:, -1]
        return activations.max(dim=-1).values

    def per_seed_loss(self, embedding: torch.Tensor, model_input: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """Each seed's loss, shape (seeds,): minus its objective, plus every prior's penalty."""
        loss = -self.objective(activations)
        for prior in self.priors:
            penalty = prior.penalty(embedding, model_input, self.backbone)
            if penalty is not None:
                loss = loss + penalty
        return loss

    def row_forward(self, parameter_rows: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embedding (rows, T, d), activations (rows, T) and per-row loss (rows,) of parameter rows ``rows``.

        Runs through ``torch.compile`` when ``compile_mode`` asks for it.
        """
        if self._compiled_forward is None:
            self._compiled_forward = self._forward_rows
            if self.compile_mode != "none":
                mode = None if self.compile_mode == "default" else self.compile_mode
                self._compiled_forward = torch.compile(self._forward_rows, mode=mode, dynamic=False)
        if self.compile_mode == "reduce-overhead":  # CUDA graphs: this call starts a new step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled_forward(parameter_rows, self.row_units[rows])

    def _forward_rows(self, parameter_rows: torch.Tensor, units: torch.Tensor):
        embedding = self.embeddings(parameter_rows)
        model_input = self.model_input(embedding)
        activations = self.position_activations(model_input, units)
        return embedding, activations, self.per_seed_loss(embedding, model_input, activations)

    def row_chunks(self) -> list[slice]:
        """This process's rows as consecutive chunks of ``chunk_rows`` (decided once; see ``chunk_rows``)."""
        if self.chunk_rows_used is None:
            self.chunk_rows_used = self.chunk_rows or self._resumed_chunk_rows() or self._automatic_chunk_rows()
        return chunk_slices(*self.shard, self.chunk_rows_used)

    def _resumed_chunk_rows(self) -> int | None:
        """The checkpoint's automatic chunk size if it was chosen on this kind of device and world size."""
        saved = self._resumed_chunks
        where = {"device": self.device.type, "world_size": self.world_size}
        if saved and all(saved.get(key) == value for key, value in where.items()):
            return int(saved["rows"])
        return None

    def _automatic_chunk_rows(self) -> int:
        n_local = self.shard[1] - self.shard[0]
        if n_local <= PROBE_ROWS[-1]:
            return n_local

        def probe(n: int) -> torch.Tensor:  # eager: the saved tensors of the plain graph, and no extra compiles
            rows = slice(self.shard[0], self.shard[0] + n)
            with torch.enable_grad():
                return self._forward_rows(self.parameter[rows].detach().requires_grad_(), self.row_units[rows])[2].sum()

        per_row = saved_bytes_per_row(probe)
        free = free_memory_bytes(self.device)
        fastest = fastest_chunk_rows(self.device, self.n_tokens)
        chunk = choose_chunk_rows(n_local, per_row, free, cap=fastest)
        if chunk < n_local:
            free_text = "unknown" if free is None else f"{free / 2**20:.0f} MiB"
            rank_zero_info(
                f"amax_lightning: running {n_local} rows as {math.ceil(n_local / chunk)} chunks of {chunk} rows: "
                f"{per_row / 2**20:.2f} MiB saved per row, {free_text} free on {self.device.type}, fastest chunk "
                f"{fastest or 'as large as fits'} rows (set --model.chunk_rows to choose)"
            )
        return chunk

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Forward and exact gradient of every chunk of this process's rows, all inside ``matmul_precision``.

        Each chunk's graph is freed once its gradient is taken. The returned surrogate has the true loss as
        its value and exactly these gradients, so Lightning's backward, DDP's average and Adam see the same
        step as for one batch, and no setting leaks past the step.
        """
        scale = self.world_size
        # Under 16-mixed each chunk's backward is loss-scaled as Lightning scales the returned loss, so fp16
        # gradients neither underflow nor hide an overflow (inf/nan reaches the scaler, which skips the step).
        scaler = getattr(getattr(self.trainer, "precision_plugin", None), "scaler", None)
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        local = self.parameter[self.local_rows()]
        grad = torch.zeros_like(local)
        outputs: list[torch.Tensor] = []  # embedding, activations, loss of every local row
        with float32_matmul_precision(self.matmul_precision):
            for rows in self.row_chunks():
                piece = self.parameter[rows].detach().requires_grad_()
                values = self.row_forward(piece, rows)
                (chunk_grad,) = torch.autograd.grad(values[2].sum() * (scale * loss_scale), piece)
                done = slice(rows.start - self.shard[0], rows.stop - self.shard[0])
                grad[done] = chunk_grad / loss_scale
                # copied out at once: the next chunk's call may reuse the outputs' memory (CUDA graphs)
                outputs = outputs or [v.new_empty((len(local), *v.shape[1:])) for v in values]
                for out, value in zip(outputs, values):
                    out[done] = value.detach()
        embedding, activations, loss = outputs
        self._check_finite(activations, loss)  # once per step, after all chunks: one host sync, not one per chunk
        self._log_step(embedding, activations, loss)
        surrogate = (local * grad).sum()
        return surrogate - surrogate.detach() + loss.sum() * scale

    @torch.no_grad()
    def local_activations(self, model_input: torch.Tensor) -> torch.Tensor:
        """Activations (shard rows, T) of this process's rows for model inputs (shard rows, T, d), in chunks."""
        start = self.shard[0]
        chunks = self.row_chunks()
        return torch.cat([self.position_activations(model_input[r.start - start : r.stop - start], self.row_units[r]) for r in chunks])

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """Apply the priors' projections (e.g. the norm clamp) to the parameter after the optimizer step."""
        for prior in self.priors:
            prior.project_(self.parameter.data, self.backbone)

    def _check_finite(self, activations: torch.Tensor, loss: torch.Tensor) -> None:
        """Raise NonFiniteError naming the seeds of this process's rows that went non-finite."""
        finite = torch.isfinite(activations).all(dim=-1) & torch.isfinite(loss)
        if not bool(finite.all()):
            bad = sorted({self.seeds[(self.shard[0] + i) % len(self.seeds)] for i in (~finite).nonzero().flatten().tolist()})
            raise NonFiniteError(
                f"non-finite loss or activation for seed(s) {bad} at step {self.global_step}; "
                f"try a smaller lr (now {self.lr}) or an l2 penalty"
            )

    def _log_step(self, embedding: torch.Tensor, activations: torch.Tensor, loss: torch.Tensor) -> None:
        with torch.no_grad():
            stats = torch.stack([self.objective(activations), loss, embedding.norm(dim=-1).mean(-1)], dim=-1)
            stats = self.gather_rows(stats)  # (rows, 3): objective, loss, mean vector norm
        self.history_steps.append(self.global_step)
        self.history.append(stats[:, 0].detach())
        if (self.global_step + 1) % self.trainer.log_every_n_steps:
            return  # Lightning would drop these values anyway; building them costs ~7% of a CPU step
        if len(self.targets) == 1:
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

    def numerics(self) -> dict:
        """How the run computed: Lightning precision, fp32 matmul precision, rows per forward/backward chunk,
        torch's CPU threads."""
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        return {"precision": precision, "matmul_precision": self.matmul_precision, "compile_mode": self.compile_mode,
                "chunk_rows": self.chunk_rows_used, "cpu_threads": torch.get_num_threads()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.parameter], lr=self.lr)

    def train_dataloader(self):
        return step_loader()

    def configure_callbacks(self):
        """A default ResultsWriter, unless the Trainer already has one (the CLI adds one from ``--results.*``)."""
        from amax_lightning.callbacks import ResultsWriter

        present = any(isinstance(cb, ResultsWriter) for cb in self.trainer.callbacks)
        return [] if present else [ResultsWriter()]

    def check_resumable(self, checkpoint: dict) -> None:
        """Raise a UserError if ``checkpoint`` was made with another protocol (model, target, seeds, lr, ...)."""
        saved = checkpoint.get("hyper_parameters", {})
        for key in self.PROTOCOL_KEYS:
            if key in saved and saved[key] != self.hparams[key]:
                raise UserError(
                    f"checkpoint was made with {key}={saved[key]!r} but this run has {key}={self.hparams[key]!r}; "
                    "resume with the same settings"
                )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep checkpoints small: drop the frozen backbone's weights (they are reloaded from the model source).

        The activation history rides along, so a resumed run's report shows the whole optimization.
        """
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("backbone.")]:
            del state[key]
        steps, values = self.activation_history()
        checkpoint["activation_history"] = {"steps": torch.tensor(steps, dtype=torch.long), "values": values}
        if self.chunk_rows_used is not None:  # a resumed automatic run keeps its chunks where it can: same arithmetic
            checkpoint["chunk_rows"] = {"rows": self.chunk_rows_used, "device": self.device.type, "world_size": self.world_size}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if isinstance(checkpoint.get("chunk_rows"), dict):
            self._resumed_chunks = checkpoint["chunk_rows"]
        history = checkpoint.get("activation_history")
        if history is not None:
            self.history_steps = history["steps"].tolist()
            self.history = list(history["values"].to(self.device))
