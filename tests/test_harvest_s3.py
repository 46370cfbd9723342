"""A harvest straight to S3 (a local moto server): the same store, read back by info, verify and resume."""

import numpy as np
import pytest

from actcache import HarvestConfig, harvest, info, verify
from harvest_fixtures import HOOKS, RANDOM, write_token_jsonl


@pytest.fixture()
def s3(monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    for k, v in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="acts")
    yield "s3://acts"
    server.stop()


def test_harvest_to_s3_then_resume_and_verify(s3, tmp_path):
    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=30)
    common = dict(hooks=HOOKS[:2], model=RANDOM, dataset=str(data), context_size=32, batch_size=4,
                  chunk_sequences=4, device="cpu")
    local = harvest(HarvestConfig(out=str(tmp_path / "local.zarr"), tokens=12 * 32, **common), progress=False)
    url = f"{s3}/run1/acts.zarr"
    res = harvest(HarvestConfig(out=url, tokens=12 * 32, **common), progress=False)
    assert res.n_tokens == local.n_tokens and res.activation_bytes == local.activation_bytes
    assert verify(url).ok and info(url)["n_tokens"] == 12 * 32
    again = harvest(HarvestConfig(out=url, tokens=12 * 32, resume=True, **common), progress=False)
    assert again.tokens_this_run == 0  # complete already

    from actcache.common.store import ActivationStore

    a, b = ActivationStore.open(url), ActivationStore.open(tmp_path / "local.zarr")
    for h in HOOKS[:2]:
        np.testing.assert_array_equal(a.activations(h)[:], b.activations(h)[:])
