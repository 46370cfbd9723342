"""Helpers shared by the harvest tests: a tiny random model, token datasets, CLI runners."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RANDOM = "random:n_layers=2,d_model=64,n_heads=4,d_vocab=1000,n_ctx=256,seed=0"
HOOKS = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]


def write_token_jsonl(path: Path, n_docs: int = 120, vocab: int = 1000, seed: int = 0) -> Path:
    """A pre-tokenised dataset: documents of random length with an input_ids column."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            n = int(rng.integers(10, 200))
            f.write(json.dumps({"input_ids": rng.integers(0, vocab, n).tolist()}) + "\n")
    return path


def harvest_args(out: Path, data: Path, *extra: str, hooks=HOOKS, tokens: int = 4096, ctx: int = 32,
                 batch: int = 4, chunk: int = 8, model: str = RANDOM) -> list[str]:
    args = ["harvest", "--model", model, "--dataset", str(data), "--context-size", str(ctx),
            "--tokens", str(tokens), "--batch-size", str(batch), "--chunk-sequences", str(chunk), "--out", str(out)]
    for h in hooks:
        args += ["--hook", h]
    return args + list(extra)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    return e


def cli_subprocess(args: list[str], **kw) -> subprocess.CompletedProcess:
    """Run `actcache ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "actcache", *args], capture_output=True, text=True,
                          env=env(), cwd=ROOT, timeout=300, **kw)


_STAGE = re.compile(r"^actcache: .+( \.\.\.( \d+ s so far)?|: done in [\d.]+ s)$")


def message_lines(stderr: str) -> list[str]:
    """The lines of a command's stderr that say something: without blank lines and without the
    lines a slow step prints while it runs ("actcache: loading the model ... ...", "... 15 s so far",
    "...: done in 6.1 s"), which appear only when the machine is slow and are not the message."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not _STAGE.match(line)]


def run_cli(args: list[str], capfd) -> tuple[int, str, str]:
    """Run `actcache ARGS` in this process (as the console script does): exit code, stdout, stderr."""
    from actcache import cli
    from actcache.common.progress import log

    log.handlers.clear()  # bind the log handler to this test's stderr
    old = sys.argv
    sys.argv = ["actcache", *args]
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    out, err = capfd.readouterr()
    return code, out, err


def array_files(store: Path) -> dict[str, bytes]:
    """Every file of every array (chunks and array metadata), by relative path; not the root manifest."""
    files = {}
    for f in sorted(store.rglob("*")):
        rel = f.relative_to(store).as_posix()
        if f.is_file() and rel != "zarr.json" and not rel.endswith(".partial"):
            files[rel] = f.read_bytes()
    return files


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under path: to show a store was not touched."""
    if not path.exists():
        return {}
    return {str(f): (f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file()}
