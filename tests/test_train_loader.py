"""The train loader: a deterministic, resumable, well-shuffled stream over every stored token."""

import numpy as np
import pytest
import torch

from actcache.common.store import ActivationStore
from tests.synthetic import BOS_ID, make_store
from actcache.train.loader import ActivationLoader, normalisation_scale
from benchmarks.loader_measures import raw_read_rate, shuffle_quality

HOOK = "blocks.0.hook_resid_pre"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 10 chunks of 16 sequences x 32 tokens, the last one half as long: 4864 tokens
    s, _ = make_store(tmp_path_factory.mktemp("loader") / "s.zarr", d=16, n_sequences=152, chunk_sequences=16,
                      bos_norm=50.0)
    return s


def loader(store, **kw):
    args = dict(batch_size=300, seed=0, window_chunks=3, threads=2)
    args.update(kw)
    return ActivationLoader(store, HOOK, **args)


def test_same_seed_same_batches_other_seed_other_batches(store):
    a, b, c = loader(store), loader(store), loader(store, seed=1)
    for _ in range(25):  # crosses windows and an epoch boundary (4864 tokens per epoch)
        xa, xb, xc = a.next_batch(), b.next_batch(), c.next_batch()
        assert torch.equal(xa, xb)
    assert not torch.equal(xa, xc)


def test_every_token_once_per_epoch(store):
    n_tokens = store.manifest.n_tokens
    ld = loader(store, batch_size=256, normalize=False)
    rows = torch.cat([ld.next_batch(return_rows=True)[1] for _ in range(n_tokens // 256)])
    assert torch.equal(rows.sort().values, torch.arange(n_tokens))
    # and the values are the stored ones
    ld2 = loader(store, batch_size=256, normalize=False)
    x, r = ld2.next_batch(return_rows=True)
    stored = torch.from_numpy(store.activations(HOOK)[:]).float()
    assert torch.equal(x, stored[r])


def test_state_dict_resume_and_seek_continue_the_same_stream(store):
    ref = loader(store)
    batches = [ref.next_batch() for _ in range(30)]
    half = loader(store)
    for _ in range(13):
        half.next_batch()
    state = half.state_dict()
    resumed = loader(store)
    resumed.load_state_dict(state)
    sought = loader(store)
    sought.seek(13)
    assert sought.state_dict() == state
    for i in range(13, 30):
        assert torch.equal(resumed.next_batch(), batches[i])
        assert torch.equal(sought.next_batch(), batches[i])


def test_state_from_another_config_is_refused(store):
    from actcache.common.errors import UserError

    st = loader(store).state_dict()
    with pytest.raises(UserError, match="batch_size"):
        loader(store, batch_size=64).load_state_dict(st)


def test_normalisation_from_stats_gives_mean_squared_norm_d(store):
    d = store.manifest.hook(HOOK).d
    scale = normalisation_scale(store, HOOK)
    x = torch.from_numpy(store.activations(HOOK)[:]).double() * scale
    assert float(x.pow(2).sum(1).mean()) == pytest.approx(d, rel=1e-3)
    ld = loader(store, batch_size=store.manifest.n_tokens)
    assert float(ld.next_batch().double().pow(2).sum(1).mean()) == pytest.approx(d, rel=1e-3)


@pytest.mark.parametrize("left_out", [[], [3], [0, 1, 2, 3, 4, 5, 6], list(range(1, 10, 2))])
def test_normalisation_of_a_subset_of_chunks_is_the_direct_one(store, left_out, monkeypatch):
    """From the summary less the chunks left out (few left out), or from the chunks' partial sums read
    a few at a time (many left out): both are E||x||^2 = d over exactly the chunks kept."""
    import actcache.train.loader as loader_module

    monkeypatch.setattr(loader_module, "PARTIALS_PER_READ", 3)
    keep = [j for j in range(store.n_committed) if j not in left_out]
    x = np.concatenate([store.activations(HOOK)[slice(*store.chunk_row_range(j))] for j in keep]).astype(np.float64)
    direct = np.sqrt(x.shape[1] / (x ** 2).sum(1).mean())
    assert normalisation_scale(store, HOOK, keep) == pytest.approx(direct, rel=1e-9)


def test_skip_special_tokens_leaves_out_bos_positions(store):
    ld = loader(store, batch_size=256, skip_special_tokens=True, normalize=False)
    tokens = torch.from_numpy(store.tokens[:].reshape(-1))
    n_kept = int((tokens != BOS_ID).sum())
    xs, rows = zip(*[ld.next_batch(return_rows=True) for _ in range(n_kept // 256)])
    rows = torch.cat(rows)
    assert not bool((tokens[rows] == BOS_ID).any())
    assert torch.cat(xs).norm(dim=1).max() < 25  # the planted BOS outliers have norm 50
    assert rows.unique().numel() == rows.numel()
    # seeking counts only the kept positions
    again = loader(store, batch_size=256, skip_special_tokens=True, normalize=False)
    again.seek(7)
    assert torch.equal(again.next_batch(return_rows=True)[1], rows[7 * 256:8 * 256])


def test_batches_mix_sequences_close_to_a_global_shuffle(store):
    q = shuffle_quality(loader(store, window_chunks=10, batch_size=512), n_batches=8)
    # a whole-store window: the same-sequence pair fraction is near the ideal, far below reading in order
    assert q["ratio_to_ideal"] < 1.5
    assert q["same_sequence_pair_fraction"] < q["in_order"] / 5
    small = shuffle_quality(loader(store, window_chunks=1, batch_size=512), n_batches=8)
    assert small["same_sequence_pair_fraction"] > q["same_sequence_pair_fraction"]


def test_raw_read_rate_reads_every_chunk(store):
    r = raw_read_rate(store, HOOK)
    assert r["tokens"] == store.manifest.n_tokens and r["tokens_per_s"] > 0


def test_incomplete_store_serves_committed_chunks_only(tmp_path):
    s, _ = make_store(tmp_path / "s.zarr", d=8, n_sequences=64, chunk_sequences=16)
    s.commit(2)  # pretend only two chunks were committed
    s = ActivationStore.open(tmp_path / "s.zarr")
    ld = ActivationLoader(s, HOOK, batch_size=128, seed=0, window_chunks=4, normalize=False, repeat=False)
    rows = torch.cat([ld.next_batch(return_rows=True)[1] for _ in range(8)])
    assert int(rows.max()) < 2 * 16 * 32
    assert np.array_equal(np.sort(rows.numpy()), np.arange(2 * 16 * 32))


def test_load_state_dict_mid_stream_while_a_prefetch_runs(store):
    first = loader(store)
    ref = [first.next_batch() for _ in range(20)]
    ld = loader(store)
    for _ in range(5):
        ld.next_batch()  # a prefetch of the following window is now in flight
    other = loader(store)
    for _ in range(11):
        other.next_batch()
    ld.load_state_dict(other.state_dict())
    for i in range(11, 20):
        assert torch.equal(ld.next_batch(), ref[i])
    ld.seek(2)
    assert torch.equal(ld.next_batch(), ref[2])
