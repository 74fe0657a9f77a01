"""The sensitivity study's recorder: a callback that records replica distances every step and decoded tokens at
snapshots, rides in checkpoints, and at the end summarizes (``analysis.sensitivity``) and writes the pages."""

from __future__ import annotations

import math

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from amax_lightning.analysis.sensitivity import reference_size, relative_distances, snapshot_metrics, summarize
from amax_lightning.base.errors import UserError
from amax_lightning.model.decode import nearest_tokens
from amax_lightning.report.sensitivity import write_summary


class SensitivityRecorder(Callback):
    """Records a perturbed run (``--model.perturb_sizes``): every step each size's mean relative distance between a
    seed's replicas, and at ``snapshots`` (and the last step) every row's decoded tokens and the metrics of
    ``snapshot_metrics``. At the end of the fit, rank 0 writes ``sensitivity.json`` and ``sensitivity.md`` of this
    run into its log folder (``summary`` holds the same dict). Its records ride in checkpoints, so a resumed run
    reports its whole history.
    """

    def __init__(self, snapshots: list[int] | None = None) -> None:
        self.snapshots = sorted({int(s) for s in snapshots}) if snapshots else []
        if any(s < 1 for s in self.snapshots):
            raise UserError(f"snapshots {snapshots} must be steps >= 1")
        self.steps: list[int] = []
        self.distances: list[list[float]] = []  # per recorded step, per size
        self.snapshot_records: list[dict] = []
        self.previous_tokens: torch.Tensor | None = None
        self.summary: dict | None = None
        self.summary_path: str | None = None

    def state_dict(self) -> dict:
        return {"steps": self.steps, "distances": self.distances, "snapshot_records": self.snapshot_records,
                "previous_tokens": self.previous_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.distances = list(state["steps"]), [list(d) for d in state["distances"]]
        self.snapshot_records, self.previous_tokens = list(state["snapshot_records"]), state["previous_tokens"]

    def on_train_start(self, trainer: Trainer, module: LightningModule) -> None:
        if trainer.global_step == 0 and not self.steps and trainer.is_global_zero:
            self._record_distances(module, 0)

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        self._record_distances(module, step)
        if step in self.snapshots or step == trainer.max_steps:
            self._record_snapshot(module, step)

    def on_train_end(self, trainer: Trainer, module: LightningModule) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        module.flush_finite_check()  # a deferred finiteness check: a bad run writes nothing
        if not trainer.is_global_zero:
            return
        self.summary = summarize(module, self)
        self.summary_path = write_summary(log_dir, {"targets": [self.summary]})
        print(self.summary_path, flush=True)

    # per step: (seeds, sizes, replicas, ...) views of the run's rows -----------------------------------
    @staticmethod
    def grouped(module: LightningModule, rows: torch.Tensor) -> torch.Tensor:
        """Rows (seeds x sizes x replicas, ...) as (seeds, sizes, replicas, ...)."""
        sizes = len(module.hparams.perturb_sizes)
        return rows.view(len(module.seeds), sizes, module.hparams.replicas, *rows.shape[1:])

    def _record_distances(self, module: LightningModule, step: int) -> None:
        with torch.no_grad():  # replicas >= 2 (the module checks): one host sync per step for all sizes
            grouped = self.grouped(module, module.parameter.detach())
            per_size = torch.stack([relative_distances(grouped[:, k]).mean() for k in range(grouped.shape[1])])
        self.steps.append(step)
        self.distances.append(per_size.tolist())

    @torch.no_grad()
    def _record_snapshot(self, module: LightningModule, step: int) -> None:
        if any(record["step"] == step for record in self.snapshot_records):
            return
        embedding = module.objective.embeddings(module.parameter.detach())
        tokens, cosine = nearest_tokens(embedding, module.backbone.vocab_embeddings)
        objective = module.history[-1] if module.history else torch.full((module.n_rows,), math.nan)
        record = snapshot_metrics(step, self.grouped(module, tokens.cpu()), self.grouped(module, embedding.cpu()),
                                  self.grouped(module, cosine.cpu()), self.grouped(module, objective.cpu()),
                                  module.hparams.perturb_sizes, self.previous_tokens)
        self.previous_tokens = self.grouped(module, tokens.cpu())[:, reference_size(module.hparams.perturb_sizes), 0]
        self.snapshot_records.append(record)


