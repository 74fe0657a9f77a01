"""Yesterday's module names (before the layer packages): ``import amax_lightning.backbone`` and class paths such as
``amax_lightning.sensitivity.SensitivityRecorder`` in saved configs keep working, with a DeprecationWarning naming the
new home.

A moved module is the new module itself (same object: patching one patches the other). A module that was split
(``null_model``, ``search``, ``sensitivity``, ``report``, ``cli``, ``runs``) becomes a module that finds each name in
its new homes, in order.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {  # old module -> its new home(s), where each of its names now lives
    "analysis": ["analysis.results"], "backbone": ["model.backbone"], "baseline": ["analysis.baseline"],
    "callbacks": ["lightning.callbacks"], "checks": ["base.checks"], "chunking": ["model.chunking"],
    "cli": ["lightning.cli", "lightning.progress", "commands.fit"], "cluster": ["lightning.cluster"],
    "data": ["lightning.data"], "decode": ["model.decode"], "errors": ["base.errors"],
    "logit_effects": ["analysis.logit_effects"], "metrics": ["analysis.metrics"], "module": ["lightning.module"],
    "null_model": ["analysis.null_model", "analysis.null_pool"], "objective": ["optimize.objective"],
    "param": ["optimize.param"], "priors": ["optimize.priors"], "readout": ["model.readout"],
    "report": ["report.markdown", "report.plots"], "report_html": ["report.html"],
    "runs": ["lightning.runs", "base.files"], "sae": ["model.sae"],
    "search": ["optimize.search", "optimize.search_space", "optimize.pareto"], "seeds": ["base.seeds"],
    "sensitivity": ["analysis.sensitivity", "lightning.sensitivity_recorder", "report.sensitivity"],
    "sensitivity_study": ["commands.sensitivity"], "study": ["commands.study"], "targets": ["model.targets"],
    "methods": ["optimize.methods"], "methods.continuous": ["optimize.methods.continuous"],
    "methods.token_search": ["optimize.methods.token_search"],
}
RENAMED = {"_check_vocab": "check_vocab", "_check_scale": "check_scale", "_cached_ids": "cached_pool",
           "_remember_verdict": "remember_decode_verdict"}  # private names of split modules that became public


class _SplitModule(types.ModuleType):
    """An old module whose names now live in several modules: each attribute is looked up in ``homes``, in order."""

    def __init__(self, name: str, homes: list[types.ModuleType]) -> None:
        super().__init__(name)
        self._homes = homes

    def __getattr__(self, attribute: str):
        for home in self._homes:
            if hasattr(home, RENAMED.get(attribute, attribute)):
                return getattr(home, RENAMED.get(attribute, attribute))
        raise AttributeError(f"module {self.__name__!r} has no attribute {attribute!r}")

    def __dir__(self) -> list[str]:
        return sorted({name for home in self._homes for name in dir(home)})


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``amax_lightning.<old name>`` and loads it as its new home (see ``MOVED``)."""

    prefix = "amax_lightning."

    def find_spec(self, name, path=None, target=None):
        if name.startswith(self.prefix) and name[len(self.prefix):] in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        homes = [f"{self.prefix}{home}" for home in MOVED[spec.name[len(self.prefix):]]]
        warnings.warn(f"{spec.name} moved to {' and '.join(homes)}; import it from there", DeprecationWarning,
                      stacklevel=2)
        modules = [importlib.import_module(home) for home in homes]
        return modules[0] if len(modules) == 1 else _SplitModule(spec.name, modules)

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Put the finder of old names on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModules())  # before the path finder: old names under a moved package too
