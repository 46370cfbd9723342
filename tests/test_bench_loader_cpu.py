"""The loader benchmark end to end at a toy size: every side measured in a process of its own, the
ratios, the loader's CPU split by thread, SAELens's side reading a cache written in its
own format from the store's rows, and nothing it built left behind."""

import json

from benchmarks import bench_loader_cpu


def test_loader_benchmark_runs_end_to_end_with_saelens(tmp_path, saelens_python, capsys):
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "r.json"
    r = bench_loader_cpu.main(["--tokens", "32768", "--rounds", "1", "--work", str(work), "--saelens-python",
                               saelens_python, "--out", str(out)])
    assert json.loads(out.read_text()) == r
    assert r["store"]["tokens"] == 32768 and r["store"]["d"] == 768
    cache = r["saelens_cache"]
    assert cache["tokens"] == 32768 and cache["bytes"] >= 32768 * 768 * 2  # float16, uncompressed
    for side in ("raw", "raw_zarr", "decode_into", "decode_convert", "loader", "saelens"):
        runs = r["runs"][side]
        assert [m["round"] for m in runs] == [0]
        assert all(m["tokens"] >= 4096 and m["cpu_s"] > 0 and m["wall_s"] > 0 for m in runs)
        assert r["summary"][side]["peak_rss_gib"] >= r["summary"][side]["rss_before_timing_gib"] > 0
    assert set(r["ratios"]) >= {"loader / raw, per cpu-second", "loader / saelens, per wall-second"}
    assert r["ceiling"]["decode_convert / raw, per CPU-second"]["median"] > 0
    roles = r["loader_profile"]["cpu_s_by_thread_role"]
    assert roles["readers (fetch + decode into the window)"] > 0
    assert list(work.iterdir()) == []  # the store and the cache it built are gone
