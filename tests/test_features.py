"""Top contexts from the store: the streaming pass equals a brute-force computation (encode every
token, sort), ties and latents that never fire included; the output files and the command."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_sweep, single_thread
from tests.synthetic import make_store
from actcache.common.errors import UserError
from actcache.common.store import ActivationStore, chunk_stats
from actcache.train.features import FeatureOptions, LatentAccumulator, collect_top_contexts, write_features
from actcache.train.features.api import choose_sequences
from actcache.train.features.contexts import sample_key
from actcache.common.sae import SAE, Metadata, SAEConfig
from actcache.train.sweep import train_sweep

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_pre"
D = 16


def quantised_store(url, n_sequences=96, context_size=16, chunk_sequences=8):
    """A synthetic store whose activations are multiples of 0.5 in [-4, 4]: with the integer-valued SAE
    below every encoder sum is exact in float32, so equal activations (ties) are really equal."""
    make_store(url, d=D, n_features=32, n_sequences=n_sequences, context_size=context_size,
               chunk_sequences=chunk_sequences, seed=5)
    store = ActivationStore.open(url, "r+")
    for j in range(store.n_chunks):
        x = store.read_chunk(HOOK, j).astype(np.float32)
        q = (np.clip(np.round(x * 4), -8, 8) / 2).astype(np.float16)
        store.write_chunk(j, store.read_tokens(j), {HOOK: q}, {HOOK: chunk_stats(q)})
    store.finalize()
    return ActivationStore.open(url)


def exact_sae(d_sae=24, seed=0, architecture="standard"):
    g = torch.Generator().manual_seed(seed)
    W_enc = (torch.randint(-2, 3, (D, d_sae), generator=g) / 2).float()
    W_enc[:, 0] = 0
    W_enc[0, 0] = 1.0  # latent 0 = relu(x0 - 0.5): a few levels only, so many ties
    b_enc = (torch.randint(-8, 2, (d_sae,), generator=g) / 4).float()
    b_enc[0] = -0.5
    b_enc[1] = -1000.0  # latent 1 never fires
    b_enc[2] = -1000.0
    w = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": torch.randn(d_sae, D, generator=g), "b_dec": torch.zeros(D)}
    if architecture == "jumprelu":
        w["threshold"] = torch.full((d_sae,), 0.75)
    cfg = SAEConfig(architecture=architecture, d_in=D, d_sae=d_sae, metadata=Metadata(hook_name=HOOK))
    return SAE(cfg, w)


def brute_force(store, sae, a, b, top, n_bins=32, n_groups=8, per_group=3, skip=(1, 2), ranges=None):
    """Encode every chosen token at once and sort: the expected result of the streaming pass over the
    sequences [a, b), or over a list of ranges."""
    T = store.manifest.context_size
    ranges = ranges or [(a, b)]
    toks = np.concatenate([store.tokens[a:b].reshape(-1) for a, b in ranges])
    x = np.concatenate([store.activations(HOOK)[a * T:b * T] for a, b in ranges])
    idx = np.concatenate([np.arange(a * T, b * T) for a, b in ranges])
    keep = ~np.isin(toks, skip)
    f = sae.encode(torch.from_numpy(x[keep])).numpy()
    idx = idx[keep]
    out = []
    for lat in range(f.shape[1]):
        col = f[:, lat]
        nz = col > 0
        v, ids = col[nz], idx[nz]
        order = np.lexsort((ids, -v))
        rec = {"count": int(nz.sum()), "sum": float(v.astype(np.float64).sum()),
               "top": [(int(ids[o]), float(v[o])) for o in order[:top]]}
        if v.size:
            e = math.frexp(float(v.max()))[1]
            bins = np.clip(np.floor(v * 2.0 ** (int(math.log2(n_bins)) - e)), 0, n_bins - 1).astype(int)
            rec["exp"] = e
            rec["hist"] = np.bincount(bins, minlength=n_bins).tolist()
            groups = bins // (n_bins // n_groups)
            keys = sample_key(torch.from_numpy(ids), torch.full((ids.size,), lat)).numpy()
            rec["samples"] = {}
            for g in range(n_groups):
                m = groups == g
                if m.any():
                    o = np.lexsort((ids[m], keys[m]))[:per_group]
                    rec["samples"][g] = sorted(int(i) for i in ids[m][o])
        out.append(rec)
    return out


def check_equal(stats, expected):
    top_idx, top_val = stats.top_idx.numpy(), stats.top_val.numpy()
    for lat, rec in enumerate(expected):
        assert int(stats.count[lat]) == rec["count"], lat
        assert float(stats.act_sum[lat]) == pytest.approx(rec["sum"], rel=1e-9, abs=1e-9)
        got = [(int(i), float(v)) for i, v in zip(top_idx[lat], top_val[lat]) if i >= 0]
        assert got == rec["top"], lat
        if rec["count"] == 0:
            assert stats.hist[lat].sum() == 0 and (stats.sample_idx[lat] == -1).all()
            continue
        assert int(stats.hist_exp[lat]) == rec["exp"], lat
        assert stats.hist[lat].tolist() == rec["hist"], lat
        for g in range(stats.n_groups):
            got_s = sorted(int(i) for i in stats.sample_idx[lat, g] if i >= 0)
            assert got_s == rec["samples"].get(g, []), (lat, g)


@pytest.fixture(scope="module")
def qstore(tmp_path_factory):
    return quantised_store(tmp_path_factory.mktemp("q") / "q.zarr")


@pytest.mark.parametrize("batch_rows", [29, 4096])
def test_streaming_equals_brute_force_with_ties(qstore, batch_rows):
    saes = {"relu": exact_sae(24, 0), "jump": exact_sae(40, 1, "jumprelu")}
    hooks = {n: HOOK for n in saes}
    a, b = 8, 90  # starts and ends inside chunks
    opts = FeatureOptions(top=5)
    got = collect_top_contexts(qstore, saes, hooks, (a, b), opts, batch_rows=batch_rows)
    for name, sae in saes.items():
        exp = brute_force(qstore, sae, a, b, top=5)
        # the test means something: ties among the top values, latents that never fire
        assert exp[1]["count"] == 0 and exp[2]["count"] == 0
        vals0 = [v for _, v in exp[0]["top"]]
        assert len(set(vals0)) < len(vals0)
        assert exp[0]["count"] > 5
        check_equal(got[name], exp)
        assert got[name].n_tokens == sum(1 for t in qstore.tokens[a:b].reshape(-1) if t not in (1, 2))


def test_topk_entries_feed_the_same_statistics_as_the_dense_code():
    """collect_top_contexts takes a TopK SAE's positive entries from its selection (encode_entries),
    without the dense code: the same entries as (f > 0).nonzero() of encode, and the same statistics."""
    g = torch.Generator().manual_seed(3)
    d, d_sae, k = 32, 512, 16
    w = {"W_enc": torch.randn(d, d_sae, generator=g), "b_enc": torch.randn(d_sae, generator=g) - 3,
         "W_dec": torch.randn(d_sae, d, generator=g), "b_dec": torch.zeros(d)}
    sae = SAE(SAEConfig(architecture="topk", d_in=d, d_sae=d_sae, k=k, metadata=Metadata(hook_name=HOOK)), w)
    dense, entries = LatentAccumulator(d_sae, top=5), LatentAccumulator(d_sae, top=5)
    start, dropped = 0, 0
    for rows in (300, 40, 257, 300):  # 40: fewer rows than the compiled selection takes
        x = torch.randn(rows, d, generator=g) * 3
        x[: rows // 2] *= 0.01  # rows near zero: b_enc alone, mostly negative, so some top-k entries are not > 0
        token = torch.arange(start, start + rows)
        start += rows
        with torch.no_grad():
            r, c, v = sae.encode_entries(x)
            f = sae.encode(x)
        r2, c2 = (f > 0).nonzero(as_tuple=True)
        assert torch.equal(r, r2) and torch.equal(c, c2) and torch.equal(v, f[r2, c2])
        dropped += rows * k - r.numel()  # top-k entries that are not positive are not activations
        dense.update(f, token)
        entries.update_entries(r, c, v, token)
    assert dropped > 0
    a, b = dense.result(), entries.result()
    assert a.n_tokens == b.n_tokens == start
    for name in ("count", "act_sum", "top_val", "top_idx", "hist_exp", "hist", "sample_key", "sample_val",
                 "sample_idx"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_accumulator_rescales_like_a_final_histogram():
    """Values that grow by many powers of two across batches: bins and samples merge exactly."""
    g = torch.Generator().manual_seed(0)
    acc = LatentAccumulator(3, top=4, n_bins=16, n_groups=4, per_group=2)
    rows, tok0 = [], 0
    for scale in (0.01, 0.5, 3.0, 1000.0, 2.0):
        f = torch.relu(torch.randn(50, 3, generator=g)) * scale
        t = torch.arange(tok0, tok0 + 50)
        acc.update(f, t)
        rows.append((f, t))
        tok0 += 50
    s = acc.result()
    f = torch.cat([r[0] for r in rows])
    t = torch.cat([r[1] for r in rows])
    for lat in range(3):
        v = f[:, lat]
        nz = v > 0
        e = math.frexp(float(v.max()))[1]
        bins = torch.floor(v[nz] * 2.0 ** (4 - e)).clamp(0, 15).long()
        assert s.hist[lat].tolist() == torch.bincount(bins, minlength=16).tolist()
        keys = sample_key(t[nz], torch.full((int(nz.sum()),), lat))
        for grp in range(4):
            m = (bins // 4) == grp
            want = sorted(t[nz][m][torch.argsort(keys[m])][:2].tolist())
            assert sorted(i for i in s.sample_idx[lat, grp].tolist() if i >= 0) == want


# ---------------------------------------------------------------------------------- a trained run
SWEEP = make_sweep({"name": "topk4", "architecture": "topk", "k": 4},
                   {"name": "relu", "architecture": "standard", "l1_coefficient": 0.5},
                   defaults={"lr": 1e-3, "d_sae": 48}, hook=HOOK, tokens=4096, batch_tokens=256, seed=1,
                   eval_tokens=1024, window_chunks=2, log_every_steps=8, dead_window_tokens=2048)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("run")
    url = base / "s.zarr"
    make_store(url, d=D, n_features=32, n_sequences=256, context_size=16, chunk_sequences=16)
    with single_thread():
        train_sweep(str(url), SWEEP, base / "run", progress=False)
    return base


def test_trained_run_matches_brute_force_and_writes_documented_files(trained):
    out = trained / "features"
    summary = write_features(trained / "run", out, tokens=1000, top=6, progress=False)
    # 63 sequences sampled evenly over the whole store (16 chunks of 16): four chunks (as few as hold
    # them) spread from the first to the last, read from their start
    ranges = [tuple(r) for r in summary["sequences"]]
    assert summary["range"] == "sampled" and summary["n_sequences"] == 63 == sum(b - a for a, b in ranges)
    assert ranges == [(0, 16), (80, 96), (160, 175), (240, 256)]
    assert summary["held_out_sequences"] + summary["training_sequences"] == 63
    assert (out / "index.html").is_file() and (out / "features.json").is_file()
    store = ActivationStore.open(trained / "s.zarr")
    for entry in summary["saes"]:
        sae = SAE.load_from_disk(trained / "run" / entry["name"])
        exp = brute_force(store, sae, 0, 0, top=6, ranges=ranges)
        blocks = sorted((out / entry["folder"] / "blocks").glob("*.json"))
        recs = [r for p in blocks for r in json.loads(p.read_text())["latents"]]
        assert len(recs) == entry["d_sae"] == 48
        for rec, e in zip(recs, exp):
            assert rec["n_fired"] == e["count"]
            got = [(x["seq"] * 16 + x["pos"], x["act"]) for x in rec["top"]]
            assert [i for i, _ in got] == [i for i, _ in e["top"]]
            assert [v for _, v in got] == pytest.approx([v for _, v in e["top"]], rel=1e-5)
            for x in rec["top"]:  # the window holds the activating token at "at"
                assert x["tokens"][x["at"]] == int(store.tokens[x["seq"], x["pos"]])
            if rec["n_fired"]:
                assert sum(q["n"] for q in rec["quantiles"]) <= rec["n_fired"]
                assert sum(rec["histogram"]["counts"]) == rec["n_fired"]
        assert entry["training_metrics"]["l0"] > 0


def test_logit_effects_and_vocab(trained, tmp_path):
    W_U = torch.randn(D, 50, generator=torch.Generator().manual_seed(0))

    class Tok:
        def decode(self, ids):
            return f"tok{ids[0]}"

    out = tmp_path / "f"
    summary = write_features(trained / "run", out, saes=["topk4"], tokens=300, progress=False,
                             unembedding=W_U, tokenizer=Tok())
    assert summary["saes"][0]["logit_effects"]
    sae = SAE.load_from_disk(trained / "run" / "topk4")
    rec = json.loads((out / "saes/topk4/blocks/00000.json").read_text())["latents"][7]
    eff = sae.W_dec[7] @ W_U
    assert [t for t, _ in rec["logits"]["positive"]] == eff.topk(10).indices.tolist()
    assert [t for t, _ in rec["logits"]["negative"]] == (-eff).topk(10).indices.tolist()
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab[str(rec["logits"]["positive"][0][0])] == f"tok{rec['logits']['positive'][0][0]}"


def test_bad_input_one_line(trained, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="holds no features output; choose another --out") as e:
        write_features(trained / "run", out, progress=False)
    assert "--overwrite" not in str(e.value)  # which would not replace it either: no hint that it might
    (out / "notes.txt").unlink()
    write_features(trained / "run", out, tokens=64, progress=False)  # an empty folder is the user's --out
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        write_features(trained / "run", out, progress=False)
    with pytest.raises(UserError, match="no SAE named 'nope'"):
        write_features(trained / "run", tmp_path / "a", saes=["nope"], progress=False)
    other = tmp_path / "wide.zarr"
    make_store(other, d=8, n_sequences=16, context_size=8, chunk_sequences=8)
    with pytest.raises(UserError, match="d_in 16 but the store's blocks.0.hook_resid_pre has width 8"):
        write_features(trained / "run", tmp_path / "b", store=str(other), progress=False)
    other_hook = tmp_path / "hook.zarr"
    make_store(other_hook, d=16, n_sequences=16, context_size=8, chunk_sequences=8, hooks=("blocks.1.hook_resid_post",))
    with pytest.raises(UserError, match="reads blocks.0.hook_resid_pre, which the store .* lacks"):
        write_features(trained / "run", tmp_path / "c", store=str(other_hook), progress=False)
    no_tokens = tmp_path / "notok.zarr"
    make_store(no_tokens, d=16, n_sequences=16, context_size=8, chunk_sequences=8)
    del ActivationStore.open(no_tokens, "r+").group["tokens"]
    with pytest.raises(UserError, match="tokens: missing .*run `actcache verify"):  # opening the store checks it
        write_features(trained / "run", tmp_path / "d", store=str(no_tokens), progress=False)
    assert not any((tmp_path / n).exists() for n in "abcd")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_whole_store_is_the_default_and_a_bound_samples_evenly(trained):
    store = ActivationStore.open(trained / "s.zarr")
    sel = choose_sequences(store, False, None)
    assert (sel.ranges, sel.what) == ([(0, 256)], "all")
    sel = choose_sequences(store, True, None)  # held-out only, none set aside: everything, with a warning
    assert (sel.ranges, sel.what) == ([(0, 256)], "all")
    sel = choose_sequences(store, True, None, {"held_out": [200, 240]})
    assert (sel.ranges, sel.what, sel.held_out_sequences()) == ([(200, 240)], "held-out", 40)
    store.held_out_range = lambda: (224, 256)  # what a store that sets sequences aside answers
    sel = choose_sequences(store, True, 64)
    assert (sel.ranges, sel.what) == ([(224, 228)], "held-out, sampled")  # 4 sequences: one chunk holds them
    sel = choose_sequences(store, False, 32 * 16)  # 32 sequences of 256: two whole chunks, the first and the last
    assert sel.what == "sampled" and sel.n_sequences == 32
    assert sel.ranges == [(0, 16), (240, 256)]
    assert sel.held_out_sequences() == 16  # chunks 14 and 15 are the held-out part
    sel = choose_sequences(store, False, 40 * 16)  # three chunks, spread from the first to the last
    assert sel.ranges == [(0, 13), (128, 142), (240, 253)]
    assert sel.n_sequences == 40 and sel.held_out_sequences() == 13  # of the last chunk, held out
    sel = choose_sequences(store, False, 254 * 16)  # all but two: every chunk, the last ones cut short
    assert sel.n_sequences == 254 and len(sel.ranges) == 16


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "actcache", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_command(trained, tmp_path):
    out = tmp_path / "cli"
    r = _cli("features", str(trained / "run"), "--out", str(out), "--tokens", "200", "--all", "--top", "3",
             "--sae", "relu", "--no-progress", "--no-logits")
    assert r.returncode == 0, r.stderr
    assert "relu" in r.stdout and (out / "index.html").is_file()
    data = json.loads((out / "features.json").read_text())
    assert [s["name"] for s in data["saes"]] == ["relu"] and data["top"] == 3
    r = _cli("features", str(trained / "run"), "--out", str(out), "--tokens", "200", "--all")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("actcache: error:") and "--overwrite" in r.stderr
    r = _cli("features", str(trained / "run"), "--out", str(out), "--tokens", "200", "--all", "--overwrite",
             "--no-progress", "--no-logits")
    assert r.returncode == 0, r.stderr


def test_command_loads_the_model_for_logit_effects(trained, tmp_path):
    """The top-level command hands the model loader over; the SAE's metadata.model_spec names the model."""
    from click.testing import CliRunner

    from actcache.cli import cli

    run = tmp_path / "run"
    shutil.copytree(trained / "run" / "topk4", run / "topk4")
    cfg = json.loads((run / "topk4" / "cfg.json").read_text())
    cfg["metadata"]["model_spec"] = "random:n_layers=1,d_model=16,n_heads=2,d_head=8,d_vocab=1000,n_ctx=16,seed=3"
    (run / "topk4" / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "f"
    r = CliRunner().invoke(cli, ["features", str(run), "--out", str(out), "--store", str(trained / "s.zarr"),
                                 "--tokens", "300", "--all", "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "topk4: d_sae 48" in r.output and ", logit effects" in r.output, r.output
    rec = json.loads((out / "saes/topk4/blocks/00000.json").read_text())["latents"][0]
    assert len(rec["logits"]["positive"]) == 10 and rec["logits"]["positive"][0][1] >= rec["logits"]["negative"][0][1]


def test_benchmark_reports_the_fraction_of_the_encoder_rate(tmp_path):
    from benchmarks import bench_features

    url = tmp_path / "b.zarr"
    make_store(url, d=D, n_sequences=32, context_size=16, chunk_sequences=8)
    r = bench_features.run(str(url), bench_features.synthetic_saes(D, 64, 4), tokens=400, repeats=1)
    assert r["tokens"] == 25 * 15  # 25 sequences, BOS left out
    assert r["encode_tokens_per_s"] > 0 and r["pass_tokens_per_s"] > 0
    assert r["pass_fraction_of_encode"] == pytest.approx(r["pass_tokens_per_s"] / r["encode_tokens_per_s"])
