"""One validated SAE load (common/sae.py): every architecture the registry knows loads in a fresh process
that never imports the training side, and a damaged folder (NaN weights, a truncated or mismatched
file, cfg.json keys missing or mistyped) is one line naming the folder, file and tensor, through the
public API and through every command that loads an SAE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from actcache.common.errors import UserError
from actcache.common.sae import SAE, Metadata, SAEConfig
from actcache.train.architectures import ARCHITECTURES
from actcache.train.architectures import SAEConfig as TrainConfig

from harvest_fixtures import ROOT, cli_subprocess, env, message_lines

D_IN, D_OUT, D_SAE = 8, 6, 16


def exported(name: str, seed: int = 0) -> SAE:
    """A freshly initialised SAE of a registered architecture, exported as training exports it, with
    every weight made non-trivial (b_dec, W_skip and thresholds start at zero)."""
    cls = ARCHITECTURES[name]
    values = {"name": name, "architecture": name, "hook": "blocks.0.hook_resid_pre", "d_sae": D_SAE}
    if cls.takes_k:
        values["k"] = 3
    if cls.transcoder:
        values["hook_out"] = "blocks.0.hook_mlp_out"
    cfg = TrainConfig(**values)
    cls.resolve(cfg, D_IN, D_OUT if cls.transcoder else D_IN, 100)
    g = torch.Generator().manual_seed(seed)
    sae = cls(cfg, g)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    arch, extra, weights = sae.export_state(1.0, 1.0) if cls.transcoder else sae.export_state(1.0)
    scfg = SAEConfig(architecture=arch, d_in=D_IN, d_sae=D_SAE,
                     metadata=Metadata(hook_name="blocks.0.hook_resid_pre"), **extra)
    return SAE(scfg, {k: v.detach().float() for k, v in weights.items()})


FRESH = r"""
import json, sys
import torch
from safetensors.torch import load_file, save_file
from actcache import SAE
x = load_file(sys.argv[1])["x"]
out = {}
for folder in sys.argv[3:]:
    sae = SAE.load_from_disk(folder)
    y, f = sae.forward_with_activations(x)
    out[folder + "/y"], out[folder + "/f"] = y.contiguous(), f.contiguous()
