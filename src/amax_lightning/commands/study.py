"""``python -m amax_lightning study --config configs/priors_study.yaml``: the study across targets x variants.

The study file names a fit config, the targets, and the variants (each a mapping of option -> value, e.g.
``{model.priors: clamp}``); every target x variant runs as one ``fit`` in this process, and the study ends
with a table (target, variant, n_unique, chance expectation and p-value, mean decoded-activation gap, and the
mean objective of real tokens: the decoded tokens of continuous runs, the searched tokens of token search)
written to ``study.md`` / ``study.csv`` in a new ``studies/version_N`` folder. A target that sweeps units
gives one row per unit. Extra command-line arguments
are passed to every fit, e.g. ``--trainer.max_steps 100 --model.model_name_or_path ./my-gpt2``.
"""

from __future__ import annotations

import csv
import io
import os

import yaml

from amax_lightning.analysis.results import UnitResults
from amax_lightning.analysis.sweep import AtlasResults
from amax_lightning.analysis.tables import read_units
from amax_lightning.base.errors import UserError, first_line
from amax_lightning.base.files import write_text_atomic
from amax_lightning.lightning.callbacks import ResultsWriter, find_callback
from amax_lightning.lightning.cli import AmaxCLI, OneLineErrorParser, run_trainer
from amax_lightning.lightning.module import ActMaxModule
from amax_lightning.lightning.runs import claim_version_folder
from amax_lightning.model.backbone import load_backbone
from amax_lightning.report.markdown import markdown_cell

COLUMNS = ("target", "variant", "n_unique", "n_total", "null_expected_n_unique", "null_p_value", "mean_decoded_gap",
           "mean_token_activation", "stable_since", "changed_fraction_last", "results")


def read_config(path: str, kind: str, keys: tuple[str, ...], shape: str) -> dict:
    """Read a ``kind`` config (``study``, ``sensitivity``): a YAML mapping of ``keys`` with a non-empty ``targets``
    list; its ``fit_config`` resolved relative to the file (None when absent). UserErrors name what is wrong."""
    if not os.path.isfile(path):
        raise UserError(f"{kind} config {path!r} is not a file")
    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{kind} config {path!r} is not valid YAML: {first_line(exc)}") from exc
    if not isinstance(config, dict):
        raise UserError(f"{kind} config {path!r} must be a mapping with {shape}")
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise UserError(f"{kind} config {path!r} has unknown keys {unknown}; allowed: {', '.join(keys)}")
    targets = config.get("targets")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise UserError(f"{kind} config {path!r}: targets must be a non-empty list of target specs")
    fit_config = config.get("fit_config")
    if fit_config is not None:
        if not isinstance(fit_config, str):
            raise UserError(f"{kind} config {path!r}: fit_config must be a path, e.g. reproduce.yaml")
        config["fit_config"] = os.path.join(os.path.dirname(os.path.abspath(path)), fit_config)
        if not os.path.isfile(config["fit_config"]):
            raise UserError(f"{kind} config {path!r}: fit_config {fit_config!r} is not a file")
    return {**config, "fit_config": config.get("fit_config")}


def load_study(path: str) -> dict:
    """Read and check a study file: ``fit_config`` (optional), ``targets`` (list), ``variants`` (list of mappings)."""
    study = read_config(path, "study", ("fit_config", "targets", "variants"), "targets and variants")
    variants = study.get("variants", [{}])
    if not isinstance(variants, list) or not variants or not all(isinstance(v, dict) for v in variants):
        raise UserError(f"study config {path!r}: variants must be a non-empty list of mappings, e.g. [{{}}, {{model.priors: clamp}}]")
    return {"fit_config": study["fit_config"], "targets": study["targets"], "variants": variants}


def variant_label(variant: dict) -> str:
    """A short name for a variant: ``none`` for ``{}``, else ``key=value`` joined by spaces."""
    return " ".join(f"{key.split('.')[-1]}={value}" for key, value in variant.items()) or "none"


def run_study(args: list[str]) -> str | None:
    """Run every target x variant of the study file given by ``--config``; return the path of ``study.md`` (None on
    processes other than rank 0 under DDP, which run the fits and write nothing).

    Every fit's options are checked first (``check_fit``), so a bad target or variant stops the study before its
    first fit. A study stopped later (an error, Ctrl-C) still writes the table of the fits it finished."""
    if len(args) < 2 or args[0] != "--config":
        raise UserError("study needs --config <study.yaml> first, e.g. study --config configs/priors_study.yaml")
    study, extra = load_study(args[1]), args[2:]
    if any(arg.split("=")[0] == "--model.target" for arg in extra):
        raise UserError("--model.target cannot be passed to study; list the targets in the study file")
    fits = []
    for target in study["targets"]:
        for variant in study["variants"]:
            fit_args = (["--config", study["fit_config"]] if study["fit_config"] else []) + ["--model.target", target]
            fit_args += [f"--{key}={value}" for key, value in variant.items()]
            fits.append((target, variant, [*fit_args, *extra]))
    backbones: dict = {}
    for target, variant, fit_args in fits:
        check_fit(fit_args, backbones, f"{target} with {variant_label(variant)}")
    backbones.clear()
    rows, rank_zero = [], True
    try:
        for target, variant, fit_args in fits:
            trainer = run_trainer(["fit", *fit_args])
            rank_zero = trainer is None or trainer.is_global_zero
            if not rank_zero:  # under DDP every process runs every fit; rank 0 collects and writes
                continue
            writer = find_callback(trainer, ResultsWriter) if trainer is not None else None
            if writer is None or writer.results is None:
                raise UserError(f"the fit for {target} with {variant_label(variant)} wrote no results")
            if isinstance(writer.results, AtlasResults):
                rows += sweep_study_rows(variant_label(variant), writer.results_path)
            else:
                rows.append(study_row(variant_label(variant), writer.results, writer.results_path))
    except BaseException:
        if rows and rank_zero:
            write_study(rows, complete=False)
        raise
    return write_study(rows) if rank_zero else None


