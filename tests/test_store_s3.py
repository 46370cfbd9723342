"""The store on a real S3-compatible server on loopback (moto's server, in-process)."""

import numpy as np
import pytest

from actcache.common import location, outputs
from actcache.common.manifest import DatasetInfo, HookInfo, Manifest, ModelInfo, TokenizerInfo
from actcache.common.store import ActivationStore, chunk_stats
from benchmarks.s3_server import moto_s3

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3_bucket():
    with moto_s3(("acts",)):
        yield "s3://acts"


def _manifest() -> Manifest:
    return Manifest(
        model=ModelInfo("random:test", d_model=8, n_layers=1, n_ctx=16),
        tokenizer=TokenizerInfo(), dataset=DatasetInfo(path="synthetic"),
        hooks=[HookInfo("blocks.0.hook_resid_pre", 8)], context_size=4, prepend_bos=False, seed=0,
        n_sequences=6, chunk_sequences=4, codec="zstd-3", batch_size=2,
    )


def test_store_round_trips_through_s3(s3_bucket):
    url = f"{s3_bucket}/store-roundtrip/acts.zarr"  # in-process moto servers share one backend
    assert not location.exists(url)
    store = ActivationStore.create(url, _manifest())
    rng = np.random.default_rng(0)
    written = []
    for j in range(store.n_chunks):
        a, b = store.chunk_sequence_range(j)
        x = rng.standard_normal(((b - a) * 4, 8)).astype(np.float16)
        written.append(x)
        store.write_chunk(j, np.full((b - a, 4), j, np.int32), {"blocks.0.hook_resid_pre": x},
                          {"blocks.0.hook_resid_pre": chunk_stats(x)})
        store.commit(j + 1)
    store.finalize()

    again = ActivationStore.open(url)
    assert again.manifest.complete and again.n_committed == 2
    for j, x in enumerate(written):
        np.testing.assert_array_equal(again.read_chunk("blocks.0.hook_resid_pre", j), x)
    allx = np.concatenate(written).astype(np.float64)
    np.testing.assert_allclose(again.stats("blocks.0.hook_resid_pre")["mean"], allx.mean(0), rtol=1e-9, atol=1e-12)
    assert again.nbytes_stored("activations") > 0

    outputs.remove_output(url, outputs.STORE)  # --overwrite's deletion, on S3
    assert not location.exists(url)
