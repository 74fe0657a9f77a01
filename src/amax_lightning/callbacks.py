"""End of fit: decode every optimized vector, count unique tokens, write results.json and the summary."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from amax_lightning.baseline import overlap, top_contexts, top_tokens
from amax_lightning.checks import check_int
from amax_lightning.decode import nearest_tokens
from amax_lightning.errors import UserError
from amax_lightning.metrics import EmbeddingSimilarity, TokenAgreement, UniqueTokens
from amax_lightning.null_model import NullModelResult, expected_n_unique, null_token_distribution, unique_count_p_value
from amax_lightning.priors import norm_range
from amax_lightning.report import close_figures, summary_markdown, write_atlas, write_report, write_text_atomic


class ResultsWriter(Callback):
    """At the end of fit: decode, measure, and write ``results.json`` and ``report.md`` into the run's folder.

    Rank 0 writes. After ``fit``, ``results_path`` holds the path of ``results.json`` (None on other ranks).

    Parameters
    ----------
    null_samples
        Random directions decoded to estimate the chance distribution of tokens (the null model); 0 = off.
    null_simulations
        Monte Carlo studies drawn from that distribution for the p-value of the observed n_unique.
    baseline_top_k
        Data-sampling baseline: the unit's activation for every vocabulary token as a one-token input, and
        the overlap of the gradient-ascent tokens with the top k of them; 0 = off (it costs V forwards).
    baseline_text
        Optional UTF-8 text file: the top ``baseline_contexts`` positions of highest activation in it.
    baseline_contexts
        How many text contexts to report.
    """

    def __init__(
        self,
        null_samples: int = 20_000,
        null_simulations: int = 10_000,
        baseline_top_k: int = 0,
        baseline_text: Optional[str] = None,
        baseline_contexts: int = 10,
    ) -> None:
        self.null_samples = check_int("results.null_samples", null_samples, low=0)
        self.null_simulations = check_int("results.null_simulations", null_simulations, low=1)
        self.baseline_top_k = check_int("results.baseline_top_k", baseline_top_k, low=0)
        self.baseline_contexts = check_int("results.baseline_contexts", baseline_contexts, low=1)
        if baseline_text is not None and not os.path.isfile(baseline_text):
            raise UserError(f"results.baseline_text {baseline_text!r} is not a file; give a UTF-8 text file")
        self.baseline_text = baseline_text
        self.results_path: str | None = None

    def on_fit_start(self, trainer: Trainer, module: LightningModule) -> None:
        """Defer Ctrl-C to the end of the current step, so the checkpoint it saves is a consistent state."""
        self._ctrl_c = False
        self._previous_sigint = None
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._note_ctrl_c)

    def _note_ctrl_c(self, signum, frame) -> None:
        self._ctrl_c = True
        signal.signal(signal.SIGINT, self._previous_sigint)  # a second Ctrl-C interrupts at once

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._ctrl_c:  # parameters, Adam state and global_step all belong to the same finished step here
            raise KeyboardInterrupt

    def teardown(self, trainer: Trainer, module: LightningModule, stage: str) -> None:
        if getattr(self, "_previous_sigint", None) is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

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
        activations = module.local_activations(module.model_input(embedding))
        token_ids, cosine = nearest_tokens(embedding, backbone.vocab_embeddings)
        decoded_activations = module.local_activations(backbone.embed_tokens(token_ids))
        per_row = {
            "token_ids": module.gather_rows(token_ids),
            "cosine": module.gather_rows(cosine),
            "position_activations": module.gather_rows(activations),
            "decoded_position_activations": module.gather_rows(decoded_activations),
            "embedding": module.gather_rows(embedding),
        }
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        n_seeds = len(module.seeds)
        units = [
            build_results(module, target, trainer.global_step, {k: v[u * n_seeds : (u + 1) * n_seeds] for k, v in per_row.items()}, partial)
            for u, target in enumerate(module.targets)
        ]
        self._add_null_model(module, units)
        os.makedirs(log_dir, exist_ok=True)
        self.results_path = os.path.join(log_dir, "results.json")
        steps, history = module.activation_history()
        if len(units) == 1:
            results = units[0]
            results.update(self._data_baseline(module, results))
            summary = summary_markdown(results)
            figures = write_report(log_dir, results, summary, steps, history, module.seeds)
        else:
            results = atlas_results(units)
            summary, figures = write_atlas(log_dir, results)
        write_text_atomic(self.results_path, json.dumps(results, indent=2) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                log_to_tensorboard(logger, results, summary, figures, trainer.global_step)
        close_figures(figures)
        print(summary, flush=True)

    def _add_null_model(self, module: LightningModule, units: list[dict]) -> None:
        """Add to each unit's results the chance expectation of n_unique and the p-value of its own count."""
        if not self.null_samples:
            return
        n_vectors = units[0]["uniqueness"]["n_total"]
        p = null_token_distribution(module.backbone.vocab_embeddings, self.null_samples, scale=module.init_scale, seed=0)
        expected = expected_n_unique(p, n_vectors)
        for results in units:
            observed = results["uniqueness"]["n_unique"]
            p_value, se, n_sim = unique_count_p_value(p, n_vectors, observed, self.null_simulations, seed=0)
            null = NullModelResult(n_vectors, self.null_samples, expected, observed, p_value, n_sim, se)
            results["null_model"] = dataclasses.asdict(null)

    def _data_baseline(self, module: LightningModule, results: dict) -> dict:
        """The data-sampling baseline for a one-unit run, as configured."""
        if not (self.baseline_top_k or self.baseline_text):
            return {}
        baseline = {}
        if self.baseline_top_k:
            top = top_tokens(module.backbone, module.target, k=self.baseline_top_k)
            gradient_ids = [i for run in results["runs"] for i in run["token_ids"]]
            baseline["top_tokens"] = dataclasses.asdict(top)
            baseline["overlap"] = dataclasses.asdict(overlap(gradient_ids, top.token_ids))
        if self.baseline_text:
            contexts = top_contexts(module.backbone, module.target, self.baseline_text, k=self.baseline_contexts)
            baseline["text"] = self.baseline_text
            baseline["top_contexts"] = [dataclasses.asdict(c) for c in contexts]
        return {"data_baseline": baseline}


