"""Memory-mapped chunk reads of uncompressed local stores (`--codec none`): the same values as zarr's
decode for every chunk (a partial last one included), the same one-line errors for absent, truncated
and corrupt chunks, the same loader batches, and compressed stores still read through zarr."""

from pathlib import Path

import numpy as np
import pytest
import torch

from actcache.common.errors import StoreError
from actcache.common.store import ActivationStore
from actcache.train.loader import ActivationLoader
from synthetic import make_store
from test_store_format import damage_chunk

HOOK = "blocks.0.hook_resid_pre"


@pytest.fixture(scope="module")
def none_store(tmp_path_factory):
    """40 sequences in chunks of 16 (the last chunk holds 8), written without compression."""
    path = tmp_path_factory.mktemp("mmap") / "none.zarr"
    make_store(path, n_sequences=40, chunk_sequences=16, d=24, n_features=32, codec="none")
    return path


def _zarr_path(path) -> ActivationStore:
    store = ActivationStore.open(path)
    store.mmap_reads = False
    return store


def test_uncompressed_local_chunks_are_mapped_views_equal_to_zarrs_decode(none_store):
    mapped, decoded = ActivationStore.open(none_store), _zarr_path(none_store)
    assert mapped.mapped_chunks(f"activations/{HOOK}") is not None
    assert mapped.mapped_chunks("tokens") is not None
    assert mapped.n_committed == 3
    for j in range(mapped.n_committed):
        x, y = mapped.read_chunk(HOOK, j), decoded.read_chunk(HOOK, j)
        assert x.dtype == np.float16 and x.shape == y.shape == (16 * 32 if j < 2 else 8 * 32, 24)
        np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))  # bit for bit
        # a view of the mapped file: no copy, and nobody can write through it
        assert not x.flags.writeable and not x.flags.owndata
        with pytest.raises(ValueError):
            x[0, 0] = 1
        t, u = mapped.read_tokens(j), decoded.read_tokens(j)
        assert t.dtype == np.int32 and not t.flags.writeable
        np.testing.assert_array_equal(t, u)


def test_the_chunk_file_is_found_through_the_array_metadata(none_store):
    m = ActivationStore.open(none_store).mapped_chunks(f"activations/{HOOK}")
    # zarr v3's default chunk key encoding: c/<row chunk>/<column chunk>
    assert m.file(2) == Path(none_store) / "activations" / HOOK / "c" / "2" / "0"
    assert m.file(2).stat().st_size == 16 * 32 * 24 * 2 + 4  # full chunk shape (fill-padded) + crc32c




@pytest.mark.parametrize("array", ["activations", "tokens"])
@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped byte", "flipped checksum", "empty"])
def test_damaged_mapped_chunks_give_the_same_one_line_error_as_zarr(tmp_path, damage, array):
    path = tmp_path / "s.zarr"
    make_store(path, n_sequences=40, chunk_sequences=16, d=8, n_features=16, codec="none")
    store = ActivationStore.open(path)
    name = f"activations/{HOOK}" if array == "activations" else "tokens"
    damage_chunk(store.mapped_chunks(name).file(1), damage)

    def read(s):
        return s.read_chunk(HOOK, 1) if array == "activations" else s.read_tokens(1)

    messages = []
    for s in (ActivationStore.open(path), _zarr_path(path)):
        s.read_chunk(HOOK, 0)  # the intact chunks still read
        with pytest.raises(StoreError) as e:
            read(s)
        messages.append(str(e.value))
    for msg in messages:
        assert "\n" not in msg and f"chunk 1 of {name} in {path}" in msg and f"actcache verify {path}" in msg
        assert ("committed but missing" in msg) == (damage == "deleted")
    # both paths word it the same up to the cause in parentheses
    assert messages[0].split(" (")[0] == messages[1].split(" (")[0]
    if damage == "deleted":
        assert messages[0] == messages[1]


def test_compressed_stores_keep_the_zarr_path(tmp_path):
    path = tmp_path / "z.zarr"
    make_store(path, n_sequences=24, chunk_sequences=16, d=8, n_features=16, codec="blosc-zstd-5")
    store = ActivationStore.open(path)
    assert store.mapped_chunks(f"activations/{HOOK}") is None and store.mapped_chunks("tokens") is None
    x = store.read_chunk(HOOK, 1)
    assert x.shape == (8 * 32, 8) and x.flags.writeable  # decoded into memory of its own


@pytest.mark.parametrize("skip", [False, True])
def test_the_loader_gives_the_same_batches_from_mapped_and_decoded_chunks(none_store, skip):
    def batches(store):
        with ActivationLoader(store, HOOK, batch_size=200, seed=3, window_chunks=2, threads=2,
                              skip_special_tokens=skip) as loader:
            return [loader.next_batch(return_rows=True) for _ in range(7)]  # past one epoch

    for (x, rx), (y, ry) in zip(batches(ActivationStore.open(none_store)), batches(_zarr_path(none_store))):
        assert torch.equal(x, y) and torch.equal(rx, ry)


def test_the_codec_read_benchmark_runs_on_a_tiny_store(tmp_path):
    from benchmarks.bench_codec_read import format_table, run

    r = run(tmp_path, tokens=2048, d=16, context_size=32, chunk_sequences=16, rounds=1, seconds=0.05,
            batch_size=256, threads=1, window_chunks=2)
    ways = r["ways"]
    assert list(ways) == ["none, mmap", "none, zarr decode", "blosc-zstd-5"]
    assert ways["none, mmap"]["stored_over_raw"] == ways["none, zarr decode"]["stored_over_raw"] >= 1.0
    assert ways["blosc-zstd-5"]["stored_over_raw"] < 1.0  # Gaussian float16 still compresses a little
    assert all(w["raw_read_gb_per_s"] > 0 and w["loader_tokens_per_s"] > 0 for w in ways.values())
    assert ways["none, zarr decode"]["loader_vs_zarr_decode"] == 1.0
    assert "| none, mmap |" in format_table(r)
