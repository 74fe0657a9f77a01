"""Callbacks: interrupts that leave consistent state, and the end of fit (gather, analyze, write, TensorBoard)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from amax_lightning.analysis.corpus_pass import CorpusUnits, corpus_pass, pass_bytes, units_per_pass
from amax_lightning.analysis.corpus_results import corpus_result
from amax_lightning.analysis.corpus_source import (
    DEFAULT_COLUMN,
    DEFAULT_SPLIT,
    DEFAULT_TOKENS,
    DEFAULT_WINDOW,
    CorpusSpec,
    check_window,
    corpus_spec,
    iter_windows,
)
from amax_lightning.analysis.corpus_stats import GROUPS, PER_GROUP, TOP_K
from amax_lightning.analysis.corpus_tables import corpus_meta, table_bytes
from amax_lightning.analysis.results import (
    UnitResults,
    analyze_unit,
    to_json,
    with_corpus,
    with_data_baseline,
    with_logit_effects,
    with_null_model,
    with_pareto,
)
from amax_lightning.analysis.sweep import (
    BLOCK_UNITS,
    AtlasResults,
    NullLookup,
    analyze_block,
    analyze_blocks,
    block_units_range,
    blocks_of,
    fingerprint,
    missing_blocks,
    n_blocks,
    summarize,
)
from amax_lightning.analysis.tables import block_paths, merge_blocks, remove_blocks, table_names
from amax_lightning.base.checks import check_int
from amax_lightning.base.errors import UserError
from amax_lightning.base.files import write_text_atomic
from amax_lightning.base.progress import Progress, duration
from amax_lightning.lightning.cluster import Requeue, is_lost_peer, lost_peer_message, requeue
from amax_lightning.lightning.module import gigabytes
from amax_lightning.lightning.snapshots import Snapshots
from amax_lightning.model.chunking import free_memory_bytes
from amax_lightning.model.decode import CheckedNearestTokens, requested_path
from amax_lightning.model.targets import hook_width

MAX_NULL_SAMPLES = 1_000_000  # random directions decoded: about 7 minutes on 2 CPU cores at GPT-2 small's size
MAX_NULL_SIMULATIONS = 1_000_000  # Monte Carlo studies: a p-value resolution of 1e-6
MAX_BASELINE_TOP_K = 100_000  # at most the vocabulary anyway


def find_callback(trainer: Trainer, kind: type) -> Optional[Callback]:
    """The trainer's first callback of type ``kind``, or None."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)


