"""How rows are optimized: ``continuous`` (Adam on the input embeddings, the study's protocol) or token search over
real tokens (``gcg`` / ``epo``, ``optimize/search.py``). Each method gives the module its initial parameter, its optimizer,
its step over this process's rows, and a probe for sizing chunks; ``lightning/module.py`` is the Lightning glue around them.
"""

from amax_lightning.optimize.methods.continuous import ContinuousMethod
from amax_lightning.optimize.methods.token_search import TokenSearchMethod

METHODS = ("continuous", "gcg", "epo")

__all__ = ["METHODS", "ContinuousMethod", "TokenSearchMethod"]