def log_to_tensorboard(logger: TensorBoardLogger, results: dict, summary: str, figures: dict, step: int) -> None:
    """The end-of-fit summary table as text, the reproducibility numbers as scalars, the report's plots."""
    logger.experiment.add_text("decoded_tokens", summary, step)
    if "units" in results:  # a sweep: the atlas
        counts = [row["n_unique"] for row in results["atlas"]]
        logger.log_metrics({"atlas/min_n_unique": min(counts), "atlas/mean_n_unique": sum(counts) / len(counts)}, step)
        for name, figure in figures.items():
            logger.experiment.add_figure(f"report/{name}", figure, step)
        logger.experiment.flush()
        return
    repro = results["reproducibility"]
    scalars = {"uniqueness/n_unique": results["uniqueness"]["n_unique"]}
    scalars.update({f"reproducibility/{key}": repro[key] for key in SCALAR_METRICS})
    if "null_model" in results:
        scalars["uniqueness/null_expected_n_unique"] = results["null_model"]["expected_n_unique"]
        scalars["uniqueness/null_p_value"] = results["null_model"]["p_value"]
    logger.log_metrics(scalars, step)
    for name, figure in figures.items():
        logger.experiment.add_figure(f"report/{name}", figure, step)
    logger.experiment.flush()


SCALAR_METRICS = ("mean_position_agreement", "mean_pairwise_jaccard", "mean_pairwise_cosine", "mean_nearest_cosine",
                  "mean_decoded_gap", "mean_embedding_norm")


