"""End of fit: decode every optimized vector, count unique tokens, write results.json and the summary."""

from __future__ import annotations

import json
import os
import sys

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from amax_lightning.decode import nearest_tokens
from amax_lightning.metrics import UniqueTokens
from amax_lightning.report import summary_markdown, write_text_atomic


class ResultsWriter(Callback):
    """Decodes, measures and writes ``results.json`` + ``summary.md`` into the run's log folder (rank 0 writes).

    After ``fit``, ``results_path`` holds the path of ``results.json`` (None on ranks other than 0).
    """

    def __init__(self) -> None:
        self.results_path: str | None = None

    def on_train_end(self, trainer: Trainer, module: LightningModule) -> None:
        self._finish(trainer, module, partial=False)

    def on_exception(self, trainer: Trainer, module: LightningModule, exception: BaseException) -> None:
        """On Ctrl-C or SIGTERM: save ``last.ckpt`` and write results marked partial. Other errors write nothing."""
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)) or trainer.global_step == 0:
            return
        checkpoint = None
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            checkpoint = os.path.join(trainer.checkpoint_callback.dirpath, "last.ckpt")
            trainer.save_checkpoint(checkpoint, weights_only=False)
        self._finish(trainer, module, partial=True)
        if trainer.is_global_zero:
            resume = f"; resume with --ckpt_path last (saved {checkpoint})" if checkpoint else ""
            print(f"amax_lightning: interrupted at step {trainer.global_step}: partial results in "
                  f"{self.results_path}{resume}", file=sys.stderr, flush=True)

    @torch.no_grad()
    def _finish(self, trainer: Trainer, module: LightningModule, partial: bool) -> None:
        backbone = module.backbone
        embedding = module.local_embedding()
        activations = module.position_activations(embedding)
        token_ids, cosine = nearest_tokens(embedding, backbone.vocab_embeddings)
        decoded_activations = module.position_activations(backbone.embed_tokens(token_ids))
        unique = UniqueTokens().to(module.device)
        unique.update(token_ids)
        uniqueness = unique.compute()
        per_seed = {
            "token_ids": module.gather_seeds(token_ids),
            "cosine": module.gather_seeds(cosine),
            "position_activations": module.gather_seeds(activations),
            "decoded_activations": module.gather_seeds(decoded_activations),
            "embedding_norm": module.gather_seeds(embedding.norm(dim=-1)),
        }
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        results = build_results(module, trainer.global_step, per_seed, uniqueness, partial)
        self.results_path = os.path.join(log_dir, "results.json")
        summary = summary_markdown(results)
        write_text_atomic(os.path.join(log_dir, "summary.md"), summary + "\n")
        write_text_atomic(self.results_path, json.dumps(results, indent=2) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("decoded_tokens", summary, trainer.global_step)
                logger.log_metrics({"uniqueness/n_unique": uniqueness["n_unique"]}, trainer.global_step)
                logger.experiment.flush()
        print(summary, flush=True)


def build_results(module: LightningModule, steps: int, per_seed: dict, uniqueness: dict, partial: bool) -> dict:
    """The ``results.json`` document: protocol, one record per seed (sorted by seed), and token uniqueness."""
    backbone = module.backbone
    runs = []
    for i, seed in enumerate(module.seeds):
        ids = per_seed["token_ids"][i].tolist()
        positions = per_seed["position_activations"][i].tolist()
        decoded = per_seed["decoded_activations"][i].tolist()
        runs.append(
            {
                "seed": seed,
                "token_ids": ids,
                "tokens": backbone.token_strings(ids),
                "cosine": per_seed["cosine"][i].tolist(),
                "final_activation": sum(positions) / len(positions),
                "position_activations": positions,
                "decoded_activation": sum(decoded) / len(decoded),
                "decoded_position_activations": decoded,
                "embedding_norm": per_seed["embedding_norm"][i].tolist(),
            }
        )
    runs.sort(key=lambda run: run["seed"])
    return {
        "model": module.model_name_or_path,
        "target": module.target.spec,
        "n_tokens": module.n_tokens,
        "steps": steps,
        "partial": partial,
        "lr": module.lr,
        "l2": module.l2,
        "seeds": sorted(module.seeds),
        "init_scale": module.init_scale,
        "vocab_norm": module.vocab_norm,
        "runs": runs,
        "uniqueness": {**uniqueness, "tokens": backbone.token_strings(uniqueness["token_ids"])},
    }
