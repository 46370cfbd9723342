"""The explorer's web application: the pages of the features output (the static feature browser) and
live panels backed by one Session (the model and SAEs loaded once).

    from actcache.harvest.explore import serve
    serve(["runs/s1"], port=8765)        # http://127.0.0.1:8765/

Routes (JSON in and out; an error is {"error": one line} with status 400, or 500 for a fault of ours):

  GET  /                              the explorer page (assets/explore.html)
  GET  /assets/<file>                 its script and style (package data, no network)
  GET  /browser/<n>/<path>            the static feature browser of features output n
  GET  /api/info                      model, SAEs, their features output and the command that builds a missing one
  POST /api/top_features              {sae, text, k}                  -> Session.top_features
  GET  /api/latent?sae=&latent=       a latent's card                 -> Session.latent
  POST /api/steer                     {sae, prompt, latent, strength, tokens, positions} -> Session.steer
  POST /api/attribute                 {sae, prompt, target, top}      -> Session.attribute

Built on Flask (routing, JSON, safe static files) and Werkzeug's threaded WSGI server, the pair
TensorBoard also serves a local research viewer with. Pages and data files are served while the model
works; the model answers one request at a time (a lock). A bad request is answered with one line and
the server goes on serving; a browser tab closed mid-request costs only that answer."""

from __future__ import annotations

import errno
import logging
import socket
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from ...common.errors import UserError, first_line
from ...common.features_output import INDEX_PAGE
from ...common.finite import finite_json
from ...common.progress import log

HOST = "127.0.0.1"
PORT = 8765
MAX_NEW_TOKENS = 256  # per steering request: a page cannot hold the model for longer than that


@dataclass
class State:
    """What the application serves: the session, the features outputs it reads, and the model's lock."""

    session: Any
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def outputs(self) -> list[Path]:
        seen: list[Path] = []
        for e in self.session.saes.values():
            if e.features is not None and e.features.folder not in seen:
                seen.append(e.features.folder)
        return seen


def _assets() -> Any:
    return resources.files(__package__) / "assets"


