"""One suite of store tests run against every place a store can live: a local compressed store, a local
uncompressed one that is read through memory maps (`--codec none`), and a store on a real S3 server on
loopback (moto). Write and read back, resume after an interruption, damaged chunks, and the lease that
keeps a second writer out."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from actcache import HarvestConfig, harvest, info, verify
from actcache.common import location, outputs
from actcache.common.errors import StoreError
from actcache.common.lease import Lease, LeaseHeld, LeaseLost
from actcache.common.manifest import DatasetInfo, HookInfo, Manifest, ModelInfo, TokenizerInfo
from actcache.common.store import ActivationStore, chunk_stats
from harvest_fixtures import HOOKS, RANDOM, env, write_token_jsonl
from test_store_format import damage_chunk

HOOK = "blocks.0.hook_resid_pre"
BACKENDS = ("local", "mmap", "s3")


class Backend:
    """Where the stores of one test live, and how to reach a stored chunk behind the store's back."""

    def __init__(self, kind: str, root: str, s3=None):
        self.kind, self.root, self.s3 = kind, root, s3
        self.codec = "none" if kind == "mmap" else "zstd-3"

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    @property
    def env(self) -> dict[str, str]:
        return {**env(), **(self.s3.env if self.s3 else {})}

    def _key(self, url: str, array: str, j: int) -> tuple[str, str]:
        bucket, prefix = url[len("s3://"):].split("/", 1)
        return bucket, f"{prefix}/{array}/c/{j}/0"  # zarr v3's default chunk key: c/<row chunk>/<col chunk>

    def copy(self, src: str, dst: str) -> None:
        """Copy a store object by object (file by file), as a user copying it would."""
        if self.s3 is None:
            shutil.copytree(src, dst)
            return
        c = self.s3.client
        sb, sp = src[len("s3://"):].split("/", 1)
        db, dp = dst[len("s3://"):].split("/", 1)
        for page in c.get_paginator("list_objects_v2").paginate(Bucket=sb, Prefix=sp + "/"):
            for o in page.get("Contents", []):
                c.copy_object(CopySource={"Bucket": sb, "Key": o["Key"]}, Bucket=db, Key=dp + o["Key"][len(sp):])

    def damage(self, url: str, array: str, j: int, how: str) -> None:
        """Delete a stored chunk, cut it in half, flip one bit of it, or empty it."""
        if self.s3 is None:
            damage_chunk(Path(url) / array / "c" / str(j) / "0", how)
            return
        c, (bucket, key) = self.s3.client, self._key(url, array, j)
        raw = c.get_object(Bucket=bucket, Key=key)["Body"].read()
        if how == "deleted":
            c.delete_object(Bucket=bucket, Key=key)
            return
        new = {"truncated": raw[: len(raw) // 2], "flipped byte": raw[:20] + bytes([raw[20] ^ 0x10]) + raw[21:],
               "empty": b""}[how]
        c.put_object(Bucket=bucket, Key=key, Body=new)


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> Backend:
    if request.param == "s3":
        s3 = request.getfixturevalue("s3")
        return Backend("s3", s3.url, s3)
    return Backend(request.param, str(tmp_path))


def _manifest(codec: str) -> Manifest:
    return Manifest(
        model=ModelInfo("random:test", d_model=8, n_layers=1, n_ctx=16),
        tokenizer=TokenizerInfo(), dataset=DatasetInfo(path="synthetic"),
        hooks=[HookInfo(HOOK, 8)], context_size=4, prepend_bos=False, seed=0,
        n_sequences=6, chunk_sequences=4, codec=codec, batch_size=2,
    )


def _write(url: str, codec: str) -> list[np.ndarray]:
    """A store of 6 sequences in chunks of 4 (the last chunk holds 2), written and committed chunk by chunk."""
    store = ActivationStore.create(url, _manifest(codec))
    rng = np.random.default_rng(0)
    written = []
    for j in range(store.n_chunks):
        a, b = store.chunk_sequence_range(j)
        x = rng.standard_normal(((b - a) * 4, 8)).astype(np.float16)
        written.append(x)
        store.write_chunk(j, np.full((b - a, 4), j, np.int32), {HOOK: x}, {HOOK: chunk_stats(x)})
        store.commit(j + 1)
    store.finalize()
    return written


# ------------------------------------------------------------------------------------- write and read
def test_a_store_round_trips(backend):
    url = backend.url("roundtrip.zarr")
    assert not location.exists(url)
    written = _write(url, backend.codec)

    again = ActivationStore.open(url)
    assert again.manifest.complete and again.n_committed == 2 and again.manifest.codec == backend.codec
    for j, x in enumerate(written):
        got = again.read_chunk(HOOK, j)
        assert got.dtype == np.float16 and got.shape == x.shape
        np.testing.assert_array_equal(got.view(np.uint16), x.view(np.uint16))  # bit for bit
        np.testing.assert_array_equal(again.read_tokens(j), np.full((len(x) // 4, 4), j, np.int32))
    allx = np.concatenate(written).astype(np.float64)
    np.testing.assert_allclose(again.stats(HOOK)["mean"], allx.mean(0), rtol=1e-9, atol=1e-12)
    assert again.nbytes_stored("activations") > 0
    # only an uncompressed local store is read through memory maps; the others decode through zarr
    mapped = again.mapped_chunks(f"activations/{HOOK}")
    assert (mapped is not None) == (backend.kind == "mmap")
    if mapped is not None:
        x = again.read_chunk(HOOK, 0)
        assert not x.flags.writeable and not x.flags.owndata  # a view of the mapped file, read-only
    assert verify(url).ok

    outputs.remove_output(url, outputs.STORE)  # --overwrite's deletion, on every backend
    assert not location.exists(url)


# ------------------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    return write_token_jsonl(tmp_path_factory.mktemp("data") / "toks.jsonl", n_docs=30)


def _harvest_config(out: str, data: Path, codec: str, **kw) -> HarvestConfig:
    return HarvestConfig(out=out, hooks=HOOKS[:2], model=RANDOM, dataset=str(data), context_size=32,
                         tokens=12 * 32, batch_size=4, chunk_sequences=4, device="cpu", codec=codec, **kw)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def uninterrupted(token_file, tmp_path_factory):
    """codec -> (path, result) of an uninterrupted local harvest, made once per codec for the module."""
    made = {}

    def get(codec: str):
        if codec not in made:
            path = tmp_path_factory.mktemp("reference") / "acts.zarr"
            made[codec] = (path, harvest(_harvest_config(str(path), token_file, codec), progress=False))
        return made[codec]
    return get


def test_an_interrupted_harvest_resumes_to_the_same_store(backend, token_file, uninterrupted, monkeypatch):
    """Stopped before the third chunk's commit, with that uncommitted chunk then damaged: --resume
    rewrites it and the store equals an uninterrupted harvest (a local one, here), value for value."""
    ref_path, ref = uninterrupted(backend.codec)
    url = backend.url("resumed.zarr")

    commit = ActivationStore.commit

    def stop_at_the_third(self, n, *a, **k):
        if n == 3:
            raise Stop("interrupted")
        return commit(self, n, *a, **k)

    monkeypatch.setattr(ActivationStore, "commit", stop_at_the_third)
    with pytest.raises(Exception) as e:
        harvest(_harvest_config(url, token_file, backend.codec), progress=False)
    assert "interrupted" in str(e.value)
    monkeypatch.setattr(ActivationStore, "commit", commit)
    cut = ActivationStore.open(url, check=False)
    assert cut.n_committed == 2 and not cut.manifest.complete
    assert location.exists(f"{url}/activations/{HOOKS[0]}/c/2/0")  # written before the commit that failed
    backend.damage(url, f"activations/{HOOKS[0]}", 2, "flipped byte")  # garbage past the counter

    res = harvest(_harvest_config(url, token_file, backend.codec, resume=True), progress=False)
    assert res.n_tokens == ref.n_tokens and res.tokens_this_run < ref.n_tokens
    assert res.activation_bytes == ref.activation_bytes and info(url)["n_tokens"] == 12 * 32
    a, b = ActivationStore.open(url), ActivationStore.open(ref_path)
    assert a.manifest.complete and a.fingerprint == b.fingerprint is not None
    np.testing.assert_array_equal(a.tokens[:], b.tokens[:])
    for h in HOOKS[:2]:
        np.testing.assert_array_equal(a.activations(h)[:].view(np.uint16), b.activations(h)[:].view(np.uint16))
    assert verify(url).ok
    again = harvest(_harvest_config(url, token_file, backend.codec, resume=True), progress=False)
    assert again.tokens_this_run == 0  # complete already


# ------------------------------------------------------------------------------------------- damage
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A store written once per backend for the damage tests, each of which damages a copy of it."""
    made = {}

    def get(backend: Backend) -> str:
        if backend.kind not in made:
            root = backend.root if backend.s3 else str(tmp_path_factory.mktemp("pristine"))
            made[backend.kind] = f"{root}/pristine-{backend.kind}.zarr"
            _write(made[backend.kind], backend.codec)
        return made[backend.kind]
    return get


@pytest.mark.parametrize("array", ["activations", "tokens"])
@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped byte", "empty"])
def test_a_damaged_committed_chunk_is_one_store_error_line(backend, pristine, damage, array):
    url = backend.url("damaged.zarr")
    backend.copy(pristine(backend), url)
    assert verify(url).ok
    name = f"activations/{HOOK}" if array == "activations" else "tokens"
    backend.damage(url, name, 0, damage)
    store = ActivationStore.open(url)  # open() reads no chunk data
    store.read_chunk(HOOK, 1)  # the intact chunk still reads
    with pytest.raises(StoreError) as e:
        store.read_chunk(HOOK, 0) if array == "activations" else store.read_tokens(0)
    msg = str(e.value)
    assert "\n" not in msg and f"chunk 0 of {name} in " in msg and "actcache verify" in msg
    assert ("committed but missing" in msg) == (damage == "deleted")
    rep = verify(url)
    assert not rep.ok and rep.problems


# -------------------------------------------------------------------------------------------- lease
HOLD = textwrap.dedent("""
    import sys, time
    from actcache.common.lease import Lease
    lease = Lease.acquire(sys.argv[1], "harvest", takeover=True, ttl=float(sys.argv[2]))
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_second_writer_is_refused_until_the_holder_dies_then_resume_takes_over(backend):
    """A live holder (a real process) is named; once it is killed a plain rerun is told to --resume,
    which takes the lease over; released cleanly, the next writer needs no takeover."""
    url = backend.url("leased.zarr")
    p = subprocess.Popen([sys.executable, "-c", HOLD, url, "60"], stdout=subprocess.PIPE, text=True, env=backend.env)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld, match=f"pid {p.pid} on "):
            Lease.acquire(url, "harvest", takeover=True)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with pytest.raises(LeaseHeld, match="stopped without finishing.*--resume"):
        Lease.acquire(url, "harvest", takeover=False)
    lease = Lease.acquire(url, "harvest", takeover=True)
    lease.check()
    if backend.s3 is not None:  # a writer that lost its lease to another is stopped before its next commit
        other = Lease(url, "harvest")
        other._write_remote()
        with pytest.raises(LeaseLost, match="taken over"):
            lease.check()
        other.release()
    else:
        lease.release()
    Lease.acquire(url, "harvest").release()
