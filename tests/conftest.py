"""Test set-up: offline, CPU only, and the repository root importable without installing."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")

import pytest  # noqa: E402

SYNTHETIC_HOOK = "blocks.0.hook_resid_pre"  # the hook of the synthetic stores (benchmarks/synthetic.py)


def find_saelens_python() -> str | None:
    """The Python of an environment with sae-lens: $ACTCACHE_SAELENS_PYTHON, else .venv-saelens."""
    from benchmarks.run import saelens_python

    return saelens_python(None)


@pytest.fixture(scope="session")
def saelens_python() -> str:
    """The sae-lens environment's Python; the test is skipped, saying why, where there is none."""
    py = find_saelens_python()
    if py is None:
        pytest.skip("no sae-lens environment: run `make setup-saelens` or set ACTCACHE_SAELENS_PYTHON")
    return py


def make_sweep(*saes: dict, defaults: dict | None = None, hook: str = SYNTHETIC_HOOK, **top) -> dict:
    """A sweep configuration as the dict that train_sweep and load_config accept (what a sweep.toml
    parses to): top-level keys, [defaults] and one [[sae]] table per dict in saes."""
    cfg = {"hook": hook, **top}
    if defaults:
        cfg["defaults"] = dict(defaults)
    if saes:
        cfg["sae"] = [dict(s) for s in saes]
    return cfg


@pytest.fixture
def sweep():
    """make_sweep, for tests: sweep({"name": "t", "architecture": "topk", "k": 4}, tokens=2048, ...)."""
    return make_sweep


@pytest.fixture(scope="session")
def bundled_model():
    """The bundled SmolLM2 model on the CPU, loaded once for the whole run, and how long loading took."""
    import time
    from types import SimpleNamespace

    from actcache.harvest.models import DEFAULT_MODEL, load_model

    t = time.perf_counter()
    model = load_model(DEFAULT_MODEL, device="cpu")
    return SimpleNamespace(model=model, load_seconds=time.perf_counter() - t)