class DeferInterrupts(Callback):
    """Ctrl-C, SIGTERM and SIGUSR1 during the steps take effect at the end of the current step, on every process
    at the same step, so the checkpoint saved then is a consistent state (parameter, Adam state and step count of
    one finished step). SIGUSR1 (SLURM's warning before a time limit) then requeues the job (``cluster.Requeue``).
    After the last step they interrupt at once (``interrupt_now``): nothing reads Lightning's SIGTERM flag any more.
    A collective that failed because another process was lost is reported in one line (``cluster``)."""

    def __init__(self) -> None:
        self.pending = False
        self.sigterm = False
        self.sigusr1 = False
        self._ignored = False  # SIGINT was ignored when the fit started (a background job): leave it so
        self._previous: dict[int, object] = {}

    def on_fit_start(self, trainer: Trainer, module: LightningModule) -> None:
        self.pending = self.sigterm = self.sigusr1 = False
        main = threading.current_thread() is threading.main_thread()
        self._ignored = main and signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # e.g. a job started with `&`
        if main and not self._ignored:
            self._previous.setdefault(signal.SIGINT, signal.signal(signal.SIGINT, self._note))

    def _note(self, signum, frame) -> None:
        self.pending = True
        signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))  # a second Ctrl-C: at once

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        """SIGTERM and SIGUSR1 only set flags, read at the end of the step. Installed here, after Lightning's own
        handlers (its SIGTERM handler runs a collective inside the handler; its SLURM SIGUSR1 handler saves
        ``hpc_ckpt_*.ckpt`` in the middle of a step); Lightning restores the earlier handlers at teardown."""
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._note_sigterm)
        signal.signal(signal.SIGUSR1, self._note_sigusr1)

    def _note_sigterm(self, signum, frame) -> None:
        self.sigterm = True

    def _note_sigusr1(self, signum, frame) -> None:
        self.sigusr1 = True

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs, batch, batch_idx: int) -> None:
        writer = find_callback(trainer, ResultsWriter)
        if writer is not None:  # a snapshot due at this step is taken before an interrupt can stop the fit
            writer.snapshot_if_due(trainer, module)
        # parameters, Adam state and global_step all belong to the same finished step here; after the last step
        # the interrupt is left to ``interrupt_now``, so a finished run is never reported as partial
        ctrl_c, sigterm, sigusr1 = self._anywhere(trainer, self.pending, self.sigterm, self.sigusr1)
        self.pending, self.sigterm, self.sigusr1 = ctrl_c, sigterm, sigusr1  # never cleared: counted at the next step
        if trainer.global_step < trainer.max_steps:
            self._raise_for(trainer, ctrl_c, sigterm, sigusr1)

    @staticmethod
    def _raise_for(trainer: Trainer, ctrl_c: bool, sigterm: bool, sigusr1: bool) -> None:
        if ctrl_c:
            raise KeyboardInterrupt
        if sigusr1:
            raise Requeue
        if sigterm:
            raise SIGTERMException

    @staticmethod
    def _anywhere(trainer: Trainer, *seen: bool) -> list[bool]:
        """Whether any process has seen each signal: one collective under DDP, so that every process stops at the
        same point and none is left waiting in the next collective."""
        if trainer.world_size == 1:
            return [bool(s) for s in seen]
        flags = torch.tensor([float(bool(s)) for s in seen], device=trainer.strategy.root_device)
        return [bool(v > 0) for v in trainer.strategy.reduce(flags, reduce_op="sum").tolist()]

    @contextlib.contextmanager
    def interrupt_now(self, trainer: Trainer, earlier: bool = True):
        """Inside the block, Ctrl-C raises KeyboardInterrupt and SIGTERM raises SIGTERMException at once; with
        ``earlier``, one that came before (during the last step) raises on entry. The previous handlers come
        back after it."""
        if earlier:  # the decisions on every process (one collective under DDP), then raise
            self._raise_for(trainer, *self._anywhere(trainer, self.pending, self.sigterm or trainer.received_sigterm,
                                                     self.sigusr1))
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def terminate(signum, frame):
            raise SIGTERMException

        def requeue(signum, frame):
            raise Requeue

        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, terminate),
                    signal.SIGUSR1: signal.signal(signal.SIGUSR1, requeue)}
        if not self._ignored:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def teardown(self, trainer: Trainer, module: LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_exception(self, trainer: Trainer, module: LightningModule, exception: BaseException) -> None:
        """A collective that failed because another process exited or stopped answering: one line on stderr
        (which process, how, at which step, the checkpoint on disk); ``cli.run_trainer`` then exits with code 1."""
        if trainer.world_size == 1 or not is_lost_peer(exception):
            return
        saved = getattr(trainer.checkpoint_callback, "_last_global_step_saved", None)
        timeout = getattr(trainer.strategy, "_timeout", None)
        print(lost_peer_message(exception, trainer.global_rank, trainer.world_size, trainer.global_step, saved,
                                int(timeout.total_seconds()) if timeout is not None else None),
              file=sys.stderr, flush=True)
        exception.amax_reported = True


class ResultsWriter(Callback):
    """At the end of fit: decode, measure, and write ``results.json`` and the report into the run's folder.

    Rank 0 writes. After ``fit``, ``results_path`` holds the path of ``results.json`` and ``results`` the
    ``UnitResults`` or ``AtlasResults`` (None on other ranks, and when nothing was written).

    Parameters
    ----------
    null_samples
        The most random directions decoded to estimate the chance distribution of tokens (the null model; fewer
        when its estimates are precise enough, ``null_model.sampled_null``); 0 = off.
    null_simulations
        Monte Carlo studies drawn from that distribution for the p-value of the observed n_unique.
    baseline_top_k
        Data-sampling baseline: the unit's activation for every vocabulary token as a one-token input, and
        the overlap of the gradient-ascent tokens with the top k of them; 0 = off (it costs V forwards).
    corpus
        Real text read once for every unit after the steps (``analysis/corpus_pass.py``): a hub dataset id or a
        ``.txt``/``.jsonl``/``.parquet`` file or folder; None = off.
    corpus_split, corpus_column
        The hub dataset's split, and the column holding the text (jsonl, parquet and hub datasets).
    corpus_tokens
        The budget: tokens fed to the model (BOS included); the corpus is read until it or the text ends.
    corpus_window
        Tokens per window (each starts with the model's BOS where it has one).
    block_units
        Sweeps: units per analysis block, the unit of work a process analyses and writes whole; a requeued job
        reuses the blocks already written (``analysis/sweep.py``).
    snapshot_every
        Decode every row's tokens every this many steps, and at the last step (``analysis/convergence.py``); default
        (None): about 20 snapshots over ``max_steps``.
    stop_when_stable
        Stop at the first snapshot at which every row's tokens have been unchanged for this many snapshot
        intervals (or at ``max_steps``); None: never early.
    """

    def __init__(
        self,
        null_samples: int = 20_000,
        null_simulations: int = 10_000,
        baseline_top_k: int = 0,
        corpus: Optional[str] = None,
        corpus_split: str = DEFAULT_SPLIT,
        corpus_column: str = DEFAULT_COLUMN,
        corpus_tokens: int = DEFAULT_TOKENS,
        corpus_window: int = DEFAULT_WINDOW,
        baseline_text: Optional[str] = None,
        block_units: int = BLOCK_UNITS,
        snapshot_every: Optional[int] = None,
        stop_when_stable: Optional[int] = None,
    ) -> None:
        self.null_samples = check_int("results.null_samples", null_samples, low=0, high=MAX_NULL_SAMPLES)
        self.null_simulations = check_int("results.null_simulations", null_simulations, low=1, high=MAX_NULL_SIMULATIONS)
        requested_path()  # a bad $AMAX_LIGHTNING_DECODE fails now, not after the steps
        self.baseline_top_k = check_int("results.baseline_top_k", baseline_top_k, low=0, high=MAX_BASELINE_TOP_K)
        if baseline_text is not None:
            raise UserError(f"results.baseline_text {baseline_text!r}: a text file is now one kind of corpus; use "
                            f"--results.corpus {baseline_text}")
        self.corpus: CorpusSpec | None = None if corpus is None else corpus_spec(
            corpus, corpus_split, corpus_column, corpus_tokens, corpus_window)  # opened now, not after the steps
        self.block_units = check_int("results.block_units", block_units, low=1)
        if snapshot_every is not None:
            snapshot_every = check_int("results.snapshot_every", snapshot_every, low=1)
        if stop_when_stable is not None:
            stop_when_stable = check_int("results.stop_when_stable", stop_when_stable, low=1)
        self.snapshots = Snapshots(snapshot_every, stop_when_stable)
        self.stopped_stable = False
        self.results_path: str | None = None
        self.results: UnitResults | AtlasResults | None = None
        self._analyzing = False
        self._finished_checkpoint_step: int | None = None

    @property
    def uses_baseline(self) -> bool:
        return bool(self.baseline_top_k)

    def check_corpus(self, module: LightningModule, world_size: int, probe: bool = False) -> str | None:
        """A UserError when the corpus window does not fit the model (or, with ``probe``, when the corpus has not one
        window of text); else the line saying what the corpus pass will hold and write (None without a corpus)."""
        if self.corpus is None:
            return None
        check_window(self.corpus, module.backbone.max_positions)
        if probe:  # reads until the first window: an empty corpus fails before the steps
            next(iter_windows(dataclasses.replace(self.corpus, tokens=self.corpus.window), module.backbone.tokenizer, 1))
        units = -(-len(module.targets) // world_size)  # each process reads the units of its blocks
        window, tokens = self.corpus.window, self.corpus.tokens
        per_pass = self._units_per_pass(module, units)
        passes = -(-units // per_pass)
        written = table_bytes(len(module.targets), window, TOP_K, GROUPS * PER_GROUP)
        what = "corpus.parquet about" if len(module.targets) > 1 else "results.json grows by about"
        how = "one pass" if passes == 1 else f"{passes} passes of up to {per_pass:,} units (half the free memory)"
        return (f"amax_lightning: corpus pass after the steps: up to {tokens:,} tokens of {self.corpus.source} in "
                f"windows of {window}, {len(module.targets):,} unit(s) in {how}; memory per process about "
                f"{gigabytes(pass_bytes(min(units, per_pass), window, tokens))}; {what} {gigabytes(written)} "
                "(before compression)")

    def _units_per_pass(self, module: LightningModule, units: int) -> int:
        """How many units one corpus pass reads on this process's device (``corpus_pass.units_per_pass``)."""
        return units_per_pass(units, self.corpus.window, self.corpus.tokens, free_memory_bytes(module.device))

    def check_steps(self, max_steps: int) -> None:
        """A UserError when ``snapshot_every`` is larger than the fit's ``max_steps`` (the CLI asks before the fit)."""
        if self.snapshots.every is not None and self.snapshots.every > max_steps:
            raise UserError(f"results.snapshot_every {self.snapshots.every} is out of range; this fit's "
                            f"max_steps {max_steps} allows 1..{max_steps}")

    # --- snapshots (analysis/convergence.py) ---------------------------------------------------------------------
    def setup(self, trainer: Trainer, module: LightningModule, stage: str) -> None:
        self.snapshots.clear()  # a resumed fit gets its snapshots back from the checkpoint (load_state_dict)
        self.stopped_stable = False
        plan = self.check_corpus(module, trainer.world_size)
        if plan and trainer.is_global_zero and stage == "fit" and module.reporter() is ResultsWriter:
            print(plan, file=sys.stderr, flush=True)

    def state_dict(self) -> dict:
        return {"snapshots": self.snapshots.state_dict(), "stopped_stable": self.stopped_stable}

    def load_state_dict(self, state: dict) -> None:
        if "snapshots" in state:
            self.snapshots.load_state_dict(state["snapshots"])
            self.stopped_stable = bool(state.get("stopped_stable", False))

    def snapshot_if_due(self, trainer: Trainer, module: LightningModule) -> None:
        """Take the snapshot due at this step (a collective under DDP, at the same step on every process), log it,
        and stop the fit when ``stop_when_stable`` says so (every process decides the same from the same numbers)."""
        step = trainer.global_step  # cheap checks first: this runs twice after every step
        if not self.snapshots.due(step, trainer.max_steps) or module.last_objective is None:
            return
        if module.reporter() is not ResultsWriter:  # perturbed copies: the SensitivityRecorder reports this run
            return
        self.snapshots.take(module, step)
        if trainer.is_global_zero:
            log_snapshot(trainer, self.snapshots, step)
        if step < trainer.max_steps and self.snapshots.stable():
            self.stopped_stable = True
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self.snapshot_if_due(trainer, module)

    def stop_reason(self, partial: bool) -> str:
        return "interrupted" if partial else ("stable" if self.stopped_stable else "max_steps")

    def on_load_checkpoint(self, trainer: Trainer, module: LightningModule, checkpoint: dict) -> None:
        self._finished_checkpoint_step = int(checkpoint.get("global_step", 0))

    def on_fit_start(self, trainer: Trainer, module: LightningModule) -> None:
        """A resumed run whose steps were all done (interrupted during its analysis) is analyzed here: Lightning
        skips the loop, and its ``on_train_end``, when no step is left, or (a fit stopped as stable) when told to
        stop."""
        self._analyzing = False
        done, self._finished_checkpoint_step = self._finished_checkpoint_step, None
        stopped = self.stopped_stable and bool(self.snapshots.steps) and done == self.snapshots.steps[-1]
        if done is not None and trainer.max_steps is not None and (0 <= trainer.max_steps <= done or stopped):
            self._finish(trainer, module, steps=done, partial=False)
            trainer.should_stop = True  # no step is left to run

    def on_train_end(self, trainer: Trainer, module: LightningModule) -> None:
        self._finish(trainer, module, steps=trainer.global_step, partial=False)

    def on_exception(self, trainer: Trainer, module: LightningModule, exception: BaseException) -> None:
        """On Ctrl-C or SIGTERM: save ``last.ckpt``; during the steps also write results marked partial. On SIGUSR1
        (``Requeue``): save ``last.ckpt`` and requeue the SLURM job at once. After a lost process: nothing.

        Interrupted during the end-of-fit analysis, no results are written; resuming finishes the analysis. An
        error in the analysis also keeps ``last.ckpt`` (the steps were good). Other errors write nothing.
        """
        if is_lost_peer(exception):  # a collective would wait for the lost process: last.ckpt stays as it was
            return
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        if self._analyzing and trainer.global_step == 0 and trainer.is_global_zero:  # the analysis of a resumed,
            # finished run (in on_fit_start, before Lightning restores the step count): its checkpoint stays as it is
            print("amax_lightning: stopped during the end-of-fit analysis of a resumed run: no results written; "
                  "its checkpoint is unchanged, resume again with --ckpt_path last", file=sys.stderr, flush=True)
        if not (interrupted or self._analyzing) or trainer.global_step == 0:
            if isinstance(exception, Requeue) and trainer.is_global_zero:
                requeue(trainer.global_step, None)
            return
        checkpoint = None
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            checkpoint = os.path.join(trainer.checkpoint_callback.dirpath, "last.ckpt")
            trainer.save_checkpoint(checkpoint, weights_only=False)
        if isinstance(exception, Requeue):  # at once, before SLURM's time is up: no partial results, the job goes on
            if trainer.is_global_zero:
                requeue(trainer.global_step, checkpoint)
            return
        resume = f"; resume with --ckpt_path last (saved {checkpoint})" if checkpoint else ""
        if self._analyzing:
            if trainer.is_global_zero:
                what = "interrupted during" if interrupted else "error in"
                print(f"amax_lightning: {what} the end-of-fit analysis after step {trainer.global_step}: "
                      f"no results written{resume}", file=sys.stderr, flush=True)
            return
        self._finish(trainer, module, steps=trainer.global_step, partial=True)
        if trainer.is_global_zero:
            print(f"amax_lightning: interrupted at step {trainer.global_step}: partial results in "
                  f"{self.results_path}{resume}", file=sys.stderr, flush=True)
        if trainer.world_size > 1:  # the others exit (non-zero) only once rank 0 has written: Lightning's launcher
            trainer.strategy.barrier("partial results written")  # kills every process as soon as one has exited

    def _finish(self, trainer: Trainer, module: LightningModule, steps: int, partial: bool) -> None:
        """Analyze and write, interruptible at once by Ctrl-C or SIGTERM (files are written atomically)."""
        if module.reporter() is not ResultsWriter:  # perturbed copies: the SensitivityRecorder reports this run
            return
        module.flush_finite_check()  # a deferred finiteness check (finite_check_every): a bad run writes nothing
        interrupts = find_callback(trainer, DeferInterrupts)
        guard = interrupts.interrupt_now(trainer, earlier=not partial) if interrupts else contextlib.nullcontext()
        self._analyzing = not partial
        with guard:
            # a collective under DDP: every rank asks before rank 0 analyzes alone, so no process waits inside a
            # collective (and its timeout) for the analysis
            log_dir = trainer.log_dir or trainer.default_root_dir
            if len(module.targets) > 1:
                results = self._analyze_sweep(trainer, module, log_dir, steps, partial)
            else:
                results = self._analyze(trainer, module, steps, partial)
            if results is not None:
                self._write(trainer, module, log_dir, results, steps)
        self._analyzing = False

    def _analyze_sweep(self, trainer: Trainer, module: LightningModule, log_dir: str, steps: int, partial: bool
                       ) -> AtlasResults | None:
        """A sweep's analysis, sharded: each process analyses its blocks of units from its own copy of the
        parameter and writes them whole (``analysis/sweep.py``); rank 0 merges them into the tables and returns the
        summary (None on other ranks). Partial results (an interrupted fit) are analysed by rank 0 alone."""
        world, rank = (1, 0) if partial else (trainer.world_size, trainer.global_rank)
        if partial and not trainer.is_global_zero:
            return None
        module.row_chunks()  # decided before the protocol records it (a resumed, finished run decides it here)
        protocol, layout, backbone, targets = module.protocol(), module.layout, module.backbone, module.targets
        n_units, seeds = len(targets), layout.n_seeds
        settings = {key: value for key, value in to_json(protocol).items() if key != "numerics"}
        state = fingerprint({**settings, "target": module.hparams.target, "steps": steps, "partial": partial,
                             "block_units": self.block_units,
                             "corpus": None if self.corpus is None else dataclasses.asdict(self.corpus)}, module.parameter)
        search = module.search
        null = NullLookup(backbone.vocab_embeddings, module.init_scale, seeds * protocol.n_tokens, self.null_samples,
                          self.null_simulations, allowed=search.allowed if search is not None else None,
                          progress=trainer.is_global_zero)
        hook_vectors = module.objective.readout.written_directions(hook_width(targets[0].hook, backbone.shape))
        snapshots = self.snapshots.unit_arrays()
        decoder = CheckedNearestTokens(backbone.vocab_embeddings)  # one for all blocks: it times its fast path once

        mine = blocks_of(rank, world, n_units, self.block_units)
        found, where = None, {}
        use_corpus = self.corpus is not None and not partial  # partial results are written at once, without it
        names = table_names(use_corpus)
        todo = missing_blocks(log_dir, mine, state, names)
        def read_corpus(blocks: list[int]) -> None:
            """One corpus pass for the units of ``blocks``: ``found`` and each block's positions in it."""
            nonlocal found
            ranges = [block_units_range(b, n_units, self.block_units) for b in blocks]
            found = self._corpus_pass(module, torch.cat([torch.arange(a, b) for a, b in ranges]),
                                      progress=trainer.is_global_zero)
            where.clear()
            offset = 0
            for start, stop in ranges:
                where[start] = slice(offset, offset + stop - start)
                offset += stop - start

        def analyze(start: int, stop: int):
            tensors = module.evaluate_rows(slice(start * seeds, stop * seeds), decoder)
            vectors = None if hook_vectors is None else hook_vectors[start:stop]
            return analyze_block(protocol, targets[start:stop], start, tensors, backbone,
                                 module.unit_records[start:stop], vectors, null,
                                 {name: values[start:stop] for name, values in snapshots.items()},
                                 None if found is None else (found, where[start]))

        def units_in(blocks: list[int]) -> int:
            return sum(stop - start for start, stop in (block_units_range(b, n_units, self.block_units) for b in blocks))

        if len(todo) < len(mine) and trainer.is_global_zero:
            print(f"amax_lightning: reused {len(mine) - len(todo)} analysed block(s) of an earlier try"
                  + (" (rank 0's share)" if world > 1 else ""), file=sys.stderr, flush=True)
        what = "analysis" if world == 1 else f"analysis (rank 0 of {world}; each process its share)"
        groups = [todo]  # without a corpus, or when one pass can read all units: one group
        if use_corpus and todo:  # each group of blocks: one corpus pass for its units, then its analysis
            per_pass = max(self._units_per_pass(module, units_in(todo)), min(self.block_units, n_units))
            groups, size = [[]], 0
            for block in todo:
                block_size = units_in([block])
                if groups[-1] and size + block_size > per_pass:
                    groups, size = [*groups, []], 0
                groups[-1].append(block)
                size += block_size
        done = units_in(mine) - units_in(todo)
        for group in groups:
            if use_corpus and group:
                read_corpus(group)
            with Progress(what, units_in(mine), "units", enabled=trainer.is_global_zero, done=done) as progress:
                analyze_blocks(log_dir, group, n_units, state, analyze, progress, self.block_units)
            done += units_in(group)
            found = None
        if world > 1:
            trainer.strategy.barrier("sweep blocks written")
        if not trainer.is_global_zero:
            return None
        self._merge_started = time.monotonic()
        print(f"amax_lightning: merging {n_blocks(n_units, self.block_units)} blocks and writing the atlas",
              file=sys.stderr, flush=True)
        corpus = corpus_meta(block_paths(log_dir, 0, names)["corpus"]) if use_corpus else None
        tables = merge_blocks(log_dir, n_blocks(n_units, self.block_units), names)
        return summarize(log_dir, protocol, module.hparams.target, steps, partial, tables, module.unit_records[0],
                         trainer.max_steps, self.snapshots.steps, self.stop_reason(partial), corpus)

    def _analyze(self, trainer: Trainer, module: LightningModule, steps: int, partial: bool):
        """Rank 0's UnitResults of a run of one unit; None on other ranks."""
        tensors = module.evaluate()  # a collective under DDP: every rank takes part
        if not trainer.is_global_zero:
            return None
        protocol, layout, backbone = module.protocol(), module.layout, module.backbone
        units = [analyze_unit(protocol, target, steps, partial, tensors.rows(layout.unit_rows(u)), backbone,
                              module.unit_records[u]) for u, target in enumerate(module.targets)]
        width = hook_width(module.targets[0].hook, backbone.shape)
        units = with_logit_effects(units, backbone, module.targets, module.objective.readout.written_directions(width))
        search = module.search
        units = with_null_model(units, backbone.vocab_embeddings, module.init_scale, self.null_samples,
                                self.null_simulations, allowed=search.allowed if search is not None else None)
        if search is not None and search.settings.fluency:
            state = module.search_state()
            units = [with_pareto(unit, protocol.seeds, *(t[layout.unit_rows(u)].cpu() for t in state[3:]), backbone)
                     for u, unit in enumerate(units)]
        unit = with_data_baseline(units[0], backbone, module.target, self.baseline_top_k,
                                  reader=module.objective.unit_reader(0))
        if self.corpus is not None and not partial:  # partial results are written at once, without the corpus
            found = self._corpus_pass(module, torch.arange(1), progress=True)
            unit = with_corpus(unit, corpus_result(found, 0, backbone.token_strings), backbone)
        convergence = self.snapshots.convergence(0, steps, self.stop_reason(partial), unit.uniqueness.n_total,
                                                 trainer.max_steps)
        return dataclasses.replace(unit, convergence=convergence)

    def _corpus_pass(self, module: LightningModule, positions: torch.Tensor, progress: bool) -> CorpusUnits:
        """The corpus pass for the run's units at ``positions`` (their order in the run)."""
        backbone, readout, hook = module.backbone, module.objective.readout, module.targets[0]

        def read(inputs: torch.Tensor) -> torch.Tensor:
            return readout.read_units(backbone.hook_values(inputs, hook), positions)

        identity = torch.tensor([module.targets[p].flat_index(backbone.shape.d_head) for p in positions.tolist()])
        return corpus_pass(self.corpus, backbone.tokenizer, backbone.embed_tokens, read, identity, module.device,
                           progress)

    def _write(self, trainer: Trainer, module: LightningModule, log_dir: str, results, steps: int) -> None:
        from amax_lightning.report import html, markdown  # imported only when a report is written

        os.makedirs(log_dir, exist_ok=True)
        if isinstance(results, AtlasResults):
            summary, images = markdown.write_atlas(log_dir, results)
            html.write_atlas_page(log_dir, results)
        else:
            history_steps, history = module.activation_history()
            summary = markdown.summary_markdown(results)
            images = markdown.write_report(log_dir, results, summary, history_steps, history, module.seeds)
            html.write_unit_page(log_dir, results)
        path = os.path.join(log_dir, "results.json")
        write_text_atomic(path, json.dumps(results.to_json(), indent=2) + "\n")
        if isinstance(results, AtlasResults):
            remove_blocks(log_dir)  # the merged tables and the summary are written
            sizes = ", ".join(f"{name} {os.path.getsize(os.path.join(log_dir, name)) / 1e6:.1f} MB"
                              for name in ("report.html", *results.tables.values()))
            print(f"amax_lightning: wrote the atlas ({sizes}) in "
                  f"{duration(time.monotonic() - self._merge_started)}", file=sys.stderr, flush=True)
        self.results_path, self.results = path, results
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                log_to_tensorboard(logger, results, summary, images, steps)
        print(summary, flush=True)


def log_snapshot(trainer: Trainer, snapshots: Snapshots, step: int) -> None:
    """A snapshot in TensorBoard: n_unique and the changed fraction (means over units), and for a sweep the
    histogram of n_unique over units."""
    n_unique, changed = snapshots.n_unique[-1].double(), snapshots.changed[-1]
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_metrics({"convergence/n_unique": float(n_unique.mean()),
                                "convergence/changed_fraction": float(changed.mean())}, step)
            if n_unique.numel() > 1:
                logger.experiment.add_histogram("convergence/n_unique_over_units", n_unique.float(), step)


SCALAR_METRICS = ("mean_position_agreement", "mean_pairwise_jaccard", "mean_pairwise_cosine", "mean_nearest_cosine",
                  "mean_decoded_gap", "mean_embedding_norm")


def log_to_tensorboard(logger: TensorBoardLogger, results, summary: str, images: dict, step: int) -> None:
    """The end-of-fit summary table as text, the reproducibility numbers as scalars, the report's plots."""
    logger.experiment.add_text("decoded_tokens", summary, step)
    if isinstance(results, AtlasResults):
        scalars = {"atlas/min_n_unique": results.n_unique["min"], "atlas/mean_n_unique": results.n_unique["mean"]}
        values = [k for k, units in enumerate(results.histogram) for _ in range(units)]  # n_unique of every unit
        logger.experiment.add_histogram("atlas/n_unique", torch.tensor(values, dtype=torch.float32), step,
                                        bins=torch.arange(len(results.histogram) + 1, dtype=torch.float32).numpy() - 0.5)
    else:
        scalars = {"uniqueness/n_unique": results.uniqueness.n_unique}
        if results.corpus is not None:
            scalars.update({"corpus/max": results.corpus.max, "corpus/density": results.corpus.density})
            ratio = results.corpus.comparison.optimized_over_corpus_max if results.corpus.comparison else None
            if ratio is not None:
                scalars["corpus/optimized_over_corpus_max"] = ratio
        scalars.update({f"reproducibility/{key}": getattr(results.reproducibility, key) for key in SCALAR_METRICS})
        if results.null_model is not None:
            scalars["uniqueness/null_expected_n_unique"] = results.null_model.expected_n_unique
            scalars["uniqueness/null_p_value"] = results.null_model.p_value
    logger.log_metrics(scalars, step)
    for name, pixels in images.items():  # (H, W, 3) uint8, as report.plots.save_png returns them
        logger.experiment.add_image(f"report/{name}", pixels, step, dataformats="HWC")
    logger.experiment.flush()
