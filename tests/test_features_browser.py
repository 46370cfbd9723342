"""The feature browser in a real headless Chromium, opened from the file system: no console errors,
the expected latent's top token highlighted, the token search finds it; a screenshot is kept.
One SAE has d_sae = 16384 so the on-demand loading is exercised at the size the browser is built for."""

import html
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.synthetic import make_store
from actcache.common.store import ActivationStore
from actcache.train.features import write_features
from actcache.common.sae import SAE, Metadata, SAEConfig

HOOK = "blocks.0.hook_resid_pre"
D = 16
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (`make test` installs Debian's chromium)")


class WordTokenizer:
    """Token strings for the synthetic vocabulary: id 17 -> ' w17'."""

    def decode(self, ids):
        return f" w{ids[0]}"


def random_sae(d_sae, seed):
    g = torch.Generator().manual_seed(seed)
    b_enc = torch.full((d_sae,), -2.5)
    b_enc[1000:] = -100.0  # most latents of the wide SAE never fire: the pages must still list all of them
    w = {"W_enc": torch.randn(D, d_sae, generator=g) / 2, "b_enc": b_enc,
         "W_dec": torch.randn(d_sae, D, generator=g), "b_dec": torch.zeros(D)}
    return SAE(SAEConfig(architecture="standard", d_in=D, d_sae=d_sae, metadata=Metadata(hook_name=HOOK)), w)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    url = base / "s.zarr"
    make_store(url, d=D, n_features=32, n_sequences=64, context_size=16, chunk_sequences=16, seed=2)
    run = base / "run"
    saes = {"wide": random_sae(16384, 0), "small": random_sae(32, 1)}
    for name, sae in saes.items():
        sae.save_model(run / name)
    (run / "summary.json").write_text(json.dumps({"store": str(url), "saes": [{"name": "small", "l0": 3.5, "fvu": 0.2}]}))
    out = base / "features"
    write_features(run, out, top=8, tokenizer=WordTokenizer(), progress=False)
    return out, url, saes


def chromium(url: str, tmp: Path, *extra: str) -> tuple[str, list[str]]:
    """Run headless Chromium on a file:// URL; the DOM after scripts ran, and the console lines."""
    profile = tmp / f"profile-{time.monotonic_ns()}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-extensions", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *extra, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    console = [line for line in r.stderr.splitlines() if ":CONSOLE" in line]
    return r.stdout, console


def expected_top(url, sae):
    """Brute force: the latent with the largest activation anywhere, its token and value."""
    store = ActivationStore.open(url)
    toks = store.tokens[:].reshape(-1)
    f = sae.encode(torch.from_numpy(store.activations(HOOK)[:]))
    f[torch.from_numpy(np.isin(toks, [1, 2]))] = 0  # BOS/EOS positions are left out
    row, lat = divmod(int(torch.argmax(f)), f.shape[1])
    return lat, int(toks[row]), float(f[row, lat])


def test_pages_load_without_console_errors_and_show_the_top_token(site, tmp_path):
    out, url, saes = site
    data = json.loads((out / "features.json").read_text())
    assert [s["d_sae"] for s in data["saes"]] == [32, 16384]
    lat, tok, act = expected_top(url, saes["wide"])
    assert act > 0
    want = html.escape(f" w{tok}")

    t = time.perf_counter()
    dom, console = chromium((out / f"sae-wide.html").as_uri() + f"#latent={lat}", tmp_path, "--dump-dom")
    seconds = time.perf_counter() - t
    assert console == []
    card = re.search(r'id="card" data-latent="(\d+)"', dom)
    assert card and int(card.group(1)) == lat
    top = dom[dom.index('id="top"'):]
    first = re.search(r'<span class="tok act"[^>]*title="activation ([0-9.e+-]+)[^"]*"[^>]*>([^<]*)</span>', top)
    assert first, top[:500]
    assert first.group(2) == want
    assert float(first.group(1)) == pytest.approx(act, rel=1e-5)
    assert "page 1 of 164" in dom  # the 16384 latents are paged, not rendered at once
    assert seconds < 30

    # latents by token: the token search lists our latent
    dom, console = chromium((out / "sae-wide.html").as_uri() + "#token=" + f"w{tok}", tmp_path, "--dump-dom")
    assert console == []
    results = dom[dom.index('id="token-results"'):]
    assert f"#latent={lat}" in results

    dom, console = chromium((out / "index.html").as_uri(), tmp_path, "--dump-dom")
    assert console == []
    assert 'href="sae-small.html"' in dom and 'href="sae-wide.html"' in dom and ">0.200<" in dom
    # which tokens were read, and the degenerate-SAE flag of the wide SAE (most of its latents never fire)
    assert f"{data['n_tokens']} tokens of" in dom and "64 training and 0 held-out sequences" in dom
    dead = [f for f in data["saes"][1]["flags"] if f.startswith("dead:")]
    assert dead and dead[0] in html.unescape(dom)

    shot = tmp_path / "latent.png"
    chromium((out / "sae-wide.html").as_uri() + f"#latent={lat}", tmp_path, "--window-size=1280,1400",
             f"--screenshot={shot}")
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20000
    keep = os.environ.get("ACTCACHE_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / "feature-browser.png")


def test_a_missing_data_file_is_reported(site, tmp_path):
    """The console check is real: a page whose block file is gone shows an error (and Chromium logs it)."""
    out, _, _ = site
    broken = tmp_path / "copy"
    shutil.copytree(out, broken)
    (broken / "saes" / "small" / "blocks" / "00000.js").unlink()
    dom, console = chromium((broken / "sae-small.html").as_uri() + "#latent=3", tmp_path, "--dump-dom")
    assert "missing data file" in dom
    assert len(console) == 1 and "missing data file saes/small/blocks/00000.js" in console[0]


def test_a_malformed_token_hash_is_searched_as_typed_without_an_uncaught_error(site, tmp_path):
    """`#token=%E0%A4%A` is no valid escape: decodeURIComponent throws URIError; the page searches the text."""
    out, _, _ = site
    dom, console = chromium((out / "sae-small.html").as_uri() + "#token=%E0%A4%A", tmp_path, "--dump-dom")
    assert console == [], console
    assert 'id="token-results"' in dom
