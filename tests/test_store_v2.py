"""Stores of format version 2 stay readable, verifiable and resumable: tests/data/store-v2.zarr was written
by the release that wrote version 2 (a synthetic store of two hooks of widths 8 and 6, 20 sequences of 8
tokens in chunks of 8), and a version 2 store is also built here from a harvested one by a writer of the
version 2 layout of its own (six per-chunk statistics arrays and six summary arrays per hook). Every number
is checked against numpy and hashlib on the arrays themselves, read with plain zarr."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from actcache import HarvestConfig, harvest, info, verify
from actcache.common.errors import UserError
from actcache.common.info import format_info
from actcache.common.store import ActivationStore
from harvest_fixtures import HOOKS, RANDOM, ROOT, array_files, run_cli, write_token_jsonl

V2_STORE = ROOT / "tests" / "data" / "store-v2.zarr"
PROGRESS = ("n_chunks_committed", "complete", "package_version", "fingerprint", "planned_n_sequences",
            "n_clamped", "device")  # the manifest fields the fingerprint leaves out (docs/store-format.md)
PARTIAL = ("count", "sum", "sumsq", "norm_sum", "max_abs", "n_nonfinite")


# ------------------------------------------------------------------ independent computations
def manifest_of(path: Path) -> dict:
    return zarr.open_group(path, mode="r").attrs["actcache"]


def chunk_data(path: Path, j: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Tokens and every hook's activations of chunk j, read with plain zarr."""
    g, m = zarr.open_group(path, mode="r"), manifest_of(path)
    C, T = m["chunk_sequences"], m["context_size"]
    a, b = j * C, min((j + 1) * C, m["n_sequences"])
    return g["tokens"][a:b], {h["name"]: g["activations"][h["name"]][a * T:b * T] for h in m["hooks"]}


def digest(tokens: np.ndarray, acts: dict[str, np.ndarray], hooks: list[str]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(tokens.astype("<i4").tobytes())
    for name in hooks:
        h.update(name.encode() + b"\0" + acts[name].astype("<f2").tobytes())
    return h.digest()


def fingerprint(manifest: dict, digests: list[bytes]) -> str:
    ident = {k: v for k, v in manifest.items() if k not in PROGRESS}
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"".join(digests))
    return h.hexdigest()


def partials(x: np.ndarray) -> dict[str, np.ndarray]:
    a = x.astype(np.float64)
    return {"count": np.float64(len(a)), "sum": a.sum(0), "sumsq": (a * a).sum(0),
            "norm_sum": np.sqrt((a * a).sum(1)).sum(), "max_abs": np.abs(a).max(), "n_nonfinite": np.float64(0)}


