"""S3 credentials and endpoint from --storage-option key=value (and the standard AWS chain) on harvest,
train, info and verify: they reach the store, and no file these commands write holds them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harvest_fixtures import HOOKS, ROOT, env, harvest_args, write_token_jsonl
from tests.conftest import make_sweep, write_sweep

SECRET_OPTION = "optsecret-7f3a9c-never-written"
SECRET_ENV = "envsecret-51d2e8-never-written"
KEY_ID = "AKIARECOGNISABLE0042"


def no_aws_env() -> dict[str, str]:
    """The test environment without any AWS setting, so only what a test passes is in force."""
    return {k: v for k, v in env().items() if not k.startswith("AWS_")} | {"OMP_NUM_THREADS": "1"}


def test_parse_storage_options():
    from actcache.common.errors import UserError
    from actcache.common.location import parse_storage_options

    assert parse_storage_options(["endpoint_url=http://h:9000/x=y", "anon=true", "use_ssl=False"]) == \
        {"endpoint_url": "http://h:9000/x=y", "anon": True, "use_ssl": False}
    with pytest.raises(UserError, match="key=value"):
        parse_storage_options(["endpoint_url"])


def test_secrets_passed_both_ways_reach_s3_and_are_never_written(s3, tmp_path):
    endpoint = s3.server.endpoint
    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=40)
    url = f"{s3.url}/run/acts.zarr"

    # harvest: endpoint and both keys on the command line, nothing in the environment
    opts = ["--storage-option", f"endpoint_url={endpoint}", "--storage-option", f"key={KEY_ID}",
            "--storage-option", f"secret={SECRET_OPTION}"]
    h = subprocess.run([sys.executable, "-m", "actcache", "-v",
                        *harvest_args(url, data, *opts, hooks=HOOKS[:1], tokens=8 * 8 * 32)],
                       capture_output=True, text=True, env=no_aws_env() | {"AWS_DEFAULT_REGION": "us-east-1"},
                       cwd=ROOT, timeout=300)
    assert h.returncode == 0, h.stderr[-3000:]

    # train: the endpoint on the command line, the keys from the standard AWS environment variables
    write_sweep(make_sweep({"name": "topk", "architecture": "topk", "k": 4, "d_sae": 64}, hook=HOOKS[0],
                           batch_tokens=128, tokens=1024, eval_tokens=256, window_chunks=2), tmp_path / "sweep.toml")
    out = tmp_path / "run"
    t = subprocess.run([sys.executable, "-m", "actcache", "-v", "train", url, "--config",
                        str(tmp_path / "sweep.toml"), "--out", str(out), "--no-progress",
                        "--storage-option", f"endpoint_url={endpoint}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=no_aws_env() | {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ENV,
                                           "AWS_DEFAULT_REGION": "us-east-1"})
    assert t.returncode == 0, t.stderr[-3000:]
    assert (out / "topk" / "cfg.json").is_file() and (out / "summary.json").is_file()

    # info and verify read the store with the same options
    for cmd in (["info", url, "--json"], ["verify", url]):
        r = subprocess.run([sys.executable, "-m", "actcache", *cmd, "--storage-option", f"endpoint_url={endpoint}",
                            "--storage-option", f"secret={SECRET_OPTION}", "--storage-option", f"key={KEY_ID}"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120,
                           env=no_aws_env() | {"AWS_DEFAULT_REGION": "us-east-1"})
        assert r.returncode == 0 and SECRET_OPTION not in r.stdout + r.stderr, r.stderr[-2000:]

    written: dict[str, bytes] = {"harvest output": (h.stdout + h.stderr).encode(),
                                 "train output": (t.stdout + t.stderr).encode()}
    written.update({f"{s3.url}/run/{k}": v for k, v in s3.server.objects(s3.bucket, "run").items()})
    written.update({str(f): f.read_bytes() for f in Path(tmp_path).rglob("*") if f.is_file()})
    assert any(k.endswith("acts.zarr/zarr.json") for k in written) and any(k.endswith("run.json") for k in written)
    for secret in (SECRET_OPTION, SECRET_ENV, KEY_ID):
        assert [k for k, v in written.items() if secret.encode() in v] == [], secret
