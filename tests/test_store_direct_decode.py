"""Compressed local chunks decoded without zarr's pipeline (CodedChunks): the same bytes as zarr's decode
for every chunk (a partial last one included) and codec that qualifies, straight into a caller's array
with read_chunk_into, the same one-line errors for absent, truncated and corrupt chunks, and the same
loader batches."""

import numpy as np
import pytest
import torch

from actcache.common.errors import StoreError
from actcache.common.store import ActivationStore
from actcache.train.loader import ActivationLoader
from synthetic import make_store
from test_store_format import damage_chunk

HOOK = "blocks.0.hook_resid_pre"
WIDE = "blocks.1.hook_resid_pre"


def _zarr_path(path) -> ActivationStore:
    store = ActivationStore.open(path)
    store.direct_decode = False
    return store


@pytest.mark.parametrize("codec", ["blosc-zstd-5", "zstd-3", "blosc-lz4"])
def test_compressed_local_chunks_decode_to_zarrs_bytes(tmp_path, codec):
    path = tmp_path / "s.zarr"
    # 40 sequences in chunks of 16: the last chunk holds 8 (stored padded to 16)
    make_store(path, n_sequences=40, chunk_sequences=16, d=24, n_features=32, codec=codec, hooks=(HOOK, WIDE),
               dims={WIDE: 40})
    direct, decoded = ActivationStore.open(path), _zarr_path(path)
    assert direct.coded_chunks(f"activations/{HOOK}") is not None and direct.coded_chunks("tokens") is not None
    assert decoded.n_committed == 3
    for j in range(decoded.n_committed):
        for hook, d in ((HOOK, 24), (WIDE, 40)):
            x, y = direct.read_chunk(hook, j), decoded.read_chunk(hook, j)
            assert x.dtype == np.float16 and x.shape == y.shape == (16 * 32 if j < 2 else 8 * 32, d)
            np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))  # bit for bit
            assert x.flags.writeable and x.flags.owndata  # memory of its own, not the reused file buffer
            out = np.full(y.shape, np.nan, np.float16)
            assert direct.read_chunk_into(hook, j, out) is out
            np.testing.assert_array_equal(out.view(np.uint16), y.view(np.uint16))
        np.testing.assert_array_equal(direct.read_tokens(j), decoded.read_tokens(j))
    # the zarr path fills the caller's array too
    out = np.empty((8 * 32, 24), np.float16)
    np.testing.assert_array_equal(decoded.read_chunk_into(HOOK, 2, out), decoded.read_chunk(HOOK, 2))
    with pytest.raises(ValueError, match="out has shape"):
        direct.read_chunk_into(HOOK, 0, np.empty((16 * 32, 25), np.float16))


def test_other_codec_chains_go_through_zarr(tmp_path):
    for codec in ("lz4", "none"):
        path = tmp_path / f"{codec}.zarr"
        make_store(path, n_sequences=24, chunk_sequences=16, d=8, n_features=16, codec=codec)
        store = ActivationStore.open(path)
        assert store.coded_chunks(f"activations/{HOOK}") is None
        out = np.empty((8 * 32, 8), np.float16)
        np.testing.assert_array_equal(store.read_chunk_into(HOOK, 1, out), _zarr_path(path).read_chunk(HOOK, 1))




@pytest.mark.parametrize("array", ["activations", "tokens"])
@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped byte", "flipped checksum", "empty"])
def test_damaged_chunks_give_the_same_one_line_error_as_zarr(tmp_path, damage, array):
    path = tmp_path / "s.zarr"
    make_store(path, n_sequences=40, chunk_sequences=16, d=8, n_features=16, codec="blosc-zstd-5")
    store = ActivationStore.open(path)
    name = f"activations/{HOOK}" if array == "activations" else "tokens"
    damage_chunk(store.coded_chunks(name).file(1), damage)

    def reads(s):
        if array == "tokens":
            return [lambda: s.read_tokens(1)]
        return [lambda: s.read_chunk(HOOK, 1), lambda: s.read_chunk_into(HOOK, 1, np.empty((16 * 32, 8), np.float16))]

    messages = []
    for s in (ActivationStore.open(path), _zarr_path(path)):
        s.read_chunk(HOOK, 0)  # the intact chunks still read
        for read in reads(s):
            with pytest.raises(StoreError) as e:
                read()
            messages.append(str(e.value))
    for msg in messages:
        assert "\n" not in msg and f"chunk 1 of {name} in {path}" in msg and f"actcache verify {path}" in msg
        assert ("committed but missing" in msg) == (damage == "deleted")
    # both paths word it the same up to the cause in parentheses
    assert len({m.split(" (")[0] for m in messages}) == 1


@pytest.mark.parametrize("skip", [False, True])
def test_the_loader_gives_the_same_batches_from_direct_and_zarr_decoding(tmp_path, skip):
    path = tmp_path / "s.zarr"
    make_store(path, n_sequences=40, chunk_sequences=16, d=24, n_features=32, codec="blosc-zstd-5",
               hooks=(HOOK, WIDE), dims={WIDE: 40}, bos_norm=20.0)

    def batches(store):
        with ActivationLoader(store, [HOOK, WIDE], batch_size=200, seed=3, window_chunks=2, threads=2,
                              skip_special_tokens=skip) as loader:
            return [loader.next_batch(return_rows=True) for _ in range(7)]  # past one epoch

    for (x, rx), (y, ry) in zip(batches(ActivationStore.open(path)), batches(_zarr_path(path))):
        assert torch.equal(rx, ry)
        for h in (HOOK, WIDE):
            assert x[h].dtype == torch.float32 and torch.equal(x[h], y[h])
