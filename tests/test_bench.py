"""The benchmark harness: codec measurement and choice, the goal table, and SAELens's side run
for real in its own environment on a tiny store (skipped, saying why, when that environment is absent)."""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks import codecs as bc
from benchmarks import run as br

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_codec_measure_round_trips_and_sees_redundancy():
    rng = np.random.default_rng(0)
    # sparse, MLP-like values compress; uniformly random bit patterns do not
    g = rng.standard_normal((2048, 64))
    smooth = (g * (g > 1.0)).astype(np.float16)
    noise = rng.integers(0, 2**16, size=(2048, 64), dtype=np.uint16)
    noise &= 0x7BFF  # finite float16 bit patterns only
    rows = bc.measure(smooth, ["none", "zstd-3", "blosc-zstd-5"], repeats=1)
    by = {r["codec"]: r for r in rows}
    assert by["none"]["ratio"] == pytest.approx(1.0, abs=0.01)
    assert by["blosc-zstd-5"]["ratio"] > 1.2
    assert all(r["decode_MB_s"] > 0 and r["encode_MB_s"] > 0 for r in rows)
    noisy = {r["codec"]: r for r in bc.measure(noise.view(np.float16), ["zstd-3"], repeats=1)}
    assert noisy["zstd-3"]["ratio"] < by["zstd-3"]["ratio"]


def test_codec_choice_rule():
    s = [
        {"codec": "none", "ratio": 1.0, "decode_MB_s": 3000},
        {"codec": "lz4", "ratio": 0.996, "decode_MB_s": 2800},  # saves nothing: never the default
        {"codec": "zstd-1", "ratio": 1.09, "decode_MB_s": 800},
        {"codec": "blosc-zstd-5", "ratio": 1.16, "decode_MB_s": 1200},
    ]
    assert bc.choose(s) == "blosc-zstd-5"
    # decode speed ranks first: a better ratio that decodes at half the speed loses
    s2 = [dict(x) for x in s]
    s2[2].update(ratio=1.30, decode_MB_s=500)
    assert bc.choose(s2) == "blosc-zstd-5"
    # within 0.8x of the fastest, the ratio decides
    s2[2].update(decode_MB_s=1000)
    assert bc.choose(s2) == "zstd-1"
    assert bc.choose(s[:2]) == "none"


def test_default_codec_is_what_the_rule_picks_from_the_measurements():
    """The default is recomputed from the committed per-run measurements with the current rule:
    changing the default, the rule or the data without the others fails here."""
    from actcache.common.codecs import DEFAULT_CODEC

    measured = json.loads((ROOT / "benchmarks" / "results" / "codecs-smollm2.json").read_text())
    rows = measured["rows"]
    assert len({r["hook"] for r in rows}) >= 2 and all(r["stored_bytes"] > 0 and r["decode_MB_s"] > 0 for r in rows)
    summary = bc.summarise(rows)
    assert len(summary) >= 4 and DEFAULT_CODEC in {s["codec"] for s in summary}
    assert bc.choose(summary) == DEFAULT_CODEC == measured["choice"]
    for mine, stored in zip(summary, measured["summary"], strict=True):  # the committed summary is these rows'
        assert mine["codec"] == stored["codec"] and mine["ratio"] == pytest.approx(stored["ratio"], rel=1e-9)


def test_sweep_config_is_the_eight_topk_grid():
    raw = tomllib.loads(br.sweep_toml(br.QUICK))
    assert raw["grid"] == {"k": [16, 32, 64, 128], "expansion": [8, 16]}
    assert raw["defaults"]["architecture"] == "topk" and raw["tokens"] == br.QUICK.sweep_tokens
    from actcache.train.config import parse_config

    cfg = parse_config(raw)
    assert sorted((s.k, s.expansion) for s in cfg.saes) == sorted(br.CONFIGS)


