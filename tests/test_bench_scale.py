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


def test_benchmark_runs_end_to_end_at_toy_sizes_on_disk_and_on_s3(tmp_path):
    """Every step on a local store, then on a loopback S3 server that counts requests (a chunk of a
    one-hook store is written as 4 objects: tokens, activations, digest, statistics)."""
    pytest.importorskip("moto.server")
    res = tmp_path / "results"
    work = tmp_path / "work"
    bench_scale.main(["--sizes", "4096", "--d-model", "32", "--vocab", "300", "--ctx", "32", "--harvest-batch", "8",
                      "--train-tokens", "2048", "--train-batch", "512", "--features-tokens", "2048",
                      "--loader-tokens", "2048", "--work", str(work), "--results", str(res), "--suffix=-toy",
                      "--storage", "local,s3"])
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
    md = js.with_suffix(".md").read_text()
    assert md.startswith("# Scale benchmark") and "S3 store of 4,096 tokens" in md
    assert js.with_suffix(".png").stat().st_size > 1000
    assert list(work.iterdir()) == []  # the stores and runs are removed once measured
