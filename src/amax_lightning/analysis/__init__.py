"""End of fit as data: tensors -> frozen dataclasses -> results.json (``results``: the schema, ``analyze_unit``),
reproducibility metrics (``metrics``), the chance model (``null_model``, ``null_pool``), the data baseline
(``baseline``), logit effects (``logit_effects``) and the sensitivity study's numbers (``sensitivity``). Nothing here
writes a page or needs a Trainer.

A new analysis goes here as a function of tensors, with its dataclass field in ``results``.

May import: base, model, optimize.
"""

from amax_lightning._compat import old_names

__getattr__ = old_names("analysis")  # the names of yesterday's module amax_lightning.analysis