def build_results(module: LightningModule, target, steps: int, per_seed: dict, partial: bool) -> dict:
    """The ``results.json`` document of one unit: protocol, one record per seed (sorted by seed), uniqueness
    and reproducibility metrics. ``per_seed`` holds that unit's rows in the module's seed order.

    Activations are in the model's units; ``final_activation`` and ``decoded_activation`` are the objective
    (positions reduced by ``aggregate``) at the optimized input and at its decoded tokens.
    """
    backbone = module.backbone
    local = {"sync_on_compute": False}  # rows are already gathered; rank 0 alone computes
    metrics = {"uniqueness": UniqueTokens(**local), "agreement": TokenAgreement(**local),
               "similarity": EmbeddingSimilarity(**local)}
    metrics["uniqueness"].update(per_seed["token_ids"])
    metrics["agreement"].update(per_seed["token_ids"])
    metrics["similarity"].update(per_seed["embedding"])
    computed = {name: metric.compute() for name, metric in metrics.items()}
    norms = per_seed["embedding"].norm(dim=-1)
    runs = []
    for i, seed in enumerate(module.seeds):
        ids = per_seed["token_ids"][i].tolist()
        positions = per_seed["position_activations"][i]
        decoded = per_seed["decoded_position_activations"][i]
        final, decoded_value = (float(module.objective(a[None])[0]) for a in (positions, decoded))
        runs.append(
            {
                "seed": seed,
                "token_ids": ids,
                "tokens": backbone.token_strings(ids),
                "cosine": per_seed["cosine"][i].tolist(),
                "final_activation": final,
                "position_activations": positions.tolist(),
                "decoded_activation": decoded_value,
                "decoded_position_activations": decoded.tolist(),
                "decoded_gap": final - decoded_value,
                "embedding_norm": norms[i].tolist(),
            }
        )
    runs.sort(key=lambda run: run["seed"])
    low, high = norm_range(backbone)
    agreement, similarity = computed["agreement"], computed["similarity"]
    order = sorted(range(len(module.seeds)), key=lambda i: module.seeds[i])
    matrix = [[similarity["matrix"][i][j] for j in order] for i in order]
    return {
        "model": module.model_name_or_path,
        "target": target.spec,
        "aggregate": module.aggregate,
        "priors": [prior.describe() for prior in module.priors],
        "n_tokens": module.n_tokens,
        "steps": steps,
        "partial": partial,
        "lr": module.lr,
        "l2": module.l2,
        "seeds": sorted(module.seeds),
        "init_scale": module.init_scale,
        "vocab_norm": module.vocab_norm,
        "numerics": module.numerics(),
        "runs": runs,
        "uniqueness": {**computed["uniqueness"], "tokens": backbone.token_strings(computed["uniqueness"]["token_ids"])},
        "reproducibility": {
            **agreement,
            "mean_pairwise_cosine": similarity["mean_pairwise_cosine"],
            "embedding_cosine_matrix": matrix,
            "mean_nearest_cosine": sum(c for r in runs for c in r["cosine"]) / (len(runs) * module.n_tokens),
            "mean_decoded_gap": sum(r["decoded_gap"] for r in runs) / len(runs),
            "mean_embedding_norm": sum(n for r in runs for n in r["embedding_norm"]) / (len(runs) * module.n_tokens),
            "vocab_norm_range": [low, high],
        },
    }


def atlas_results(units: list[dict]) -> dict:
    """The ``results.json`` of a sweep: one study-format document per unit under ``units``, plus the atlas rows."""
    return {"targets": [u["target"] for u in units], "atlas": [atlas_row(u) for u in units], "units": units}


def atlas_row(unit: dict) -> dict:
    """One line of atlas.csv: a unit's n_unique over its seeds x positions, activations, decoded-token cosine."""
    finals = [run["final_activation"] for run in unit["runs"]]
    null = unit.get("null_model") or {}
    return {
        "target": unit["target"],
        "n_unique": unit["uniqueness"]["n_unique"],
        "n_total": unit["uniqueness"]["n_total"],
        "mean_final_activation": sum(finals) / len(finals),
        "min_final_activation": min(finals),
        "mean_nearest_cosine": unit["reproducibility"]["mean_nearest_cosine"],
        "null_p_value": null.get("p_value"),
    }
