"""The package's layering and its one installed name, checked in fresh interpreters."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from harvest_fixtures import env

IMPORT_ALL = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    stage = sys.argv[1]
    pkg = importlib.import_module("actcache." + stage)
    for m in pkgutil.walk_packages(pkg.__path__, "actcache." + stage + "."):
        importlib.import_module(m.name)
    print(json.dumps(sorted({k.split(".")[1] for k in sys.modules if k.startswith("actcache.")})))
""")


def _stages_imported(stage: str, cwd) -> set[str]:
    p = subprocess.run([sys.executable, "-c", IMPORT_ALL, stage], capture_output=True, text=True, env=env(), cwd=cwd,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return set(json.loads(p.stdout.strip().splitlines()[-1]))


def test_common_imports_neither_stage_and_the_stages_not_each_other(tmp_path):
    assert _stages_imported("common", tmp_path) == {"common"}
    assert _stages_imported("train", tmp_path) == {"common", "train"}
    assert _stages_imported("harvest", tmp_path) == {"common", "harvest"}


def test_a_users_own_train_py_or_common_py_does_not_shadow_the_package(tmp_path):
    (tmp_path / "train.py").write_text("raise SystemExit('the user module was imported')\n")
    (tmp_path / "common.py").write_text("raise SystemExit('the user module was imported')\n")
    (tmp_path / "harvest.py").write_text("raise SystemExit('the user module was imported')\n")
    code = ("from actcache import harvest, train_sweep, SAE, HarvestConfig\n"
            "import actcache.train.loader, actcache.common.store\n"
            "assert callable(harvest) and callable(train_sweep)\n"
            "print(SAE.__module__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=tmp_path,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "actcache.common.sae"
    p = subprocess.run([sys.executable, "-m", "actcache", "--help"], capture_output=True, text=True, env=env(),
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 0 and "harvest" in p.stdout and "train" in p.stdout


def test_every_subpackage_is_installed():
    """pyproject lists packages by hand (the folders map onto actcache.*): a new folder must be listed."""
    import sys as _sys
    from pathlib import Path

    if _sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"actcache"}
    for stage in ("common", "harvest", "train"):
        for init in (root / stage).rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            found.add(".".join(("actcache",) + rel))
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