def _result(**ours):
    return {
        "ours": {"harvest": {"1hook": {"ratio_vs_bare": 0.95, "harvest_tokens_per_s": 700.0, "bytes_per_token": 1000.0},
                             "4hooks": {"status": "missing", "error": "ImportError"}},
                 "loader": {"ratio": 0.5, "loader_tokens_per_s": 2e6, "raw_tokens_per_s": 4e6},
                 "sweep": {"seconds": 10.0}, "store": {"seconds": 5.0}, **ours},
        "saelens": {"harvest": {"cache_1hook_tokens_per_s": 400.0, "cache_4hooks_tokens_per_s": 100.0,
                                "cache_bytes_per_token": 1160.0},
                    "loader": {"tokens_per_s": 5e5}, "sweep_cached": {"seconds": 30.0},
                    "sweep_onthefly": {"seconds": 90.0},
                    "eval": {"topk-k16-x8@/w/saes_cached": {"explained_variance": 0.80, "l0": 16, "dead_fraction": 0.1},
                             "topk-k16-x8@/w/ours_saes": {"explained_variance": 0.785, "l0": 16, "dead_fraction": 0.0},
                             "topk-k32-x8@/w/saes_cached": {"explained_variance": 0.85, "l0": 32, "dead_fraction": 0.1}}},
    }


def test_ratios_against_the_goals():
    r = _result()
    r["parity"] = br.parity(r)
    rows = {row["benchmark"]: row for row in br.ratios(r)}
    assert rows["harvest 1hook: ours / bare forward"]["met"] is True
    assert rows["harvest 1hook: ours / SAELens CacheActivationsRunner"]["value"] == pytest.approx(1.75)
    assert rows["harvest 4hooks: ours / bare forward"]["met"] is None  # not measured, not a pass
    assert rows["bytes per token: ours / SAELens float16 cache"]["met"] is True
    assert rows["loader: ours / raw read+decode"]["met"] is False
    assert rows["loader: ours / SAELens ActivationsStore (cached)"]["value"] == pytest.approx(4.0)
    assert rows["sweep (8 TopK): SAELens from cache, one by one / ours lockstep"]["value"] == pytest.approx(3.0)
    assert rows["sweep (8 TopK): SAELens on the fly / ours (harvest + lockstep)"]["value"] == pytest.approx(6.0)
    assert rows["sweep (8 TopK): SAELens on the fly / ours (harvest + lockstep)"]["met"] is False
    gap = rows["quality topk-k16-x8: EV ours - SAELens"]
    assert gap["value"] == pytest.approx(-0.015) and gap["met"] is False
    assert rows["quality topk-k32-x8: EV ours - SAELens"]["met"] is None  # no SAE of ours to compare
    r["ratios"] = list(rows.values())
    r.update(meta={"date": "d", "host": "h", "quick": True, "cpu": "c", "cores": 2, "torch": "t", "codec": "x",
                   "command": "make bench-quick"}, plan={"hook": "h", "sweep_tokens": 1, "batch_size": 1, "lr": 1},
             gpu=br.gpu_info())
    md = br.markdown(r)
    assert "| loader: ours / raw read+decode | 0.500 | ≥ 0.90 | **no** |" in md
    assert "ours/harvest/4hooks: missing" in md
    assert "no GPU available" in md  # the tests hide every GPU (conftest)


