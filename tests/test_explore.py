"""`actcache explore` as a user meets it: a real server process over a tiny run (tests/explore_fixtures.py)
answering the live panels' requests, bad requests answered with one line while it keeps serving, a port
in use, a client that goes away mid-request, a run without features output; and the page in a real
headless Chromium (Debian's, driven by Playwright) where a prompt is typed, a latent clicked and a
steering request run, each shown result checked against the transformers model or the features
output's own files."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from harvest_fixtures import ROOT, env
from tests.explore_fixtures import build_lab, hf_greedy, hf_hook_activation

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return build_lab(tmp_path_factory.mktemp("explore"))


def start(args: list[str]) -> tuple[subprocess.Popen, str]:
    """`actcache explore ARGS` in a real process; its URL once it serves."""
    p = subprocess.Popen([sys.executable, "-m", "actcache", "explore", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    line = p.stdout.readline()
    if not line.startswith("explore: http://"):
        p.kill()
        raise AssertionError(f"no URL from explore: {line!r} {p.stderr.read()[-2000:]}")
    return p, line.split()[1]


@pytest.fixture(scope="module")
def server(lab):
    p, url = start([str(lab.run), "--port", "0"])
    yield p, url
    p.terminate()
    p.wait(30)


def request(url: str, path: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"},
                                 method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_answers_the_live_panels(lab, server):
    _, url = server
    code, info = request(url, "api/info")
    assert code == 200 and [s["name"] for s in info["saes"]] == ["alpha", "beta"]
    assert info["saes"][1]["browser"] == "browser/0/sae-beta.html" and info["saes"][1]["build"] is None
    code, top = request(url, "api/top_features", {"sae": "beta", "text": "w5 w17", "k": 3})
    assert code == 200 and [t["token"] for t in top["tokens"]] == ["<s>", "w5", "w17"]
    f = _sae(lab, "beta").encode(hf_hook_activation(lab.hf, [1, 5, 17]))
    assert [h["latent"] for h in top["tokens"][2]["latents"]] == f[2].topk(3).indices.tolist()
    code, s = request(url, "api/steer", {"sae": "alpha", "prompt": "w5 w17", "latent": 4, "strength": "5",
                                         "tokens": 4})
    direction = 5.0 * _sae(lab, "alpha").W_dec[4]
    assert code == 200 and s["steered_tokens"] == hf_greedy(lab.hf, [1, 5, 17], 4, direction)[0]
    code, a = request(url, "api/attribute", {"sae": "alpha", "prompt": "w5 w17", "target": "w9"})
    assert code == 200 and a["target_id"] == 9
    assert a["features_total"] + a["remainder"] == pytest.approx(a["logit"], abs=1e-4)
    with urllib.request.urlopen(url + "browser/0/sae-beta.html") as r:  # the static browser's pages
        assert r.read() == (lab.features / "sae-beta.html").read_bytes()


def _sae(lab, name):
    from actcache.common.sae import SAE

    return SAE.load_from_disk(lab.run / name)


@pytest.mark.parametrize("path, body, message", [
    ("api/top_features", {"text": " ".join(["w5"] * 70)}, "the prompt has 71 tokens, more than the 64-token context"),
    ("api/steer", {"prompt": " ".join(["w5"] * 50), "latent": 1, "tokens": 20}, "plus 20 new tokens"),
    ("api/steer", {"prompt": "w5", "latent": 96, "sae": "alpha"}, "latent 96 is out of range: alpha has 96 latents"),
    ("api/steer", {"prompt": "w5", "latent": "seven"}, "latent 'seven' is not a whole number"),
    ("api/steer", {"prompt": "w5", "latent": 1, "strength": "nan"}, "strength nan: give a finite number"),
    ("api/steer", {"prompt": "w5", "latent": 1, "strength": "-inf"}, "strength -inf: give a finite number"),
    ("api/steer", {"prompt": "w5", "latent": 1, "tokens": 100000}, "tokens must be between 1 and 256"),
    ("api/latent?sae=beta&latent=300", None, "latent 300 is out of range: beta has 300 latents"),
    ("api/latent?sae=gamma&latent=3", None, "no SAE named 'gamma'"),
    ("api/attribute", {"prompt": "w5", "target": "w9 w10"}, "is 2 tokens"),
    ("api/attribute", b"{not json", "the request needs a JSON object body"),
])
def test_bad_requests_get_one_line_and_the_server_goes_on(server, path, body, message):
    p, url = server
    code, out = request(url, path, body)
    assert code == 400 and message in out["error"] and "\n" not in out["error"], out
    assert p.poll() is None
    assert request(url, "api/top_features", {"text": "w5"})[0] == 200


def test_a_client_gone_mid_request_costs_only_its_answer(server):
    p, url = server
    host, port = url.split("//")[1].strip("/").split(":")
    body = json.dumps({"prompt": "w5 w6", "latent": 2, "tokens": 40}).encode()
    for _ in range(3):  # the browser tab closes while the model generates
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /api/steer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        s.close()
    code, out = request(url, "api/steer", {"prompt": "w5 w6", "latent": 2, "tokens": 3})
    assert code == 200 and len(out["steered_tokens"]) == 3
    assert p.poll() is None


def test_a_port_in_use_is_one_line_before_the_model_loads(lab, server):
    _, url = server
    port = url.rstrip("/").rsplit(":", 1)[1]
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "actcache", "explore", str(lab.run), "--port", port],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"actcache: error: port {port} on 127.0.0.1 is in use (another explore?): pass "
                                "--port with another number, or --port 0 for any free one")
    assert time.perf_counter() - t < 60


def test_a_run_without_features_output_says_the_command(lab, tmp_path):
    from actcache.harvest.explore import create_app
    from actcache.harvest.explore.server import State
    from actcache.harvest.session import Session

    run = tmp_path / "bare"
    shutil.copytree(lab.run / "alpha", run / "alpha")
    client = create_app(State(Session(run))).test_client()
    info = client.get("/api/info").get_json()
    cmd = f"actcache features {run} --out {run / 'features'}"
    assert info["saes"][0]["build"] == cmd and info["saes"][0]["browser"] is None
    r = client.get("/api/latent?latent=3")
    assert r.status_code == 400
    assert r.get_json()["error"] == f"no latent card: alpha has no features output; build it with `{cmd}`"
    top = client.post("/api/top_features", json={"text": "w5 w6"}).get_json()
    assert top["note"] == f"no top contexts: alpha has no features output; build it with `{cmd}`"
    assert client.get("/browser/0/index.html").status_code == 404


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (`make chromium` installs Debian's)")
def test_the_page_in_chromium(lab, server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install '.[test]')")
    _, url = server
    block = json.loads((lab.features / "saes" / "alpha" / "blocks" / "00000.json").read_text())["latents"]
    vocab = json.loads((lab.features / "vocab.json").read_text())
    with sync_api.sync_playwright() as pw:
        # Debian's chromium, not a browser build of Playwright's; as root it needs --no-sandbox
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']")
            assert page.input_value("#sae") == "alpha"

            # a prompt: each token's top latents, the last token selected
            page.fill("#prompt", "w5 w17 w300")
            page.click("#run-prompt")
            page.wait_for_selector("#latents-table a.latent")
            assert page.locator("#tokens .tok").all_inner_texts() == ["<s>", "w5", "w17", "w300"]
            f = _sae(lab, "alpha").encode(hf_hook_activation(lab.hf, [1, 5, 17, 300]))
            shown = [int(x) for x in page.locator("#latents-table a.latent").evaluate_all(
                "els => els.map(e => e.dataset.latent)")]
            assert shown == f[3].topk(5).indices.tolist()
            page.click("#tokens .tok[data-position='1']")  # another token's latents
            page.wait_for_selector("#token-latents h3:has-text('token 1')")
            shown = [int(x) for x in page.locator("#latents-table a.latent").evaluate_all(
                "els => els.map(e => e.dataset.latent)")]
            assert shown == f[1].topk(5).indices.tolist()

            # a latent clicked: its card, with its top contexts from the features output
            latent = shown[0]
            page.click(f"#latents-table a.latent[data-latent='{latent}']")
            page.wait_for_selector(f"#card[data-latent='{latent}']")
            first = page.locator("#card-top .ctx").first
            rec = block[latent]["top"][0]
            assert first.locator(".hit").inner_text() == vocab[str(rec["tokens"][rec["at"]])]
            assert page.input_value("#steer-latent") == str(latent)  # ready to steer with it

            # steering beside the plain continuation
            page.fill("#steer-prompt", "w5 w17")
            page.fill("#steer-strength", "6")
            page.fill("#steer-tokens", "5")
            page.click("#run-steer")
            page.wait_for_function("document.getElementById('plain').textContent.length > 0")
            direction = 6.0 * _sae(lab, "alpha").W_dec[latent]
            steered = hf_greedy(lab.hf, [1, 5, 17], 5, direction)[0]
            plain = hf_greedy(lab.hf, [1, 5, 17], 5)[0]
            assert page.inner_text("#steered") == lab.tokenizer.decode(steered)
            assert page.inner_text("#plain") == lab.tokenizer.decode(plain)
            assert problems == []

            # a bad request: the message in the panel, and the page goes on working
            page.fill("#steer-strength", "inf")
            page.click("#run-steer")
            page.wait_for_function("document.querySelector('#steer-panel .err').textContent.length > 0")
            assert "strength inf: give a finite number" in page.inner_text("#steer-panel .err")
            page.fill("#attr-prompt", "w5 w17")
            page.fill("#attr-target", "w9")
            page.click("#run-attr")
            page.wait_for_selector("#attribution table")
            assert "logit of \"w9\"" in page.inner_text("#attribution")
            page.screenshot(path=str(tmp_path / "explore.png"), full_page=True)
        finally:
            browser.close()
