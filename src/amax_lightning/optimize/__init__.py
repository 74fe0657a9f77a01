"""How rows (units x seeds) are optimized, without Lightning: the row objective (``objective``), what is learned
per row (``param``), priors (``priors``), token search (``search``, ``search_space``, ``pareto``) and the methods that
the module runs (``methods``).

A new method goes in ``methods/`` (and its name in ``methods.METHODS``); a new prior in ``priors``; a new
parameterization in ``param``.

May import: base, model.
"""
