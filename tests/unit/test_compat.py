"""Yesterday's imports keep working: every module name and every public name of the flat package (before the layer
packages) still imports, with a DeprecationWarning naming the new home, as the very object the new home holds."""

from __future__ import annotations

import importlib
import json
import sys
import warnings
from pathlib import Path

import pytest

import amax_lightning
from amax_lightning import _compat

BEFORE = json.loads((Path(__file__).parents[1] / "fixtures" / "names_before_layers.json").read_text())["modules"]


def fresh_import(name: str, monkeypatch):
    """Import ``name`` as a script would, anew: old names are dropped from ``sys.modules`` first."""
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    return module, [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]


def test_every_old_module_has_a_new_home():
    assert {name.removeprefix("amax_lightning.") for name in BEFORE} == {*_compat.MOVED, *_compat.NOW_PACKAGES}


@pytest.mark.parametrize("old", sorted(f"amax_lightning.{name}" for name in _compat.MOVED))
def test_old_module_names_import_with_a_warning_naming_the_new_home(old, monkeypatch):
    module, messages = fresh_import(old, monkeypatch)
    homes = [f"amax_lightning.{home}" for home in _compat.MOVED[old.removeprefix("amax_lightning.")]]
    assert any(m.startswith(f"{old} moved to {homes[0]}") for m in messages), messages
    for name in BEFORE[old]:
        value = getattr(module, name)
        assert any(getattr(importlib.import_module(home), name, None) is value for home in homes), (old, name)
    if len(homes) == 1:
        assert module is importlib.import_module(homes[0])  # one object: patching the old name patches the new


@pytest.mark.parametrize("package", sorted(_compat.NOW_PACKAGES))
def test_old_modules_that_are_now_packages_give_their_names_with_a_warning(package):
    old = f"amax_lightning.{package}"
    homes = [importlib.import_module(f"amax_lightning.{home}") for home in _compat.NOW_PACKAGES[package]]
    for name in BEFORE[old]:
        with pytest.warns(DeprecationWarning, match=f"{old}.{name} moved to amax_lightning.{package}."):
            value = getattr(importlib.import_module(old), name)
        assert any(getattr(home, name, None) is value for home in homes), name
    exec(f"from {old} import {', '.join(BEFORE[old])}", {})  # as a script wrote it


def test_from_import_and_class_paths_of_split_modules(monkeypatch):
    fresh_import("amax_lightning.sensitivity", monkeypatch)
    from amax_lightning.sensitivity import SensitivityRecorder, verdict  # the class path saved configs name

    from amax_lightning.analysis.sensitivity import verdict as new_verdict
    from amax_lightning.lightning.sensitivity_recorder import SensitivityRecorder as NewRecorder

    assert (SensitivityRecorder, verdict) == (NewRecorder, new_verdict)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        _ = importlib.import_module("amax_lightning.sensitivity").no_such_name


def test_the_python_api_is_importable_from_the_top():
    for name in amax_lightning.API:
        assert getattr(amax_lightning, name) is getattr(importlib.import_module(f"amax_lightning.{amax_lightning.API[name]}"), name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = amax_lightning.nope