save_file(out, sys.argv[2])
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("actcache.train", "actcache.harvest")))))
"""


def test_every_registered_architecture_loads_in_a_fresh_process_without_the_training_side(tmp_path):
    folders, saes = [], {}
    for name in ARCHITECTURES:
        sae = exported(name)
        folder = tmp_path / name
        sae.save_model(folder)
        folders.append(str(folder))
        saes[str(folder)] = sae
    forms = {json.loads((Path(f) / "cfg.json").read_text())["architecture"] for f in folders}
    # the transcoders' own forms are among them (the ones SAE.load_from_disk refused in a fresh process)
    assert {"transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder",
            "topk_transcoder"} <= forms
    x = torch.randn(5, D_IN, generator=torch.Generator().manual_seed(1))
    save_file({"x": x}, tmp_path / "x.safetensors")
    r = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors"),
                        *folders], capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []  # nothing of train/ or harvest/ was imported
    got = load_file(tmp_path / "y.safetensors")
    for folder, sae in saes.items():
        y, f = sae.forward_with_activations(x)
        # an independent check of the map for the plain forms: x -> relu((x - b_dec) W_enc + b_enc) W_dec + b_dec
        torch.testing.assert_close(got[folder + "/f"], f)
        torch.testing.assert_close(got[folder + "/y"], y)
        assert y.shape == (5, sae.cfg.d_out or D_IN)


def test_transcoder_outputs_against_a_hand_computation(tmp_path):
    sae = exported("skip_transcoder", seed=3)
    sae.save_model(tmp_path / "t")
    back = SAE.load_from_disk(tmp_path / "t")
    w = load_file(tmp_path / "t" / "sae_weights.safetensors")
    x = torch.randn(4, D_IN)
    f = torch.relu(x @ w["W_enc"] + w["b_enc"])  # a transcoder's encoder reads x itself
    y = f @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].t()
    torch.testing.assert_close(back(x), y)


# ------------------------------------------------------------------ damaged folders, through the API
def good_folder(tmp_path: Path, name: str = "sae") -> Path:
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.zeros(D_SAE),
         "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.zeros(D_IN)}
    SAE(SAEConfig("standard", D_IN, D_SAE, metadata=Metadata(hook_name="blocks.0.hook_resid_pre")), w).save_model(
        tmp_path / name)
    return tmp_path / name


def _edit_weights(folder: Path, fn) -> None:
    w = load_file(folder / "sae_weights.safetensors")
    fn(w)
    save_file(w, folder / "sae_weights.safetensors")


def _edit_cfg(folder: Path, fn) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    fn(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _nan(w):
    w["W_dec"][3, 1] = float("nan")


def _inf(w):
    w["b_enc"][0] = float("inf")


def _wrong_shape(w):
    w["W_dec"] = torch.randn(D_SAE + 4, D_IN)


def _missing_tensor(w):
    del w["b_dec"]


def _int_tensor(w):
    w["b_enc"] = torch.zeros(D_SAE, dtype=torch.int64)


def _truncate(folder: Path) -> None:
    p = folder / "sae_weights.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


def _not_json(folder: Path) -> None:
    (folder / "cfg.json").write_text("{\"architecture\": \"standard\", ")


DAMAGE = [
    # (what is done to the folder, the file the line names, what else it must say)
    ("nan", lambda f: _edit_weights(f, _nan), "sae_weights.safetensors", "tensor W_dec holds 1 non-finite value"),
    ("inf", lambda f: _edit_weights(f, _inf), "sae_weights.safetensors", "tensor b_enc holds 1 non-finite value"),
    ("shape", lambda f: _edit_weights(f, _wrong_shape), "sae_weights.safetensors",
     "tensor W_dec has shape [20, 8] but cfg.json (d_sae 16, d_out 8) implies [16, 8]"),
    ("d_sae", lambda f: _edit_cfg(f, lambda c: c.update(d_sae=32)), "sae_weights.safetensors",
     "tensor W_enc has shape [8, 16] but cfg.json (d_in 8, d_sae 32) implies [8, 32]"),
    ("missing tensor", lambda f: _edit_weights(f, _missing_tensor), "sae_weights.safetensors",
     "lacks the tensor b_dec"),
    ("int tensor", lambda f: _edit_weights(f, _int_tensor), "sae_weights.safetensors",
     "tensor b_enc is torch.int64, not floating point"),
    ("truncated", _truncate, "sae_weights.safetensors", "is damaged or truncated"),
    ("no d_in", lambda f: _edit_cfg(f, lambda c: c.pop("d_in")), "cfg.json", "lacks the key 'd_in'"),
    ("no architecture", lambda f: _edit_cfg(f, lambda c: c.pop("architecture")), "cfg.json",
     "lacks the key 'architecture'"),
    ("d_in a string", lambda f: _edit_cfg(f, lambda c: c.update(d_in="8")), "cfg.json",
     "d_in must be a whole number, not '8'"),
    ("d_sae a float", lambda f: _edit_cfg(f, lambda c: c.update(d_sae=16.5)), "cfg.json",
     "d_sae must be a whole number, not 16.5"),
    ("bad dtype", lambda f: _edit_cfg(f, lambda c: c.update(dtype="int8")), "cfg.json",
     "dtype 'int8' is not one of float32"),
    ("topk without k", lambda f: _edit_cfg(f, lambda c: c.update(architecture="topk")), "sae_weights.safetensors",
     "architecture 'topk' needs k"),
    ("metadata a list", lambda f: _edit_cfg(f, lambda c: c.update(metadata=[1])), "cfg.json",
     "metadata must be an object"),
    ("cfg not JSON", _not_json, "cfg.json", "cannot be read as JSON"),
]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_folder_is_one_line_naming_folder_file_and_tensor(tmp_path, damage):
    _, do, file, says = damage
    folder = good_folder(tmp_path)
    do(folder)
    with pytest.raises(UserError) as e:
        SAE.load_from_disk(folder)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(folder / file) in msg and says in msg, msg


# ------------------------------------------------------------------ the same, through the commands
@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    """A run folder (named store of a random model) whose one SAE has a NaN in W_dec, and a second
    folder whose weights file is truncated."""
    from eval_fixtures import HOOK, harvest_store, make_sae
    from harvest_fixtures import write_token_jsonl

    tmp = tmp_path_factory.mktemp("badsae")
    data = write_token_jsonl(tmp / "data.jsonl", vocab=500)
    harvest_store(tmp / "acts.zarr", data, tokens=1024)
    runs = {}
    for kind, fn in (("nan", lambda f: _edit_weights(f, _nan)), ("truncated", _truncate),
                     ("mismatch", lambda f: _edit_cfg(f, lambda c: c.update(d_sae=64))),
                     ("nokey", lambda f: _edit_cfg(f, lambda c: c.pop("d_sae")))):
        run = tmp / f"run-{kind}"
        make_sae("random", hook=HOOK).save_model(run / "s")
        (run / "summary.json").write_text(json.dumps({"store": str(tmp / "acts.zarr"), "saes": [{"name": "s"}]}))
        fn(run / "s")
        runs[kind] = run
    return tmp, runs


COMMANDS = {
    "eval": lambda run, tmp: ["eval", str(run)],
    "features": lambda run, tmp: ["features", str(run), "--out", str(tmp / "feat"), "--no-logits"],
    "analyse": lambda run, tmp: ["analyse", str(run / "s"), "--prompt", "x"],
    "steer": lambda run, tmp: ["steer", str(run / "s"), "--feature", "0", "--prompt", "x"],
    "attribute": lambda run, tmp: ["attribute", str(run / "s"), "--prompt", "x", "--target", "y"],
    "eval --sae": lambda run, tmp: ["eval", "--sae", str(run / "s"), "--store", str(tmp / "acts.zarr")],
}
EXPECT = {"nan": ("sae_weights.safetensors", "tensor W_dec holds 1 non-finite value"),
          "truncated": ("sae_weights.safetensors", "is damaged or truncated"),
          "mismatch": ("sae_weights.safetensors", "tensor W_enc has shape [32, 128] but cfg.json (d_in 32, d_sae 64)"),
          "nokey": ("cfg.json", "lacks the key 'd_sae'")}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_that_loads_an_sae_refuses_a_nan_one_in_a_real_process(bad_run, tmp_path, command):
    tmp, runs = bad_run
    r = cli_subprocess(COMMANDS[command](runs["nan"], tmp_path))
    lines = message_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    file, says = EXPECT["nan"]
    assert str(runs["nan"] / "s" / file) in lines[0] and says in lines[0]
    assert not (tmp_path / "feat").exists()


@pytest.mark.parametrize("kind", ["truncated", "mismatch", "nokey"])
def test_truncated_mismatched_and_incomplete_folders_are_one_line_from_eval_and_features(bad_run, capfd, tmp_path,
                                                                                         kind):
    from harvest_fixtures import run_cli

    tmp, runs = bad_run
    file, says = EXPECT[kind]
    for command in ("eval", "features"):
        code, out, err = run_cli(COMMANDS[command](runs[kind], tmp_path), capfd)
        lines = message_lines(err)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("actcache: error: "), err
        assert str(runs[kind] / "s" / file) in lines[0] and says in lines[0], lines[0]
        assert not (tmp_path / "feat").exists()


def test_a_form_of_another_package_loads_in_a_fresh_process_through_its_entry_point(tmp_path):
    """An architecture outside this package declares its exported form under the entry point group
    actcache.inference_forms; a fresh process that never imported that package loads its folders."""
    plugin = tmp_path / "plugin"
    (plugin / "myforms-0.1.dist-info").mkdir(parents=True)
    (plugin / "myforms-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: myforms\nVersion: 0.1\n")
    (plugin / "myforms-0.1.dist-info" / "entry_points.txt").write_text(
        "[actcache.inference_forms]\ndoubled = myforms:DOUBLED\n")
    (plugin / "myforms.py").write_text(
        "import torch\nfrom actcache.common.sae import InferenceForm\n"
        "DOUBLED = InferenceForm('doubled', ('W_enc', 'b_enc', 'W_dec', 'b_dec'),\n"
        "                        lambda sae, x: 2 * torch.relu(x @ sae.W_enc + sae.b_enc))\n")
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.zeros(D_SAE),
         "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.zeros(D_IN)}
    save_file(w, tmp_path / "w.safetensors")
    folder = tmp_path / "sae"
    folder.mkdir()
    save_file(w, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({"architecture": "doubled", "d_in": D_IN, "d_sae": D_SAE,
                                                 "apply_b_dec_to_input": False}))
    code = ("import sys, torch; from actcache import SAE; s = SAE.load_from_disk(sys.argv[1]); "
            "x = torch.ones(1, %d); print(float(s.encode(x).sum()))" % D_IN)
    e = env()
    e["PYTHONPATH"] = str(plugin)  # the other package, installed as a folder on the path (ours is installed)
    r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=e, timeout=120)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) == pytest.approx(float(2 * torch.relu(torch.ones(1, D_IN) @ w["W_enc"]).sum()), rel=1e-5)
    # without the plugin on the path, the same folder is one line naming the forms there are
    r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode != 0 and "architecture 'doubled' cannot be loaded; known: standard" in r.stderr