def create_app(state: State) -> Any:
    """The Flask application over a State."""
    from flask import Flask, Response, abort, jsonify, request, send_from_directory
    from werkzeug.exceptions import HTTPException

    app = Flask(__name__, static_folder=None)
    app.json.sort_keys = False

    def asset(name: str) -> Response:
        f = _assets() / name
        if "/" in name or not f.is_file():
            abort(404)
        kind = {"html": "text/html", "js": "text/javascript", "css": "text/css"}.get(name.rsplit(".", 1)[-1],
                                                                                    "application/octet-stream")
        return Response(f.read_bytes(), mimetype=kind)

    @app.get("/")
    def index() -> Response:
        return asset("explore.html")

    @app.get("/favicon.ico")
    def favicon() -> tuple[str, int]:
        return "", 204

    @app.get("/assets/<name>")
    def assets(name: str) -> Response:
        return asset(name)

    @app.get("/browser/<int:n>/")
    @app.get("/browser/<int:n>/<path:path>")
    def browser(n: int, path: str = INDEX_PAGE) -> Response:
        outputs = state.outputs
        if not 0 <= n < len(outputs):
            abort(404)
        return send_from_directory(outputs[n], path)

    @app.get("/api/info")
    def info() -> Response:
        s = state.session
        outputs = state.outputs
        saes = []
        for e in s.saes.values():
            n = outputs.index(e.features.folder) if e.features is not None else None
            folder = (e.features.entries[e.features_name]["folder"].split("/")[-1]) if n is not None else None
            saes.append({"name": e.name, "hook": e.hook, "d_sae": e.d_sae, "d_in": int(e.sae.cfg.d_in),
                         "architecture": e.sae.cfg.architecture,
                         "features": str(e.features.folder) if n is not None else None,
                         "browser": f"browser/{n}/sae-{folder}.html" if n is not None else None,
                         "build": s.missing_features.get(e.name),
                         "problem": s.features_problem(e.name) if n is None else None})
        return jsonify({"model": s.model.info.name, "n_ctx": int(s.model.info.n_ctx), "saes": saes,
                        "browsers": [f"browser/{i}/{INDEX_PAGE}" for i in range(len(outputs))],
                        "max_new_tokens": MAX_NEW_TOKENS})

    def answer(obj: Any) -> Response:  # JSON without a bare NaN (a browser's JSON.parse refuses one)
        return jsonify(finite_json(obj)[0])

    def model_call(fn: Callable[[], Any]) -> Response:
        with state.lock:  # one request at a time on the model
            return answer(fn())

    def body() -> dict[str, Any]:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise UserError("the request needs a JSON object body")
        return data

    @app.post("/api/top_features")
    def top_features() -> Response:
        d = body()
        return model_call(lambda: state.session.top_features(
            _text(d, "text"), k=_int(d.get("k", 5), "k", 1, 64), sae=d.get("sae")).to_dict())

    @app.get("/api/latent")
    def latent() -> Response:  # the features output only: answered while the model works
        return answer(state.session.latent(request.args.get("latent", ""), request.args.get("sae")))

    @app.post("/api/steer")
    def steer() -> Response:
        d = body()
        return model_call(lambda: state.session.steer(
            _text(d, "prompt"), d.get("latent"),
            _number(d.get("strength", 8.0), "strength"), _int(d.get("tokens", 20), "tokens", 1, MAX_NEW_TOKENS),
            sae=d.get("sae"), positions=str(d.get("positions", "all"))).to_dict())

    @app.post("/api/attribute")
    def attribute() -> Response:
        d = body()
        return model_call(lambda: state.session.attribute(
            _text(d, "prompt"), _text(d, "target", strip=False), sae=d.get("sae"),
            top=_int(d.get("top", 10), "top", 1, 100)).to_dict())

    @app.errorhandler(UserError)
    def user_error(e: UserError) -> tuple[Response, int]:
        return jsonify({"error": str(e)}), 400

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> tuple[Response, int]:
        return jsonify({"error": f"{e.code} {e.name}: {e.description}"}), e.code or 500

    @app.errorhandler(Exception)
    def fault(e: Exception) -> tuple[Response, int]:
        log.error(f"explore: {request.path} failed: {type(e).__name__}: {first_line(e)}", exc_info=log.isEnabledFor(logging.DEBUG))
        return jsonify({"error": f"internal error ({type(e).__name__}: {first_line(e)}); the server goes on"}), 500

    return app


def _text(d: dict[str, Any], key: str, strip: bool = True) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not (v.strip() if strip else v):
        raise UserError(f"give a {key} (text)")
    return v


def _number(v: Any, name: str) -> float:
    """A number from JSON or from the text of a field ('nan' and 'inf' reach the session, which refuses them)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        raise UserError(f"{name} {v!r} is not a number") from None


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    try:
        f = float(v)
        if f != int(f):
            raise ValueError
        i = int(f)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{name} {v!r} is not a whole number") from None
    if not lo <= i <= hi:
        raise UserError(f"{name} must be between {lo} and {hi}, got {i}")
    return i


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one clear line when the port is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {host}: {e.strerror}; give --host an address such as 127.0.0.1") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(64)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another explore?): pass --port with another "
                            "number, or --port 0 for any free one") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(paths: Sequence[str | Path], *, host: str = HOST, port: int = PORT, features: Sequence[str | Path] = (),
          model: Any = None, device: str | None = None, tokenizer: str | None = None,
          ready: Callable[[str], None] | None = None) -> None:
    """Load a Session over `paths` (run or SAE folders) and serve the explorer until interrupted.
    The port is taken before the model loads, so a port in use fails at once. `ready(url)` is called
    when the server accepts requests (default: print the URL)."""
    from werkzeug.serving import make_server

    from ..session import Session

    sock = bind(host, port)
    try:
        session = Session(list(paths), model=model, features=features, device=device, tokenizer=tokenizer)
        for name in session.saes:
            if session.get(name).features is None:
                log.warning(f"no top contexts or latent cards for {name}: {session.features_problem(name)}")
        logging.getLogger("werkzeug").setLevel(logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
        server = make_server(host, port, create_app(State(session)), threaded=True, fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{server.port}/"
    (ready or (lambda u: print(f"explore: {u}  (Ctrl-C stops it)", flush=True)))(url)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        sock.close()
