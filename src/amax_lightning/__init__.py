"""amax_lightning: is activation maximization in a language model reproducible? Run the study, measure it.

The package is built in layers; each may import only the layers before it in this list (its ``__init__`` says
which; ``tests/unit/test_layering.py`` checks every import):

    base       user errors, one-line checks of user values, seed specs, atomic files
    model      the frozen model and what is read from it: backbone, targets, readout, SAEs, chunking, decoding
    optimize   the row objective (rows = units x seeds), parameterizations, priors, methods (Adam, GCG, EPO)
    analysis   end of fit as data: the results.json schema, metrics, null model, data baseline, logit effects
    report     presentation only: report.md, report.html, plots
    lightning  the Lightning glue: ActMaxModule, callbacks, the CLI, clusters, run folders
    commands   fit, study, sensitivity (``python -m amax_lightning``)

The Python API (README, "Python API") is importable from here: ``from amax_lightning import load_backbone``.
"""

from amax_lightning import _compat

__version__ = "0.1.0"

API = {  # name -> the module that defines it; imported on first use, so ``import amax_lightning`` stays light
    "load_backbone": "model.backbone", "Backbone": "model.backbone", "parse_target": "model.targets",
    "nearest_tokens": "model.decode", "load_sae": "model.sae",
    "build_objective": "optimize.objective", "RowObjective": "optimize.objective", "RowLayout": "optimize.objective",
    "TokenEmbedding": "optimize.param", "parse_priors": "optimize.priors",
    "analyze_unit": "analysis.results", "UnitResults": "analysis.results", "AtlasResults": "analysis.sweep",
    "unit_record": "analysis.tables",
    "expected_n_unique": "analysis.null_model", "sampled_null": "analysis.null_model",
    "ActMaxModule": "lightning.module", "ResultsWriter": "lightning.callbacks", "find_callback": "lightning.callbacks",
    "UserError": "base.errors",
}
__all__ = ["__version__", *API]
_compat.install()


def __getattr__(name: str):
    if name in API:
        import importlib

        value = getattr(importlib.import_module(f"amax_lightning.{API[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'amax_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
