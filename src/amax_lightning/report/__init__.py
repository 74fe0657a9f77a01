"""Presentation only, from typed results: report.md and the atlas (``markdown``), report.html (``html`` and
``templates/``), the PNG plots (``plots``) and the sensitivity study's files (``sensitivity``). Nothing here computes a
number the results do not hold.

A new page section goes in ``templates/`` (its markup) and ``html`` (the values it shows).

May import: base, analysis.
"""

from amax_lightning._compat import old_names

__getattr__ = old_names("report")  # the names of yesterday's module amax_lightning.report
