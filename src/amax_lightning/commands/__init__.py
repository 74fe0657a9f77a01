"""The commands of ``python -m amax_lightning``: ``fit`` (one run or a sweep), ``study`` (targets x variants) and
``sensitivity`` (the perturbation study). Each reads its config, runs fits, and writes its tables.

May import: base, model, optimize, analysis, report, lightning.
"""
