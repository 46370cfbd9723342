"""The architecture registry and the sweep configuration: exported SAEs behave as they trained, a
new architecture defined here trains and exports through the registry alone, every bad sweep
value is one line from the real CLI before anything trains, and the key tables of docs/sweep-config.md are the
generated ones."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_sweep, write_sweep, single_thread
from tests.synthetic import make_store, sample_activations
from tests.test_train_saes import one_thread  # noqa: F401  (a fixture)
from actcache.common.errors import UserError
from actcache.train.architectures import ARCHITECTURES, Key, TopKSAE, register, unregister
from actcache.train.config import load_config, readme_tables, readme_with_tables, resolve
from actcache.train.export import model_metadata, summary_table
from actcache.common.sae import SAE
from actcache.train.sweep import train_sweep
from harvest_fixtures import message_lines

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.0.hook_resid_pre"


# ------------------------------------------------------------------ exported SAEs behave as trained
FIDELITY_SAES = [
    {"name": "relu", "architecture": "standard", "l1_coefficient": 0.5},
    {"name": "gated", "architecture": "gated", "l1_coefficient": 1.0},
    {"name": "jump", "architecture": "jumprelu", "l0_coefficient": 0.5},
    {"name": "topk", "architecture": "topk", "k": 4},
    {"name": "batchtopk", "architecture": "batchtopk", "k": 4},
    {"name": "matryoshka", "architecture": "matryoshka_batchtopk", "k": 4, "matryoshka_widths": [16]},
]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """100 steps: short enough that a threshold averaged from the start of training is far off."""
    root = tmp_path_factory.mktemp("fidelity")
    _, planted = make_store(root / "s.zarr", d=16, n_features=48, n_sequences=512, context_size=32,
                            chunk_sequences=16)
    top = {"hook": HOOK, "batch_tokens": 1024, "tokens": 102_400, "seed": 1, "log_every_steps": 5,
           "repeat_epochs": True, "dead_window_tokens": 4096, "eval_tokens": 8192}
    with single_thread():
        summary = train_sweep(str(root / "s.zarr"),
                              make_sweep(*FIDELITY_SAES, defaults={"lr": 3e-3, "d_sae": 64}, **top), root / "out",
                              progress=False)
    return summary, planted, root / "out"


@pytest.mark.parametrize("name", [s["name"] for s in FIDELITY_SAES])
def test_exported_sae_reproduces_training_l0_and_fvu(short_run, name):
    """On tokens never trained on (fresh samples of the same distribution), the exported SAE's L0 and
    FVU are within 5% of what the training SAE logged over its last steps."""
    summary, planted, out = short_run
    assert set(ARCHITECTURES) >= {s["architecture"] for s in FIDELITY_SAES}
    lines = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()][-3:]
    assert lines[-1]["step"] == 99
    train_l0 = sum(r["l0"] for r in lines) / len(lines)
    train_fvu = sum(r["fvu"] for r in lines) / len(lines)
    x = sample_activations(planted, 16384, torch.Generator().manual_seed(123)).half().float()
    sae = SAE.load_from_disk(out / name)
    with torch.no_grad():
        f = sae.encode(x)
        fvu = float((sae.decode(f) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    l0 = float((f > 0).float().sum(1).mean())
    assert abs(l0 - train_l0) <= 0.05 * train_l0, (name, l0, train_l0)
    assert abs(fvu - train_fvu) <= 0.05 * train_fvu, (name, fvu, train_fvu)
    row = next(r for r in summary["saes"] if r["name"] == name)
    assert abs(row["l0"] - train_l0) <= 0.05 * train_l0, row
    assert "≠" not in summary_table({"saes": [row]})


def test_summary_table_flags_a_k_its_l0_contradicts():
    row = {"name": "b", "architecture": "batchtopk", "d_sae": 64, "k": 32, "l0": 151.6, "fvu": 0.28,
           "explained_variance": 0.72, "dead_fraction_eval": 0.0, "exported_as": "jumprelu"}
    table = summary_table({"saes": [row, {**row, "name": "ok", "l0": 31.5}]})
    flagged = [line for line in table.splitlines() if "≠ L0" in line]
    assert len(flagged) == 2 and "| b |" in flagged[0] and "32 (≠ L0)" in flagged[0]  # the row and the note


def test_export_metadata_and_file_modes(short_run):
    summary, _, out = short_run
    for row in summary["saes"]:
        folder = Path(row["path"])
        meta = json.loads((folder / "cfg.json").read_text())["metadata"]
        assert meta["model_name"] == meta["model_spec"] == "synthetic"
        assert meta["exclude_special_tokens"] is True
        assert "store_fingerprint" in meta and "held_out" in meta
        umask = os.umask(0)
        os.umask(umask)
        for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
            assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~umask, name
    assert model_metadata("smollm2-135m-instruct-q4") == {
        "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct", "model_gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "model_spec": "smollm2-135m-instruct-q4"}


# ------------------------------------------------------------------ a new architecture, from here
class L2TopKSAE(TopKSAE):
    """A TopK variant with an extra L2 penalty on the active values: defined and registered by this
    test only, to show that a new architecture needs nothing in train/."""

    architecture = "test_l2_topk"
    help = "TopK with an L2 penalty on the active values (a test architecture)"
    keys = (Key("act_l2", "float", 0.01, "weight of the L2 penalty on active values", low=0),)
    takes_k = True
    uses_auxk = True
    saelens_architecture = "topk"

    def _extra_losses(self, x, cols, vals, offsets, loss, terms):
        l2 = vals.pow(2).sum(-1).mean()
        terms["act_l2"] = l2
        return loss + self.cfg.act_l2 * l2, terms

    def log_values(self):
        return {"test_l2_logged": 1.0}


@pytest.fixture
def test_architecture():
    register(L2TopKSAE)
    yield L2TopKSAE
    unregister(L2TopKSAE.architecture)


def test_architecture_defined_in_a_test_trains_and_exports(test_architecture, tmp_path, one_thread):
    make_store(tmp_path / "s.zarr", d=16, n_features=48, n_sequences=128, context_size=32, chunk_sequences=16)
    top = {"hook": HOOK, "batch_tokens": 256, "tokens": 10240, "log_every_steps": 5, "dead_window_tokens": 256, "repeat_epochs": True,
           "eval_tokens": 2048}
    saes = [{"name": "mine", "architecture": "test_l2_topk", "k": 4, "act_l2": 0.05, "d_sae": 512}]
    with pytest.raises(UserError, match="act_l2 = -1.0 is out of range"):
        load_config(make_sweep({**saes[0], "act_l2": -1.0}, **top))
    assert "`act_l2` | `test_l2_topk`" in readme_tables()
    summary = train_sweep(str(tmp_path / "s.zarr"), make_sweep(*saes, **top), tmp_path / "out", progress=False)
    row = summary["saes"][0]
    assert row["exported_as"] == "topk" and row["k"] == 4
    metrics = [json.loads(line) for line in (tmp_path / "out" / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert all("act_l2" in r and r["test_l2_logged"] == 1.0 for r in metrics)
    assert any("aux" in r for r in metrics)  # AuxK switched on because the registration says it applies
    sae = SAE.load_from_disk(tmp_path / "out" / "mine")
    f = sae.encode(torch.randn(32, 16))
    assert int((f > 0).sum(1).max()) <= 4
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config"]["saes"][0]["act_l2"] == 0.05


def test_registry_refuses_a_form_it_cannot_run():
    class Bad(TopKSAE):
        architecture = "test_bad_export"
        saelens_architecture = "nobody_knows"

    with pytest.raises(ValueError, match="inference_form"):
        register(Bad)
    assert "test_bad_export" not in ARCHITECTURES


# ------------------------------------------------------------------ the reference tables
def test_the_reference_tables_name_every_architecture_and_key():
    text = (ROOT / "docs" / "options.md").read_text()
    for name, cls in ARCHITECTURES.items():
        assert f"| `{name}` |" in text
        for k in cls.all_keys():
            assert f"| `{k.name}` |" in text, k.name


# ------------------------------------------------- the sweep-key tables of docs/sweep-config.md
def test_readme_tables_are_the_generated_ones():
    text = (ROOT / "docs" / "sweep-config.md").read_text()
    assert readme_with_tables(text) == text, "run: python -m actcache.train.architectures --readme docs/sweep-config.md"
    for name in ARCHITECTURES:
        assert f"| `{name}` |" in text


# ------------------------------------------------------------------ bad values, through the CLI
BASE_TOP = {"hook": HOOK, "tokens": 3584, "batch_tokens": 256, "eval_tokens": 512}
BASE_SAE = {"name": "a", "architecture": "topk", "k": 4, "d_sae": 64}
# (where: "top" | "sae" | "defaults", key, value, what the one line must say)
BAD_VALUES = [
    ("sae", "lr", -1e-3, "lr = -0.001 is out of range; it must be > 0"),
    ("sae", "lr", float("nan"), "lr must be a finite number"),
    ("sae", "lr", "fast", "lr must be a number, not 'fast'"),
    ("defaults", "lr", 0.0, "[defaults]: lr = 0.0 is out of range"),
    ("sae", "adam_beta1", 1.0, "adam_beta1 = 1.0 is out of range; it must be in [0, 1)"),
    ("sae", "adam_beta1", -0.1, "adam_beta1 = -0.1 is out of range"),
    ("sae", "adam_beta2", 1.5, "adam_beta2 = 1.5 is out of range"),
    ("sae", "grad_clip", -1.0, "grad_clip = -1.0 is out of range; it must be >= 0"),
    ("sae", "k", 4.5, "k must be a whole number, not 4.5"),
    ("sae", "k", 0, "k = 0 is out of range; it must be >= 1"),
    ("sae", "k", 1000, "k = 1000 must be between 1 and d_sae = 64"),
    ("sae", "d_sae", 64.5, "d_sae must be a whole number, not 64.5"),
    ("sae", "d_sae", True, "d_sae must be a whole number, not True"),
    ("sae", "aux_k", 0, "aux_k = 0 is out of range"),
    ("sae", "aux_loss_coefficient", -1.0, "aux_loss_coefficient = -1.0 is out of range"),
    ("sae", "lr_warmup_steps", -5, "lr_warmup_steps = -5 is out of range"),
    ("sae", "architecure", "topk", "unknown SAE key 'architecure' in [[sae]] 'a'; did you mean 'architecture'?"),
    ("sae", "architecture", "topkk", "unknown architecture 'topkk'; did you mean 'topk'?"),
    ("sae", "name", "summary.json", "SAE name 'summary.json' would collide with the run's own files"),
    ("sae", "name", "checkpoint.pt", "SAE name 'checkpoint.pt' would collide"),
    ("sae", "name", "Run.json", "SAE name 'Run.json' would collide"),
    ("sae", "name", "../up", "SAE name '../up' must be letters"),
    ("top", "bach_tokens", 256, "unknown config key 'bach_tokens'; did you mean 'batch_tokens'?"),
    ("top", "lr", 1e-3, "'lr' is an SAE key: put it in [defaults]"),
    ("top", "batch_tokens", 0, "batch_tokens = 0 is out of range"),
    ("top", "tokens", "lots", "tokens must be a whole number such as 50_000_000"),
    ("top", "seed", -1, "seed = -1 is out of range"),
    ("top", "repeat_epochs", "yes", "repeat_epochs must be true or false"),
    ("top", "window_chunks", 0, "window_chunks = 0 is out of range"),
    ("top", "skip_special_tokens", 1, "skip_special_tokens must be true or false, not 1"),
    ("top", "hook", "blocks.0.hook_resid_pr", "did you mean 'blocks.0.hook_resid_pre'?"),
]
SAE_SPECIFIC = [
    ({"architecture": "standard", "l1_coefficient": -1, "k": None}, "l1_coefficient = -1.0 is out of range"),
    ({"architecture": "jumprelu", "l0_coefficient": -0.5, "k": None}, "l0_coefficient = -0.5 is out of range"),
    ({"architecture": "jumprelu", "jumprelu_bandwidth": 0.0, "k": None}, "jumprelu_bandwidth = 0.0 is out of range"),
    ({"architecture": "batchtopk", "topk_threshold_lr": 2.0}, "topk_threshold_lr = 2.0 is out of range"),
    ({"architecture": "matryoshka_batchtopk", "matryoshka_widths": [32, 16]}, "matryoshka_widths must increase"),
    ({"architecture": "matryoshka_batchtopk", "matryoshka_widths": [1.5]}, "matryoshka_widths must be a list of"),
    ({"architecture": "standard", "k": 4}, "architecture 'standard' does not take 'k'"),
    ({"architecture": "batchtopk", "k": None}, "architecture 'batchtopk' needs k"),
]


def _case(where, key, value) -> dict:
    top, sae, defaults = dict(BASE_TOP), dict(BASE_SAE), {}
    {"top": top, "sae": sae, "defaults": defaults}[where][key] = value
    if key == "architecure":
        del sae["architecture"]
    return make_sweep(sae, defaults=defaults, **top)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    url = tmp_path_factory.mktemp("bad") / "s.zarr"
    make_store(url, d=16, n_features=32, n_sequences=128, context_size=32, chunk_sequences=16)
    return str(url)


def _cli(monkeypatch, capsys, args) -> tuple[int, str]:
    """The real entry point (`actcache ...`), in this process."""
    from actcache.cli import main
    from actcache.common.progress import log

    monkeypatch.setattr(sys, "argv", ["actcache", *args])
    # the CLI's log handler would hold on to this test's captured stderr: leave the handlers as found
    monkeypatch.setattr(log, "handlers", list(log.handlers))
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", BAD_VALUES + SAE_SPECIFIC,
                         ids=lambda c: f"{c[1]}={c[2]!r}" if len(c) == 4 else "-".join(f"{k}={v}" for k, v in c[0].items()))
def test_bad_sweep_value_is_one_line_before_training(case, small_store, tmp_path, monkeypatch, capsys):
    if len(case) == 4:
        where, key, value, expected = case
        cfg = _case(where, key, value)
    else:
        override, expected = case
        sae = {k: v for k, v in {**BASE_SAE, **override}.items() if v is not None}
        cfg = make_sweep(sae, **BASE_TOP)
    write_sweep(cfg, tmp_path / "sweep.toml")
    code, err = _cli(monkeypatch, capsys, ["train", small_store, "--config", str(tmp_path / "sweep.toml"),
                                           "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 2, err
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("actcache: error: "), err
    assert expected in lines[0], (expected, lines[0])
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_surprising_values_are_warnings(small_store):
    from actcache.common.store import ActivationStore

    raw = make_sweep({**BASE_SAE, "lr_decay_steps": 40},
                     {"name": "s", "architecture": "standard", "sparsity_warmup_steps": 100},
                     **BASE_TOP, checkpoint_every_tokens=8192)
    cfg = resolve(load_config(raw), ActivationStore.open(small_store))
    assert len(cfg.warnings) == 3, cfg.warnings
    assert "lr_decay_steps = 40 is longer than the run (14 steps)" in cfg.warnings[1]
    assert "sparsity_warmup_steps = 100 is longer than the run" in cfg.warnings[2]
    assert all("\n" not in w for w in cfg.warnings)


def test_misspelt_key_and_warning_through_a_real_process(small_store, tmp_path):
    """`architecure` is named as an unknown key; a legal but surprising value warns and still trains."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cfg = tmp_path / "a.toml"
    write_sweep(_case("sae", "architecure", "topk"), cfg)
    p = subprocess.run([sys.executable, "-m", "actcache", "train", small_store, "--config", str(cfg),
                        "--out", str(tmp_path / "a")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == ("actcache: error: unknown SAE key 'architecure' in [[sae]] 'a'; "
                                "did you mean 'architecture'?")
    write_sweep(make_sweep({**BASE_SAE, "lr_decay_steps": 40}, **BASE_TOP), cfg)
    p = subprocess.run([sys.executable, "-m", "actcache", "train", small_store, "--config", str(cfg),
                        "--out", str(tmp_path / "b"), "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "actcache: warning: SAE 'a': lr_decay_steps = 40 is longer than the run (14 steps)" in p.stderr