def test_gpu_info_says_what_torch_sees(monkeypatch):
    import torch

    assert br.gpu_info() == {"available": False, "note": br.gpu_info()["note"]}
    assert "no GPU available" in br.gpu_info()["note"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Test GPU 80GB")
    info = br.gpu_info()
    assert info["available"] is True and info["device"] == "Test GPU 80GB" and "no GPU" not in info["note"]


def test_quick_run_is_a_labelled_smoke_test_that_leaves_the_full_results_alone():
    """`make bench-quick` writes under results/quick/ with a title saying so; latest.md is the full run."""
    plan = br.results_paths(Path("res"), "2026-01-01", "h", quick=True)
    assert plan["json"].parent == Path("res/quick") and plan["latest"] is None
    full = br.results_paths(Path("res"), "2026-01-01", "h", quick=False)
    assert full["latest"] == Path("res/latest.md") and full["json"] == Path("res/2026-01-01-h.json")
    r = _result()
    r["parity"] = br.parity(r)
    r["ratios"] = br.ratios(r)
    r.update(meta={"date": "d", "host": "h", "quick": True, "cpu": "c", "cores": 2, "torch": "t", "codec": "x",
                   "command": "make bench-quick"}, plan={"hook": "h", "sweep_tokens": 1, "batch_size": 1, "lr": 1},
             gpu=br.gpu_info())
    assert br.markdown(r).splitlines()[0].startswith("# Smoke test")
    r["meta"]["quick"] = False
    assert not br.markdown(r).startswith("# Smoke test")


def test_sae_folder_format_version_is_the_sae_lens_the_tests_load_folders_with(saelens_python):
    """train/sae.py names the SAELens release whose folder format it writes; the sae-lens environment
    the tests load our folders with, and the Makefile that builds it, must be that release."""
    from actcache.common.sae import SAELENS_FORMAT_VERSION

    p = subprocess.run([saelens_python, "-c", "import importlib.metadata as m; print(m.version('sae-lens'))"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == SAELENS_FORMAT_VERSION
    assert re.search(r"sae-lens==([\w.]+)", (ROOT / "Makefile").read_text()).group(1) == SAELENS_FORMAT_VERSION


def _tiny_store(path: Path, n_seq: int, seed: int, d: int = 16, ctx: int = 16) -> None:
    """A real actcache store of planted sparse activations (a few directions, a few active each)."""
    from actcache.common.manifest import DatasetInfo, HookInfo, Manifest, ModelInfo, TokenizerInfo
    from actcache.common.store import ActivationStore, chunk_stats

    rng = np.random.default_rng(seed)
    dirs = np.random.default_rng(99).standard_normal((32, d))
    codes = rng.exponential(1.0, (n_seq * ctx, 32)) * (rng.random((n_seq * ctx, 32)) < 0.1)
    x = (codes @ dirs).astype(np.float16)
    toks = rng.integers(3, 100, (n_seq, ctx)).astype(np.int32)
    m = Manifest(model=ModelInfo("random"), tokenizer=TokenizerInfo(), dataset=DatasetInfo(),
                 hooks=[HookInfo("blocks.0.hook_resid_post", d)], context_size=ctx, prepend_bos=False, seed=0,
                 n_sequences=n_seq, chunk_sequences=n_seq, codec="blosc-zstd-5", batch_size=4)
    s = ActivationStore.create(str(path), m)
    s.write_chunk(0, toks, {"blocks.0.hook_resid_post": x}, {"blocks.0.hook_resid_post": chunk_stats(x)})
    s.commit(1)
    s.finalize()


def test_saelens_side_trains_from_our_store_and_evaluates(tmp_path, saelens_python):
    py = saelens_python
    _tiny_store(tmp_path / "train.zarr", 512, seed=1)
    _tiny_store(tmp_path / "eval.zarr", 16, seed=2)
    toks = np.random.default_rng(0).integers(3, 100, (512, 16)).astype(np.int32)
    np.save(tmp_path / "toks.npy", toks)
    shape = {"n_layers": 1, "d_model": 16, "d_head": 4, "n_heads": 4, "n_key_value_heads": 2, "d_mlp": 32,
             "d_vocab": 100, "n_ctx": 32, "rotary_dim": 4}
    cmd = [py, str(ROOT / "benchmarks" / "saelens_side.py"), "--tokens", str(tmp_path / "toks.npy"),
           "--parts", "harvest,loader,sweep,onthefly,multi,eval", "--shape", json.dumps(shape),
           "--hook", "blocks.0.hook_resid_post", "--hooks4", "blocks.0.hook_resid_post,blocks.0.hook_mlp_out",
           "--model-batch", "4", "--harvest-tokens", "256", "--loader-batches", "3",
           "--store", str(tmp_path / "train.zarr"), "--eval-store", str(tmp_path / "eval.zarr"),
           "--configs", "4x2", "--sweep-tokens", "8192", "--onthefly-tokens", "2048", "--batch-size", "64",
           "--lr", "3e-3", "--work", str(tmp_path / "work"), "--json", str(tmp_path / "out.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((tmp_path / "out.json").read_text())
    assert "random" in r["model_note"]
    h = r["harvest"]
    assert h["cache_1hook"]["tokens"] == 256 and h["cache_bytes_per_token"] >= 16 * 2
    assert len(h["cache_4hooks_runs"]) == 2 and h["bare_1hook_tokens_per_s"] > 0
    assert r["loader"]["tokens_per_s"] > 0
    assert [x["name"] for x in r["sweep_cached"]["runs"]] == ["topk-k4-x2"]
    assert r["sweep_onthefly"]["seconds"] > 0
    # MultiSAETrainingRunner: the same configuration from one forward pass per batch, scored beside it
    assert [x["name"] for x in r["sweep_multi"]["runs"]] == ["topk-k4-x2"] and r["sweep_multi"]["seconds"] > 0
    assert sorted(k.split("@")[1].rsplit("/", 1)[1] for k in r["eval"]) == ["saes_cached", "saes_multi"]
    multi_ev = next(v for k, v in r["eval"].items() if k.endswith("saes_multi"))
    assert multi_ev["l0"] == pytest.approx(4.0) and -1.0 < multi_ev["explained_variance"] < 1.0
    # the planted store comes from no model: the multi SAE learnt its model's activations, not the store's
    assert r["model_check"]["same_model"] is False and multi_ev["other_model"] is True
    ev = next(v for k, v in r["eval"].items() if k.startswith("topk-k4-x2@") and k.endswith("saes_cached"))
    assert ev["l0"] == pytest.approx(4.0)
    assert ev["eval_tokens"] == 256
    # 128 steps on planted sparse data: far above a constant predictor (0), so the SAE folder, its
    # folded normalisation and the evaluator agree
    assert ev["explained_variance"] > 0.5, ev


def test_a_second_full_run_the_same_day_keeps_the_first_report(tmp_path):
    """The docs quote reports by file name: a later run the same day goes to -run2, -run3, never over them."""
    first = br.results_paths(tmp_path, "2026-01-01", "h", quick=False, kind="sweep4096")
    assert first["md"] == tmp_path / "2026-01-01-h-sweep4096.md"
    first["md"].write_text("first")
    second = br.results_paths(tmp_path, "2026-01-01", "h", quick=False, kind="sweep4096")
    assert second["md"] == tmp_path / "2026-01-01-h-sweep4096-run2.md"
    assert second["json"] == tmp_path / "2026-01-01-h-sweep4096-run2.json"
    second["json"].write_text("{}")
    assert br.results_paths(tmp_path, "2026-01-01", "h", quick=False, kind="sweep4096")["md"].name == \
        "2026-01-01-h-sweep4096-run3.md"
    assert br.results_paths(tmp_path, "2026-01-02", "h", quick=False, kind="sweep4096")["md"].name == \
        "2026-01-02-h-sweep4096.md"
    assert first["md"].read_text() == "first"


def test_sweep4096_run_reports_the_sweeps_with_multi_sae_runner_and_keeps_its_own_latest():
    """`make bench-sweep4096` (sweeps only, batch 4096): SAELens's MultiSAETrainingRunner is a row,
    its SAEs are scored beside the others, and its full run has its own latest file, never latest.md."""
    paths = br.results_paths(Path("res"), "2026-01-01", "h", quick=False, kind="sweep4096")
    assert paths["latest"] == Path("res/latest-sweep4096.md") and paths["md"] == Path("res/2026-01-01-h-sweep4096.md")
    assert br.results_paths(Path("res"), "2026-01-01", "h", quick=True, kind="sweep4096")["latest"] is None
    r = _result()
    del r["ours"]["harvest"], r["ours"]["loader"]
    r["saelens"] = {"sweep_cached": {"seconds": 30.0}, "sweep_onthefly": {"seconds": 90.0},
                    "sweep_multi": {"seconds": 45.0},
                    "eval": {"topk-k16-x8@/w/saes_cached": {"explained_variance": 0.80, "l0": 16, "dead_fraction": 0.1},
                             "topk-k16-x8@/w/saes_multi": {"explained_variance": 0.70, "l0": 16, "dead_fraction": 0.2},
                             "topk-k16-x8@/w/ours_saes": {"explained_variance": 0.82, "l0": 16, "dead_fraction": 0.0}}}
    r["parity"] = br.parity(r)
    assert r["parity"] == [{"name": "topk-k16-x8", "ours_explained_variance": 0.82, "ours_l0": 16,
                            "ours_dead_fraction": 0.0, "saelens_explained_variance": 0.80, "saelens_l0": 16,
                            "saelens_dead_fraction": 0.1, "saelens_multi_explained_variance": 0.70,
                            "saelens_multi_l0": 16, "saelens_multi_dead_fraction": 0.2,
                            "ev_gap": pytest.approx(0.02)}]
    rows = {row["benchmark"]: row for row in br.ratios(r)}
    assert not any(name.startswith(("harvest", "loader", "bytes")) for name in rows)
    multi = [row for name, row in rows.items() if "MultiSAETrainingRunner" in name]
    assert [row["value"] for row in multi] == [pytest.approx(3.0), pytest.approx(4.5)]  # 45 / (10 + 5), 45 / 10
    assert all(row["goal"] is None and row["met"] is None for row in multi)
    r["ratios"] = list(rows.values())
    plan = dict(vars(br.SWEEP4096), sweep_tokens=4096 * 64)
    r.update(meta={"date": "d", "host": "h", "quick": False, "cpu": "c", "cores": 2, "torch": "t", "codec": "x",
                   "command": "make bench-sweep4096", "notes": ["shared machine"]}, plan=plan, gpu=br.gpu_info())
    md = br.markdown(r)
    assert md.startswith("# actcache vs SAELens") and "sweeps at batch 4096" in md.splitlines()[0]
    assert "64 steps of batch 4096" in md and "EV SAELens multi" in md and "- shared machine" in md
    # 8 SAEs x 262,144 tokens in 45 s
    assert "| SAELens MultiSAETrainingRunner (on the fly, one forward pass for all 8) | 45.0 | 46,603 |" in md
    assert "Rates (tokens/s)" not in md


def test_saelens_gets_the_weights_of_the_random_model_we_harvested(tmp_path, saelens_python):
    """TransformerLens 3 (SAELens's environment) and 4 build different weights from one random spec:
    the benchmark hands SAELens the weights our harvest ran, and its model reproduces the store."""
    spec = "random:n_layers=1,d_model=16,n_heads=4,d_vocab=100,n_ctx=16,seed=0"
    plan = br.Plan(hook="blocks.0.hook_resid_post", hooks4=[], harvest_tokens=0, sweep_tokens=128, eval_tokens=0,
                   model=spec, model_batch=4, context_size=16)
    windows = np.random.default_rng(0).integers(3, 100, (8, 16))
    br.build_store(str(tmp_path / "s.zarr"), windows, plan, tmp_path, "s")
    weights = br.export_random_model(plan, tmp_path / "w.safetensors")
    shape = {"n_layers": 1, "d_model": 16, "n_heads": 4, "d_head": 4, "d_mlp": 64, "d_vocab": 100, "n_ctx": 16,
             "act_fn": "gelu"}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import saelens_side as S; "
            "m = S.build_model(json.loads(sys.argv[2])); S.load_weights(m, sys.argv[3]); "
            "print(json.dumps(S.model_check(m, sys.argv[4], 'blocks.0.hook_resid_post')))")
    p = subprocess.run([saelens_python, "-c", code, str(ROOT / "benchmarks"), json.dumps(shape), str(weights),
                        str(tmp_path / "s.zarr")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    check = json.loads(p.stdout.strip().splitlines()[-1])
    assert check["same_model"] is True and check["relative_error"] < 1e-2, check


def test_quality_table_leaves_out_other_model_saes_and_flags_negative_explained_variance():
    r = {"saelens": {"model_check": {"relative_error": 2.9, "same_model": False},
                     "eval": {"topk-k16-x8@/w/saes_cached": {"explained_variance": -0.2, "l0": 16, "dead_fraction": 0.1},
                              "topk-k16-x8@/w/saes_multi": {"explained_variance": -0.4, "l0": 16, "dead_fraction": 0.2,
                                                            "other_model": True},
                              "topk-k16-x8@/w/ours_saes": {"explained_variance": 0.8, "l0": 16, "dead_fraction": 0.0}}},
         "plan": {"saelens_parts": "sweep,onthefly,multi,eval"}}
    r["parity"] = br.parity(r)
    assert r["parity"][0]["saelens_multi_explained_variance"] is None  # not scored on another model's data
    notes = br.quality_notes(r)
    assert any("does not reproduce the store's activations" in n for n in notes)
    assert any("below zero" in n and "topk-k16-x8 (SAELens)" in n and "multi" not in n for n in notes)
    assert br._fmt_ev(-0.2).endswith("(< 0)") and "<" not in br._fmt_ev(0.8)