def write_v2(src: Path, dest: Path, committed: int | None = None) -> str:
    """A version 2 store at dest with the data of the complete store at src, in the version 2 layout
    (written here with plain zarr): its fingerprint. committed: leave it as a harvest killed after that
    many commits (counter, no summary, no fingerprint, the chunks past it deleted)."""
    shutil.copytree(src, dest)
    shutil.rmtree(dest / "stats")
    m = dict(manifest_of(src))
    hooks = [h["name"] for h in m["hooks"]]
    n_chunks = -(-m["n_sequences"] // m["chunk_sequences"])
    data = [chunk_data(src, j) for j in range(n_chunks)]
    g = zarr.open_group(dest, mode="r+")
    stats = g.create_group("stats")
    for h in m["hooks"]:
        name, d = h["name"], h["d"]
        part = stats.create_group(name).create_group("chunks")
        rows = [partials(acts[name]) for _, acts in data]
        for f in PARTIAL:
            vec = f in ("sum", "sumsq")
            arr = part.create_array(f, shape=(n_chunks, d) if vec else (n_chunks,), chunks=(1, d) if vec else (1,),
                                    dtype="float64", fill_value=0.0, compressors=[zarr.codecs.Crc32cCodec()],
                                    dimension_names=("chunk", "d") if vec else ("chunk",),
                                    config={"write_empty_chunks": True})
            arr[:] = np.stack([r[f] for r in rows])
        x = np.concatenate([acts[name] for _, acts in data]).astype(np.float64)
        summary = {"count": np.float64(len(x)), "mean": x.mean(0), "var": x.var(0),
                   "mean_norm": np.sqrt((x * x).sum(1)).mean(), "max_abs": np.abs(x).max(), "n_nonfinite": 0.0}
        for key, v in summary.items():
            v = np.asarray(v, dtype=np.float64)
            stats[name].create_array(key, shape=v.shape, dtype="float64", fill_value=0.0,
                                     dimension_names=("d",) if v.ndim else (),
                                     config={"write_empty_chunks": True})[...] = v
    m["format_version"] = 2
    fp = fingerprint(m, [digest(t, a, hooks) for t, a in data])
    m["fingerprint"] = fp
    if committed is not None:
        m.update(n_chunks_committed=committed, complete=False, fingerprint=None)
        for h in hooks:
            for key in ("count", "mean", "var", "mean_norm", "max_abs", "n_nonfinite"):
                shutil.rmtree(dest / "stats" / h / key)
        for f in dest.rglob("c/*"):  # chunk keys c/<j>[/0]: every chunk past the counter
            if f.is_dir() and f.name.isdigit() and int(f.name) >= committed:
                shutil.rmtree(f)
            elif f.is_file() and f.name.isdigit() and f.parent.name == "c" and int(f.name) >= committed:
                f.unlink()
    g.attrs["actcache"] = m
    return fp


# ------------------------------------------------------------------ the store the previous release wrote
@pytest.fixture()
def v2(tmp_path) -> Path:
    shutil.copytree(V2_STORE, tmp_path / "v2.zarr")
    return tmp_path / "v2.zarr"


def test_a_version_2_store_is_read_as_before(v2):
    m = manifest_of(v2)
    assert m["format_version"] == 2 and m["complete"]
    hooks = [h["name"] for h in m["hooks"]]
    data = [chunk_data(v2, j) for j in range(3)]
    store = ActivationStore.open(v2)
    assert not store.layout.packed_stats
    for j, (tokens, acts) in enumerate(data):
        np.testing.assert_array_equal(store.read_tokens(j), tokens)
        for h in hooks:
            np.testing.assert_array_equal(store.read_chunk(h, j), acts[h])
    assert store.fingerprint == fingerprint(m, [digest(t, a, hooks) for t, a in data])
    g = zarr.open_group(v2, mode="r")
    for h in hooks:
        x = np.concatenate([a[h] for _, a in data]).astype(np.float64)
        s = store.stats(h)
        assert s["count"] == len(x) == g["stats"][h]["count"][()]
        np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s["var"], x.var(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(s["mean_norm"], np.linalg.norm(x, axis=1).mean(), rtol=1e-9)
        assert s["max_abs"] == np.abs(x).max() and s["n_nonfinite"] == 0
        sumsq = store.partial_rows(h, "sumsq", [0, 2])  # what training's normalisation reads
        want = np.stack([(a[h].astype(np.float64) ** 2).sum(0) for _, a in (data[0], data[2])])
        np.testing.assert_allclose(sumsq, want, rtol=1e-12)
    rep = verify(v2)
    assert rep.ok and rep.fingerprint == m["fingerprint"] and rep.chunks_checked == 3, rep.summary()
    d = info(v2)
    assert d["n_tokens"] == 160 and d["hooks"][hooks[1]]["d"] == 6 and d["hooks"][hooks[0]]["count"] == 160
    assert "(format 2," in format_info(d) and m["fingerprint"] in format_info(d)


@pytest.mark.parametrize("damage", ["per-chunk statistic", "summary", "activation value"])
def test_verify_finds_damage_in_a_version_2_store(v2, capfd, damage):
    hook = manifest_of(v2)["hooks"][1]["name"]
    if damage == "per-chunk statistic":
        (v2 / "stats" / hook / "chunks" / "sum" / "c" / "1" / "0").unlink()
        want = f"stats/{hook}/chunks/sum chunk 1: missing"
        code, _, err = run_cli(["info", str(v2)], capfd)
        assert code == 2 and f"chunk 1 of stats/{hook}/chunks/sum in {v2} is committed but missing" in err, err
    elif damage == "summary":
        (v2 / "stats" / hook / "mean" / "c" / "0").unlink()
        want = f"stats/{hook}/mean: missing (it would read as zeros)"
    else:
        a = zarr.open_array(v2 / "activations" / hook, mode="r+")  # a valid chunk: only the digest and stats tell
        a[3, 2] = np.float16(a[3, 2]) + np.float16(0.5)
        want = "chunk 0: its data does not match the digest written with it"
    code, out, _ = run_cli(["verify", str(v2)], capfd)
    assert code == 1 and want in out, out


# ------------------------------------------------------------------ resuming
def test_a_version_2_store_is_resumed_in_its_own_layout(tmp_path):
    """A version 2 store killed after its first commit, resumed by this version: it is finished as version
    2 (six per-chunk arrays per hook, the summary as arrays), every chunk equal to the uninterrupted version 2
    store's, with its fingerprint."""
    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=80)
    cfg = dict(hooks=HOOKS[:2], model=RANDOM, dataset=str(data), context_size=32, tokens=20 * 32, batch_size=4,
               chunk_sequences=8, device="cpu")
    harvest(HarvestConfig(out=str(tmp_path / "v3.zarr"), **cfg), progress=False)
    full_fp = write_v2(tmp_path / "v3.zarr", tmp_path / "full.zarr")
    write_v2(tmp_path / "v3.zarr", tmp_path / "killed.zarr", committed=1)
    out = tmp_path / "killed.zarr"
    assert ActivationStore.open(out).n_committed == 1 and not (out / "tokens" / "c" / "2").exists()

    res = harvest(HarvestConfig(out=str(out), resume=True, **cfg), progress=False)
    assert res.resumed_from_chunk == 1
    m = manifest_of(out)
    assert m["format_version"] == 2 and m["complete"] and m["fingerprint"] == full_fp
    assert not (out / "stats" / "chunks").exists()
    want, got = array_files(tmp_path / "full.zarr"), array_files(out)
    data_files = [k for k in want if k.startswith(("tokens/", "activations/", "digests/")) and "/c/" in k]
    assert len(data_files) == 3 * 4 and all(got.get(k) == want[k] for k in data_files)
    g, full = zarr.open_group(out, mode="r"), zarr.open_group(tmp_path / "full.zarr", mode="r")
    for h in HOOKS[:2]:
        for f in PARTIAL:  # the partial sums of the resumed chunks, in their version 2 arrays
            np.testing.assert_allclose(g["stats"][h]["chunks"][f][:], full["stats"][h]["chunks"][f][:], rtol=1e-12)
        for key in ("count", "mean", "var", "mean_norm", "max_abs", "n_nonfinite"):
            np.testing.assert_allclose(g["stats"][h][key][...], full["stats"][h][key][...], rtol=1e-9, atol=1e-12)
    rep = verify(out)
    assert rep.ok and rep.fingerprint == full_fp, rep.summary()


def test_a_version_1_store_is_not_resumed(tmp_path, capfd):
    data = write_token_jsonl(tmp_path / "toks.jsonl", n_docs=40)
    cfg = dict(hooks=HOOKS[:1], model=RANDOM, dataset=str(data), context_size=32, tokens=12 * 32, batch_size=4,
               chunk_sequences=4, device="cpu")
    harvest(HarvestConfig(out=str(tmp_path / "v3.zarr"), **cfg), progress=False)
    out = tmp_path / "v1.zarr"
    write_v2(tmp_path / "v3.zarr", out, committed=1)
    g = zarr.open_group(out, mode="r+")
    m = dict(g.attrs["actcache"])
    m["format_version"] = 1
    g.attrs["actcache"] = m
    del g["digests"]
    before = array_files(out)
    with pytest.raises(UserError, match=r"cannot resume .*format 1 store.*release that started it.*--overwrite"):
        harvest(HarvestConfig(out=str(out), resume=True, **cfg), progress=False)
    assert array_files(out) == before
