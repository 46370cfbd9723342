"""The README's quickstart runs as written: its shell block, taken from README.md, in an empty folder,
with the installed `actcache` command, offline; then what each step says it writes is there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harvest_fixtures import ROOT, env

pytestmark = pytest.mark.slow  # the bundled model, loaded by six commands: minutes on 2 CPU cores


def quickstart_block() -> str:
    """The first ```sh block under the README's "## Quickstart" heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_the_block_is_commands_of_this_package():
    block = quickstart_block()
    commands = [line for line in block.splitlines() if line.startswith("actcache ")]
    names = [c.split()[1] for c in commands]
    for name in ("harvest", "train", "eval", "features", "analyse", "steer", "attribute", "compare"):
        assert name in names, name
    # explore is a line a reader runs by hand: a comment, so that the block ends
    for line in block.splitlines():
        if re.search(r"actcache explore\b", line):  # a server: it runs until stopped
            assert line.startswith("# "), line

def test_the_quickstart_runs_as_written(tmp_path):
    script = tmp_path / "quickstart.sh"
    script.write_text("set -euo pipefail\n" + quickstart_block())
    bin_dir = Path(sys.executable).parent  # the environment's `actcache` console script
    e = env() | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "2"}
    work = tmp_path / "work"
    work.mkdir()
    p = subprocess.run(["bash", str(script)], cwd=work, env=e, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "Traceback" not in p.stderr

    # harvest + info
    assert (work / "acts.zarr" / "zarr.json").is_file() and "held out" in p.stdout
    # train: one SAELens folder per SAE of the grid, and the summary
    summary = json.loads((work / "runs" / "s1" / "summary.json").read_text())
    names = sorted(r["name"] for r in summary["saes"])
    assert names == ["topk-k16", "topk-k32"]
    for n in names:
        folder = work / "runs" / "s1" / n
        assert (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()
        # eval: the model's loss with the SAE spliced in, on held-out tokens
        ev = json.loads((folder / "eval.json").read_text())
        assert ev["ce_loss_with_sae"] > 0 and -1.0 < ev["ce_loss_score"] <= 1.0
    # features: the data and the static site
    assert (work / "runs" / "s1" / "features" / "index.html").is_file()
    assert (work / "runs" / "s1" / "features" / "features.json").is_file()
    # compare: the plot of the run's SAEs
    assert (work / "frontier.png").is_file()
    # analyse, steer and attribute printed their tables
    for word in ("weather", "steered", "Paris"):
        assert word in p.stdout, word
