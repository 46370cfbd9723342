"""The compiled kernels against torch: the top-k selection gives torch.topk's set of columns in every
row, in ascending order (random rows, rows full of ties, negative and infinite values, the sizes a sweep uses); the
grouping by latent gives a stable sort's order; the entries' dot products match float64."""

import pytest
import torch

from actcache.common.sparse_kernels import _fast_path, entry_dots, group_by, topk_entries


def topk_columns(pre, k):
    values, cols = topk_entries(pre, k)
    assert torch.equal(values, pre.gather(1, cols))
    return cols


def _same_sets(pre, k):
    got = topk_columns(pre, k)
    assert got.shape == (pre.shape[0], k) and got.dtype == torch.int64
    # every row's columns are distinct and in ascending order (the compiled path and torch's alike), and
    # their values are torch.topk's values
    assert bool((got.diff(dim=1) > 0).all())
    ours = pre.gather(1, got).sort(1).values
    theirs = pre.topk(k, dim=1).values.sort(1).values
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    return got


@pytest.mark.parametrize("n,k", [(2048, 128), (2048, 16), (1024, 64), (100, 1), (100, 99), (3000, 700)])
def test_random_rows_give_torch_topk(n, k):
    pre = torch.randn(300, n, generator=torch.Generator().manual_seed(n + k))
    assert _fast_path(pre, k)
    got = _same_sets(pre, k)
    # no ties among random floats: the very same columns
    assert torch.equal(got.sort(1).values, pre.topk(k, dim=1).indices.sort(1).values)


def test_ties_negatives_and_infinities():
    g = torch.Generator().manual_seed(1)
    ties = torch.randint(-3, 3, (128, 200), generator=g).float()  # a few values, so ties at every threshold
    got = _same_sets(ties, 37)
    # among equal values at the threshold, the lowest columns are taken
    t = ties.gather(1, got).min(1).values
    for r in range(8):
        at = (ties[r] == t[r]).nonzero().flatten()
        taken = set(got[r].tolist()) & set(at.tolist())
        assert taken == set(at[: len(taken)].tolist())
    neg = -torch.rand(128, 500, generator=g) - 1.0
    _same_sets(neg, 10)
    masked = torch.randn(128, 500, generator=g).masked_fill(torch.rand(128, 500, generator=g) < 0.9, float("-inf"))
    _same_sets(masked, 80)  # more columns than finite values in most rows: -inf fills the rest
    zeros = torch.zeros(128, 64)
    zeros[:, 5] = -0.0
    assert torch.equal(topk_columns(zeros, 3), torch.tensor([[0, 1, 2]]).expand(128, 3))


def test_other_inputs_fall_back_to_torch():
    small = torch.randn(8, 50)
    assert not _fast_path(small, 5)  # too few rows to pay for the call
    assert not _fast_path(torch.randn(100, 50, dtype=torch.float64), 5)
    assert not _fast_path(torch.randn(100, 50), 50)
    _same_sets(small, 5)


def test_same_columns_on_any_number_of_threads():
    pre = torch.randn(1000, 700, generator=torch.Generator().manual_seed(3))
    before = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append(topk_columns(pre, 50))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


@pytest.mark.parametrize("n_groups", [1, 7, 2048])
def test_group_by_is_a_stable_sort(n_groups):
    g = torch.Generator().manual_seed(n_groups)
    cols = torch.randint(0, n_groups, (5000,), generator=g)
    cols[:50] = n_groups - 1  # some groups empty, some crowded
    rows = torch.randint(0, 10**6, (5000,), generator=g)
    order, grouped, offsets = group_by(cols, rows, n_groups)
    assert torch.equal(order, torch.sort(cols, stable=True).indices)
    assert torch.equal(grouped, rows[order])
    counts = torch.bincount(cols, minlength=n_groups)
    assert torch.equal(offsets, counts.cumsum(0) - counts)


@pytest.mark.parametrize("d", [128, 77])
def test_entry_dots_against_float64(d):
    g = torch.Generator().manual_seed(d)
    a, b = torch.randn(600, d, generator=g), torch.randn(300, d, generator=g)
    rows = torch.arange(600).repeat_interleave(16)
    cols = torch.randint(0, 300, (rows.numel(),), generator=g)
    want = (a.double()[rows] * b.double()[cols]).sum(1)
    before = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append(entry_dots(a, rows, b, cols))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got[0].double(), want, rtol=1e-5, atol=1e-5)
    # one order of summation whatever the thread count: the same bits
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
