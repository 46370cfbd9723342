"""Training-loader reads of one store from local disk and from an S3 server on loopback, with each
of zarr's S3 backends (fsspec/s3fs and obstore), over a few loader settings. One table (markdown) and
the JSON beside it in benchmarks/results/.

The store is written once to a folder; `rclone serve s3` serves that folder, so both paths read the
very same bytes (the page cache holds them: this measures the client side, the S3 protocol and the
decoding, not a disk). Every setting runs local, fsspec and obstore back to back, so their ratios
are measured under the same machine load.

    python -m benchmarks.bench_s3_read                       # d=768, 128k tokens, 8 s per point
    python -m benchmarks.bench_s3_read --tokens 256k --seconds 15 --settings 2x8,4x8,8x8,16x16
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import sys
import tempfile
from pathlib import Path

from actcache.common.codecs import DEFAULT_CODEC
from actcache.common.progress import parse_count
from actcache.train.bench_read import bench_read
from benchmarks.s3_server import rclone_s3
from benchmarks.synthetic import make_store

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
BACKENDS = ("local", "fsspec", "obstore")


def parse_settings(text: str) -> list[tuple[int, int]]:
    """'4x8,8x8' -> [(4, 8), (8, 8)]: loader threads x window chunks."""
    return [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part]


def command(args: list[str]) -> str:
    """The command that reproduces a run: its arguments less those naming this machine's folders."""
    keep, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--work", "--out"):
            skip = True
        elif not arg.startswith(("--work=", "--out=")):
            keep.append(arg)
    return " ".join(["python -m benchmarks.bench_s3_read"] + keep)


def build(folder: Path, tokens: int, d: int, context: int, chunk_sequences: int, codec: str) -> str:
    path = folder / "acts" / f"d{d}-{tokens}-{codec}.zarr"
    if not (path / "zarr.json").exists():
        make_store(str(path), d=d, n_sequences=max(1, tokens // context), context_size=context,
                   chunk_sequences=chunk_sequences, codec=codec, fast_random=True)
    return str(path)


def run(tokens: int = 131072, d: int = 768, context: int = 128, chunk_sequences: int = 64,
        codec: str = DEFAULT_CODEC, settings: list[tuple[int, int]] | None = None, seconds: float = 8.0,
        batch_size: int = 4096, work: str | None = None, backends: tuple[str, ...] = BACKENDS) -> dict:
    settings = settings or [(2, 8), (4, 8), (8, 8), (8, 16)]
    folder = Path(work or tempfile.mkdtemp(prefix="actcache-s3read-"))
    local = build(folder, tokens, d, context, chunk_sequences, codec)
    url = "s3://acts/" + Path(local).name
    rows = []
    old = os.environ.get("ACTCACHE_S3_BACKEND")
    try:
        with rclone_s3(folder):
            for threads, window in settings:
                for backend in backends:
                    if backend == "local":
                        target = local
                    else:
                        os.environ["ACTCACHE_S3_BACKEND"] = backend
                        target = url
                    r = bench_read(target, batch_size=batch_size, threads=threads, window_chunks=window,
                                   seconds=seconds)
                    r["where"] = "local disk" if backend == "local" else "S3 (rclone, loopback)"
                    rows.append(r)
                    print(f"{backend:8s} {threads}x{window}: {r['tokens_per_s']:,.0f} tokens/s, "
                          f"{r['decoded_gb_per_s']:.3f} GB/s decoded, waited {100 * r['wait_fraction']:.0f}%",
                          file=sys.stderr, flush=True)
    finally:
        if old is None:
            os.environ.pop("ACTCACHE_S3_BACKEND", None)
        else:
            os.environ["ACTCACHE_S3_BACKEND"] = old
    return {"meta": {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                     "host": socket.gethostname().split(".")[0] or "host", "cores": os.cpu_count(),
                     "cpu": platform.processor() or platform.machine(), "tokens": tokens, "d": d,
                     "context": context, "chunk_sequences": chunk_sequences, "codec": codec, "seconds": seconds,
                     "batch_size": batch_size, "command": command(sys.argv[1:])},
            "rows": rows}


def markdown(res: dict) -> str:
    m = res["meta"]
    by = {(r["threads"], r["window_chunks"], r["backend"]): r for r in res["rows"]}
    settings = sorted({(r["threads"], r["window_chunks"]) for r in res["rows"]}, key=lambda s: (s[1], s[0]))
    lines = [f"# Training-loader reads: local disk vs S3 on loopback — {m['date']} on {m['host']}", "",
             f"{m['cpu']}, {m['cores']} cores. Store: {m['tokens']:,} tokens, d={m['d']}, float16, codec {m['codec']}, "
             f"{m['chunk_sequences']} sequences of {m['context']} tokens per chunk; batch {m['batch_size']}; "
             f"{m['seconds']:g} s per point after the first batch. S3: `rclone serve s3` on 127.0.0.1 over the "
             "same folder. Decoded GB/s = float16 bytes delivered; stored GB/s = bytes fetched (compressed).", "",
             f"Command: `{m['command'].strip()}`", "",
             "| threads x window | read from | tokens/s | decoded GB/s | stored GB/s | consumer waited | first batch (s) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    names = {"local": "local disk", "fsspec": "S3, fsspec (s3fs)", "obstore": "S3, obstore"}
    for s in settings:
        for b in BACKENDS:
            r = by.get((*s, b))
            if r:
                lines.append(f"| {s[0]} x {s[1]} | {names[b]} | {r['tokens_per_s']:,.0f} | {r['decoded_gb_per_s']:.3f} | "
                             f"{r['stored_gb_per_s']:.3f} | {100 * r['wait_fraction']:.0f}% | "
                             f"{r['first_batch_seconds']:.2f} |")
    ratios = []
    for s in settings:
        f, o, loc = by.get((*s, "fsspec")), by.get((*s, "obstore")), by.get((*s, "local"))
        if f and o:
            ratios.append(f"{s[0]}x{s[1]}: obstore/fsspec {o['tokens_per_s'] / f['tokens_per_s']:.2f}"
                          + (f", obstore/local {o['tokens_per_s'] / loc['tokens_per_s']:.2f}" if loc else ""))
    if ratios:
        lines += ["", "Ratios (tokens/s, same setting, measured back to back): " + "; ".join(ratios) + "."]
    lines += [f"\nNote: {n}" for n in m.get("notes") or []]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="128k", help="tokens in the store")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--chunk-sequences", type=int, default=64)
    ap.add_argument("--codec", default=DEFAULT_CODEC)
    ap.add_argument("--settings", default="2x8,4x8,8x8,8x16", help="threads x window chunks, comma-separated")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--work", help="folder for the store (reused when it is there)")
    ap.add_argument("--out", default=str(RESULTS / "s3-read"), help="results stem: writes .md and .json")
    ap.add_argument("--note", action="append", default=[], help="a line for the report (e.g. the machine was shared)")
    a = ap.parse_args(argv)
    res = run(parse_count(a.tokens), a.d, chunk_sequences=a.chunk_sequences, codec=a.codec,
              settings=parse_settings(a.settings), seconds=a.seconds, batch_size=a.batch_size, work=a.work)
    res["meta"]["notes"] = a.note
    md = markdown(res)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in res["rows"]:
        r["store"] = Path(r["store"]).name if not r["store"].startswith("s3://") else r["store"]
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
