"""Requests a store costs on S3, counted by a real S3 server on loopback (moto's, which notes every
request it receives): creating a store, writing and committing a chunk, finalizing, reading a chunk."""

import collections

import numpy as np
import pytest

from actcache.common.errors import StoreError
from actcache.common.manifest import DatasetInfo, HookInfo, Manifest, ModelInfo, TokenizerInfo
from actcache.common.store import ActivationStore, chunk_stats
from benchmarks.s3_server import moto_s3

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def server():
    log: list[tuple[str, str, str]] = []
    with moto_s3(("acts",), requests=log) as env:
        yield log, env


def _manifest(n_hooks: int) -> Manifest:
    return Manifest(
        model=ModelInfo("random:test", d_model=8, n_layers=1, n_ctx=16), tokenizer=TokenizerInfo(),
        dataset=DatasetInfo(path="synthetic"), hooks=[HookInfo(f"blocks.{i}.hook_resid_pre", 8) for i in range(n_hooks)],
        context_size=4, prepend_bos=False, seed=0, n_sequences=12, chunk_sequences=4, codec="zstd-3", batch_size=2)


def _counted(log, fn):
    n0 = len(log)
    out = fn()
    return out, collections.Counter(method for method, _, _ in log[n0:]), log[n0:]


@pytest.mark.parametrize("n_hooks", [1, 3])
def test_requests_of_a_store_on_s3(server, n_hooks):
    """The goals: creating a store <= 20 requests (one hook), a chunk <= hooks + 3, finalize <= 10 per hook,
    a chunk of one array read with one GET."""
    log, _ = server
    url = f"s3://acts/requests-{n_hooks}/acts.zarr"
    m = _manifest(n_hooks)
    # objects of the format: the root, the activations and stats groups, tokens, digests, the per-chunk
    # statistics of every hook (stats/chunks), and per hook its activations array
    n_objects = 6 + n_hooks
    store, created, reqs = _counted(log, lambda: ActivationStore.create(url, m))
    assert created["PUT"] == n_objects + 1, reqs  # the root twice: without its manifest first, with it last
    assert sum(created.values()) <= n_objects + 6, reqs  # and at most 5 that clear the destination
    assert sum(created.values()) <= 20
    assert store.manifest.format_version == 3

    rng = np.random.default_rng(0)
    written = []
    for j in range(store.n_chunks):
        a, b = store.chunk_sequence_range(j)
        acts = {h.name: rng.standard_normal(((b - a) * 4, 8)).astype(np.float16) for h in m.hooks}
        written.append(acts)
        tokens = np.full((b - a, 4), j, np.int32)
        _, wrote, reqs = _counted(log, lambda: store.write_chunk(j, tokens, acts,
                                                                 {k: chunk_stats(v) for k, v in acts.items()}))
        # one PUT per array of the chunk: tokens, every hook's activations, its digest, its statistics
        assert wrote == {"PUT": n_hooks + 3}, reqs
        _, committed, _ = _counted(log, lambda: store.commit(j + 1))
        assert committed == {"PUT": 1}

    _, finalized, reqs = _counted(log, store.finalize)
    # per hook its group (the scalars in its attributes), mean and var (each its metadata and its chunk);
    # then the manifest. Nothing read back
    assert finalized == {"PUT": 5 * n_hooks + 1}, reqs
    assert sum(finalized.values()) <= 10 * n_hooks

    reader = ActivationStore.open(url)  # opening reads each array's metadata once, for every later read
    hook = m.hooks[-1].name
    for j in (0, 1, 2):
        x, read, reqs = _counted(log, lambda: reader.read_chunk(hook, j))
        assert read == {"GET": 1} and reqs[0][1].endswith(f"/activations/{hook}/c/{j}/0"), reqs
        np.testing.assert_array_equal(x, written[j][hook])
    tok, read, _ = _counted(log, lambda: reader.read_tokens(2))
    assert read == {"GET": 1} and (tok == 2).all()
    for h in m.hooks:  # the statistics written from what the harvest held equal those read back
        s = reader.stats(h.name)
        x = np.concatenate([w[h.name] for w in written]).astype(np.float64)
        np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-9, atol=1e-12)
        group = reader.group["stats"][h.name]
        np.testing.assert_allclose(group["mean"][:], x.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(group["var"][:], x.var(0), rtol=1e-9, atol=1e-12)
        assert group.attrs["count"] == x.shape[0]
        np.testing.assert_allclose(group.attrs["mean_norm"], np.linalg.norm(x, axis=1).mean(), rtol=1e-9)
        assert group.attrs["max_abs"] == np.abs(x).max() and group.attrs["n_nonfinite"] == 0
    assert reader.manifest.complete and reader.fingerprint == reader.compute_fingerprint()


def test_an_absent_chunk_is_still_an_error_with_one_request(server):
    log, env = server
    import boto3

    url = "s3://acts/absent/acts.zarr"
    m = _manifest(1)
    store = ActivationStore.create(url, m)
    hook = m.hooks[0].name
    for j in range(store.n_chunks):
        x = np.ones((16, 8), np.float16)
        store.write_chunk(j, np.zeros((4, 4), np.int32), {hook: x}, {hook: chunk_stats(x)})
        store.commit(j + 1)
    store.finalize()
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).delete_object(
        Bucket="acts", Key=f"absent/acts.zarr/activations/{hook}/c/1/0")
    reader = ActivationStore.open(url)
    reader.read_chunk(hook, 0)
    with pytest.raises(StoreError, match="chunk 1 of .* committed but missing"):
        _counted(log, lambda: reader.read_chunk(hook, 1))