class _CheckOnly(AmaxCLI):
    """Parses a fit's arguments and builds its module and results writer on a shared model; fits nothing."""

    def __init__(self, backbones: dict, *args, **kwargs) -> None:
        self.backbones = backbones  # (model_name_or_path, trust_remote_code) -> Backbone, shared by the checks
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        options = self.config.model.as_dict()
        key = (options["model_name_or_path"], options["trust_remote_code"])
        if key not in self.backbones:
            self.backbones[key] = load_backbone(*key)
        ActMaxModule(**{**options, "backbone": self.backbones[key]})
        ResultsWriter(**self.config.results.as_dict())


def check_fit(fit_args: list[str], backbones: dict, what: str) -> None:
    """Check a fit's arguments (without ``fit``) as the fit would: parse them and build its module and results
    writer, loading each model once into ``backbones``. Raises a UserError naming the fit, ``what``."""
    try:
        _CheckOnly(backbones, ActMaxModule, parser_class=OneLineErrorParser, run=False, seed_everything_default=False,
                   auto_configure_optimizers=False, args=fit_args)
    except UserError as exc:
        raise UserError(f"study fit {what}: {exc}") from exc


def study_row(variant: str, results: UnitResults, results_path: str) -> dict:
    """One table row from a fit's results."""
    null = results.null_model
    return {
        "target": results.target,
        "variant": variant,
        "n_unique": results.uniqueness.n_unique,
        "n_total": results.uniqueness.n_total,
        "null_expected_n_unique": null.expected_n_unique if null else None,
        "null_p_value": null.p_value if null else None,
        "mean_decoded_gap": results.reproducibility.mean_decoded_gap,
        # the objective real tokens reach: the searched tokens (token search) or the decoded ones (continuous)
        "mean_token_activation": sum(run.decoded_activation for run in results.runs) / len(results.runs),
        "stable_since": results.convergence.stable_since if results.convergence else None,
        "changed_fraction_last": (results.convergence.snapshots[-1].changed_fraction
                                  if results.convergence and results.convergence.snapshots else None),
        "results": results_path,
    }


def sweep_study_rows(variant: str, results_path: str) -> list[dict]:
    """The table rows of a sweep's units, read from its units table (``analysis/tables.py``)."""
    columns = ["target", "n_unique", "n_total", "null_expected_n_unique", "null_p_value", "mean_decoded_gap",
               "mean_decoded_activation", "stable_since", "changed_fraction_last"]
    units = read_units(os.path.dirname(results_path), columns=columns).to_pylist()
    return [{"target": u["target"], "variant": variant, "n_unique": u["n_unique"], "n_total": u["n_total"],
             "null_expected_n_unique": u["null_expected_n_unique"], "null_p_value": u["null_p_value"],
             "mean_decoded_gap": u["mean_decoded_gap"], "mean_token_activation": u["mean_decoded_activation"],
             "stable_since": u["stable_since"], "changed_fraction_last": u["changed_fraction_last"],
             "results": results_path} for u in units]


def write_study(rows: list[dict], root: str = "studies", complete: bool = True) -> str:
    """Write study.md, study.csv and report.html into a new ``<root>/version_N``; print the table and the path last.
    ``complete`` False marks a study that stopped early (the rows are the fits it finished)."""
    from amax_lightning.report.html import write_study_page

    folder = os.path.join(root, f"version_{claim_version_folder(root)}")
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else markdown_cell(str(v)))  # noqa: E731
    table = ["| " + " | ".join(COLUMNS[:-1]) + " |", "|" + "---|" * (len(COLUMNS) - 1)]
    table += ["| " + " | ".join(fmt(row[c]) for c in COLUMNS[:-1]) + " |" for row in rows]
    if not complete:
        table.append(f"\nstopped early: these are the {len(rows)} rows of the fits it finished")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(os.path.join(folder, "study.csv"), buffer.getvalue())
    path = os.path.join(folder, "study.md")
    write_text_atomic(path, "# Reproducibility across targets and priors\n\n" + "\n".join(table) + "\n")
    write_study_page(folder, rows, COLUMNS, complete)
    print("\n".join(table), flush=True)
    print(path, flush=True)
    return path
