"""The tree shows the architecture: every import inside amax_lightning goes down the layers.

The layers and their order are the list in ``amax_lightning/__init__.py``'s docstring; each package's ``__init__``
docstring says which other packages it may import (``May import: ...``). Read from the source (AST), every import
of every module, including those inside functions, is checked against both.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "amax_lightning"
ENTRY_POINTS = {"__init__.py", "__main__.py", "_compat.py"}  # the top level: the entry points and old names


def layers(root: Path) -> list[str]:
    """The layer packages in order, lowest first, as the package docstring lists them."""
    doc = ast.get_docstring(ast.parse((root / "__init__.py").read_text()))
    return re.findall(r"^    ([a-z_]+) {2,}\S", doc, flags=re.M)


def allowed(root: Path, package: str) -> set[str]:
    """The packages ``package`` may import, from its ``__init__`` docstring's ``May import:`` line."""
    doc = ast.get_docstring(ast.parse((root / package / "__init__.py").read_text())) or ""
    found = re.search(r"^May import: (.*?)\.?$", doc, flags=re.M)
    if found is None:
        raise AssertionError(f"{package}/__init__.py: its docstring has no 'May import: ...' line")
    text = found.group(1).strip()
    return set() if text.startswith("nothing") else {name.strip() for name in text.split(",")}


def imported_modules(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The amax_lightning modules an import statement names (``from amax_lightning import x`` names ``x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "amax_lightning"]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
        parts = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join([*parts, *([node.module] if node.module else [])])
    if base.split(".")[0] != "amax_lightning":
        return []
    if base == "amax_lightning":
        return [f"amax_lightning.{alias.name}" for alias in node.names]
    return [base]


def violations(root: Path) -> list[str]:
    """One line per import that goes up or sideways, naming the file and line."""
    order = layers(root)
    rank = {name: i for i, name in enumerate(order)}
    found = []
    packages = sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file())
    for package in packages:
        if package not in rank:
            found.append(f"{package}/: a package that the layer list in __init__.py does not name")
    for package in order:
        for other in sorted(allowed(root, package)):
            if other not in rank or rank[other] >= rank[package]:
                found.append(f"{package}/__init__.py: may import {other!r}, which is not a layer below {package}")
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if len(relative.parts) == 1:
            if path.name not in ENTRY_POINTS:
                found.append(f"{relative}: a module outside the layer packages")
            continue
        own = relative.parts[0]
        module = ".".join(["amax_lightning", *relative.with_suffix("").parts])
        is_package = path.name == "__init__.py"
        module = module.removesuffix(".__init__")
        may = allowed(root, own) if own in rank else set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for name in imported_modules(node, module, is_package):
                parts = name.split(".")
                target = parts[1] if len(parts) > 1 else "amax_lightning"
                if target == own or (name == "amax_lightning._compat" and is_package):  # yesterday's names
                    continue
                if target not in rank:
                    found.append(f"{relative}:{node.lineno}: imports {name}, which is in no layer package")
                elif target not in may:
                    where = "above" if rank[target] > rank.get(own, -1) else "beside"
                    found.append(f"{relative}:{node.lineno}: imports {name} ({target}, a layer {where} {own}); "
                                 f"{own} may import only: {', '.join(sorted(may)) or 'nothing'}")
    return found


def test_every_import_goes_down_the_layers():
    assert layers(PACKAGE) == ["base", "model", "optimize", "analysis", "report", "lightning", "commands"]
    assert violations(PACKAGE) == []


@pytest.mark.parametrize("file, line, message", [
    ("model/backbone.py", "from amax_lightning.report.html import visible", "model/backbone.py:{n}: imports "
     "amax_lightning.report.html (report, a layer above model); model may import only: base"),
    ("report/plots.py", "    from amax_lightning.lightning import cli", "report/plots.py:{n}: imports "
     "amax_lightning.lightning (lightning, a layer above report)"),
    ("analysis/metrics.py", "import amax_lightning.backbone", "analysis/metrics.py:{n}: imports "
     "amax_lightning.backbone, which is in no layer package"),
    ("report/markdown.py", "from ..optimize import objective", "report/markdown.py:{n}: imports "
     "amax_lightning.optimize (optimize, a layer beside report); report may import only: analysis, base"),
])
def test_a_planted_upward_import_fails_with_file_and_line(tmp_path, file, line, message):
    root = tmp_path / "amax_lightning"
    shutil.copytree(PACKAGE, root)
    target = root / file
    text = target.read_text()
    if line.startswith(" "):  # inside a function: append one
        text += f"\n\ndef planted():\n{line}\n"
    else:
        text += f"\n{line}\n"
    target.write_text(text)
    n = text.rstrip("\n").count("\n") + 1
    assert any(v.startswith(message.format(n=n)) for v in violations(root)), violations(root)


def test_a_package_may_not_allow_a_layer_above_it(tmp_path):
    root = tmp_path / "amax_lightning"
    shutil.copytree(PACKAGE, root)
    init = root / "model" / "__init__.py"
    init.write_text(init.read_text().replace("May import: base.", "May import: base, report."))
    assert "model/__init__.py: may import 'report', which is not a layer below model" in violations(root)
