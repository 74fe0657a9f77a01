"""Yesterday's module names (before the layer packages): ``import amax_lightning.backbone`` and class paths such as
``amax_lightning.sensitivity.SensitivityRecorder`` in saved configs keep working, with a DeprecationWarning naming the
new home.

A moved module is the new module itself (same object: patching one patches the other). A module that was split
(``null_model``, ``search``, ``sensitivity``, ``report``, ``cli``, ``runs``) becomes a module that finds each name in
its new homes, in order. The two old modules whose names are now packages (``analysis``, ``report``) give their old
names from the package (``old_names``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {  # old module -> its new home(s), where each of its names now lives
    "backbone": ["model.backbone"], "baseline": ["analysis.baseline"],
    "callbacks": ["lightning.callbacks"], "checks": ["base.checks"], "chunking": ["model.chunking"],
    "cli": ["lightning.cli", "lightning.progress", "commands.fit"], "cluster": ["lightning.cluster"],
    "data": ["lightning.data"], "decode": ["model.decode"], "errors": ["base.errors"],
    "logit_effects": ["analysis.logit_effects"], "metrics": ["analysis.metrics"], "module": ["lightning.module"],
    "null_model": ["analysis.null_model", "analysis.null_pool"], "objective": ["optimize.objective"],
    "param": ["optimize.param"], "priors": ["optimize.priors"], "readout": ["model.readout"],
    "report_html": ["report.html"],
    "runs": ["lightning.runs", "base.files"], "sae": ["model.sae"],
    "search": ["optimize.search", "optimize.search_space", "optimize.pareto"], "seeds": ["base.seeds"],
    "sensitivity": ["analysis.sensitivity", "lightning.sensitivity_recorder", "report.sensitivity"],
    "sensitivity_study": ["commands.sensitivity"], "study": ["commands.study"], "targets": ["model.targets"],
    "methods": ["optimize.methods"], "methods.continuous": ["optimize.methods.continuous"],
    "methods.token_search": ["optimize.methods.token_search"],
}
NOW_PACKAGES = {"analysis": ["analysis.results", "analysis.sweep"], "report": ["report.markdown", "report.plots"]}


def _find(homes: list[str], name: str, where: str) -> tuple[str, object]:
    """The first of the modules ``homes`` that has ``name``, and its value; AttributeError naming ``where`` if none."""
    for home in homes:
        module = importlib.import_module(f"amax_lightning.{home}")
        if hasattr(module, name):
            return home, getattr(module, name)
    raise AttributeError(f"module {where!r} has no attribute {name!r}")


def old_names(package: str):
    """The ``__getattr__`` of a package that took an old module's name: that module's names, with a warning."""
    homes = NOW_PACKAGES[package]

    def __getattr__(name: str):
        home, value = _find(homes, name, f"amax_lightning.{package}")
        warnings.warn(f"amax_lightning.{package}.{name} moved to amax_lightning.{home}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return value

    return __getattr__


class _SplitModule(types.ModuleType):
    """An old module whose names now live in several modules: each attribute is looked up in ``homes``, in order."""

    def __init__(self, name: str, homes: list[str]) -> None:
        super().__init__(name)
        self._homes = homes

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _find(self._homes, attribute, self.__name__)[1]

    def __dir__(self) -> list[str]:
        return sorted({n for home in self._homes for n in dir(importlib.import_module(f"amax_lightning.{home}"))})


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``amax_lightning.<old name>`` and loads it as its new home (see ``MOVED``)."""

    prefix = "amax_lightning."

    def find_spec(self, name, path=None, target=None):
        if name.startswith(self.prefix) and name[len(self.prefix):] in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        homes = MOVED[spec.name[len(self.prefix):]]
        warnings.warn(f"{spec.name} moved to {' and '.join(self.prefix + h for h in homes)}; import it from there",
                      DeprecationWarning, stacklevel=2)
        if len(homes) == 1:
            return importlib.import_module(self.prefix + homes[0])
        for home in homes:
            importlib.import_module(self.prefix + home)
        return _SplitModule(spec.name, homes)

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Put the finder of old names on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModules())  # before the path finder: old names under a moved package too
