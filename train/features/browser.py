"""The feature browser: a static site over the output of write_features, opened from the file system.

No server, no network, no external script or style. Chromium blocks fetch() of file:// URLs, so
every data file has a .js twin that calls actcacheData(key, object), loaded with a <script> tag when
needed: the index and an SAE page load one small file each; a latent's card loads the block of
`block` latents it belongs to. That keeps a 16k-latent SAE quick.

  index.html                  the SAEs of the run: metrics and latent-density histograms
  sae-<name>.html             one SAE: find a latent by id, latents by a token they fire on, a
                              paged list of latents; #latent=ID opens a card, #token=TEXT a search
  assets/browser.js, .css     the page code (package data: train/features/assets/, with the page
                              template page.html)"""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from ...common import outputs

ASSETS = ("browser.js", "browser.css")  # copied into <out>/assets/
PAGE = "page.html"  # a string.Template: $title, $nav, $scripts, $call


def asset_text(name: str) -> str:
    """One of the browser's files, shipped as package data beside this module (assets/)."""
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def _page(title: str, scripts: list[str], call: str, nav: str) -> str:
    tags = "\n".join(f'<script src="{html.escape(s)}"></script>' for s in scripts)
    return Template(asset_text(PAGE)).substitute(title=html.escape(title), nav=nav, scripts=tags, call=call)


def write_site(out: str | Path, summary: dict[str, Any]) -> Path:
    """Write index.html, one page per SAE and the assets into `out` (which holds write_features's data)."""
    out = Path(out)
    (out / outputs.FEATURES_ASSETS).mkdir(parents=True, exist_ok=True)
    for name in ASSETS:
        (out / outputs.FEATURES_ASSETS / name).write_text(asset_text(name), encoding="utf-8")
    base = ["features.js"] + (["vocab.js"] if summary.get("vocab") else [])
    model = html.escape(f"SAEs on {summary['model']}")
    (out / outputs.FEATURES_INDEX).write_text(_page("actcache feature browser", ["features.js"], "index()", model))
    for s in summary["saes"]:
        folder = s["folder"].split("/")[-1]
        call = "sae(" + json.dumps(s["name"]).replace("<", "\\u003c") + ")"
        page = _page(f"{s['name']}: {s['hook']}", base + [f"{s['folder']}/latents.js"], call,
                     '<a href="index.html">all SAEs</a>')
        (out / outputs.features_page(folder)).write_text(page)
    return out / outputs.FEATURES_INDEX
