"""Test set-up: offline, CPU only. The package is imported as installed (`pip install -e .`); run the
suite from the repository root with `python -m pytest`, which also makes benchmarks/ importable."""

import contextlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# converted .gguf models (harvest/gguf_cache.py) go to a folder of the machine's temporary space, not the
# user's cache; entries are keyed by content, so runs share one safely and only the first converts
os.environ.setdefault("ACTCACHE_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"actcache-tests-{os.getuid()}"))

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


def _toml_value(v) -> str:
    """One TOML value: a bool, number or string, or a list of them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON's string escapes are TOML's too
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML value for {v!r}")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def _tables(v) -> list[dict]:
    """The tables a value of a sweep dict stands for: one for a dict, several for a list of dicts."""
    if isinstance(v, dict):
        return [v]
    return v if isinstance(v, list) and v and all(isinstance(x, dict) for x in v) else []


def sweep_toml(cfg: dict) -> str:
    """The TOML text of a sweep dict (what make_sweep returns): top-level keys first, then each table
    ([defaults], [grid]) and each array of tables ([[sae]]). Checked: the text parses back to cfg."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in cfg.items() if not _tables(v)]
    for k, v in cfg.items():
        for table in _tables(v):
            lines += ["", f"[{_toml_key(k)}]" if isinstance(v, dict) else f"[[{_toml_key(k)}]]"]
            lines += [f"{_toml_key(key)} = {_toml_value(x)}" for key, x in table.items()]
    text = "\n".join(lines) + "\n"
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    # the text says what the dict says (json.dumps: a NaN equals a NaN, a tuple its list)
    assert json.dumps(tomllib.loads(text), sort_keys=True) == json.dumps(cfg, sort_keys=True), text
    return text


def write_sweep(cfg: dict, path: str | Path) -> Path:
    """Write a sweep dict as the TOML file a user would pass to `actcache train --config`."""
    path = Path(path)
    path.write_text(sweep_toml(cfg))
    return path


@pytest.fixture(scope="session")
def bundled_model():
    """The bundled SmolLM2 model on the CPU, loaded once for the whole run, and how long loading took."""
    import time
    from types import SimpleNamespace

    from actcache.harvest.models import DEFAULT_MODEL, load_model

    t = time.perf_counter()
    model = load_model(DEFAULT_MODEL, device="cpu")
    return SimpleNamespace(model=model, load_seconds=time.perf_counter() - t)


@pytest.fixture(scope="session")
def hf_model():
    """The bundled GGUF model through transformers alone (the independent reference of the bundled-model
    tests), float32 on the CPU, and its tokenizer: loaded once for the whole run. Tests copy it before
    changing it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actcache.harvest.models import bundled_gguf

    gguf = bundled_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tok


@contextlib.contextmanager
def single_thread():
    """torch on one thread inside the block (the arithmetic of OMP_NUM_THREADS=1 subprocesses, and
    timings that the other core's work disturbs less); the previous count is restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------ S3 on loopback (moto)
S3_KEYS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1"}


class MotoS3:
    """moto's S3 server on 127.0.0.1 in this process (endpoint, boto3 client), which a test may stop
    and start again on the same port; the objects survive (in-process servers share one backend)."""

    def __init__(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        host, self.port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, **S3_KEYS}
        self.client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="test",
                                   aws_secret_access_key="test", region_name="us-east-1")
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def start_again(self) -> None:
        if self.running:
            return
        self.server = self._cls(ip_address="127.0.0.1", port=self.port)
        self.server.start()
        self.running = True

    def objects(self, bucket: str, prefix: str) -> dict[str, bytes]:
        """Every object under bucket/prefix/ (the whole bucket for prefix ""), by key relative to the prefix."""
        out = {}
        under = f"{prefix}/" if prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=under):
            for o in page.get("Contents", []):
                out[o["Key"][len(under):]] = self.client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        return out


def _need_s3_modules() -> None:
    for module in ("boto3", "moto.server", "s3fs"):
        pytest.importorskip(module)


@contextlib.contextmanager
def moto_s3(*buckets: str):
    """A server of its own (for a test that stops it), with these buckets; stopped on exit."""
    _need_s3_modules()
    s3 = MotoS3()
    try:
        for b in buckets:
            s3.client.create_bucket(Bucket=b)
        yield s3
    finally:
        s3.stop()


@pytest.fixture(scope="session")
def s3_server():
    """The S3 server of the whole run, started when a test first asks for it."""
    with moto_s3() as s3:
        yield s3


@pytest.fixture()
def s3(s3_server, monkeypatch, request):
    """A fresh bucket on the session's S3 server, and the AWS_* variables that reach it set in os.environ
    for the test: .url is "s3://<bucket>", .env the variables (for subprocesses), .server the MotoS3."""
    from types import SimpleNamespace

    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    bucket = f"{name}-{len(_BUCKETS)}"
    _BUCKETS.append(bucket)
    s3_server.client.create_bucket(Bucket=bucket)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return SimpleNamespace(url=f"s3://{bucket}", bucket=bucket, env=dict(s3_server.env), server=s3_server,
                           client=s3_server.client)


_BUCKETS: list[str] = []
