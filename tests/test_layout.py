"""The package's layering, read from the source: common/ imports neither stage, harvest/ and train/ do
not import each other (every import statement, at module level or inside a function), and every
folder of the three stages is listed as a package in pyproject.toml."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> installed package name (pyproject.toml's package-dir)
FOLDERS = {"actcache": "actcache", "common": "actcache.common", "harvest": "actcache.harvest",
           "train": "actcache.train"}
STAGES = ("common", "harvest", "train")


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package __init__) for every .py file of the package."""
    out = {}
    for folder, pkg in FOLDERS.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            parts = f.relative_to(ROOT / folder).with_suffix("").parts
            is_pkg = parts[-1] == "__init__"
            name = ".".join((pkg,) + (parts[:-1] if is_pkg else parts))
            out[name] = (f, is_pkg)
    return out


def imported(name: str, file: Path, is_pkg: bool) -> set[str]:
    """The absolute names of the actcache modules (or names) a file imports."""
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from .. import harvest` names the stage
    return {m for m in found if m == "actcache" or m.startswith("actcache.")}


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {name: imported(name, f, is_pkg) for name, (f, is_pkg) in _modules().items()}


def test_the_import_resolver_reads_relative_imports():
    """The resolver itself, on the files whose imports are known: without this a silent resolver would
    make the layering test pass."""
    g = {name: imported(name, f, p) for name, (f, p) in _modules().items()}
    assert "actcache.common.store" in g["actcache.train.loader"]
    assert "actcache.common.errors" in g["actcache.harvest.api"]
    assert {_stage(m) for m in g["actcache.evaluate"]} >= {"common", "harvest", "train"}
    assert "actcache.common.store" in imported("actcache.common.x", ROOT / "common" / "info.py", False)


def test_common_imports_neither_stage_and_the_stages_not_each_other(graph):
    allowed = {"common": {"common"}, "harvest": {"common", "harvest"}, "train": {"common", "train"}}
    bad = []
    for name, deps in graph.items():
        stage = _stage(name)
        if stage is None:  # the top package (the CLI, evaluate, demo) joins the stages
            continue
        for d in deps:
            to = _stage(d)
            if to is not None and to not in allowed[stage]:
                bad.append(f"{name} imports {d}")
    assert not bad, "\n".join(bad)


def test_every_subpackage_is_installed():
    """pyproject lists packages by hand (the folders map onto actcache.*): a new folder, of code or of
    package data (the browser's assets), must be listed."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"actcache"}
    for stage in STAGES:
        for folder in [ROOT / stage, *(ROOT / stage).rglob("*")]:
            if folder.is_dir() and folder.name != "__pycache__" and any(folder.iterdir()):
                found.add(".".join(("actcache",) + folder.relative_to(ROOT).parts))
    assert found == listed


def test_only_the_output_home_spells_an_output_file_name():
    """The file names of the folders actcache writes live in common/outputs.py; any other module that
    spells one as a string literal is a second source that can drift from it."""
    import ast
    from pathlib import Path

    from actcache.common import outputs

    names = {outputs.CFG_FILENAME, outputs.WEIGHTS_FILENAME, outputs.SPARSITY_FILENAME, outputs.METRICS_FILE,
             outputs.EVAL_FILE, outputs.RUN_FILE, outputs.CHECKPOINT, outputs.CE_FRONTIER_PLOT, outputs.FEATURES_FILE,
             outputs.FEATURES_INDEX, outputs.FEATURES_VOCAB, *outputs.SUMMARY_FILES}
    root = Path(outputs.__file__).resolve().parents[1]
    found = []
    for pkg in ("common", "harvest", "train", "actcache"):
        for f in sorted((root / pkg).rglob("*.py")):
            if f.name == "outputs.py" and f.parent.name == "common":
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Constant) and node.value in names:
                    found.append(f"{f.relative_to(root)}:{node.lineno} {node.value}")
    assert not found, found
