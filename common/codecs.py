"""Codec names the user can pick, and the zarr v3 codec chains they stand for.

Every chain ends in crc32c so that a damaged chunk fails to decode instead of returning garbage."""

from __future__ import annotations

from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .errors import UserError

# Chosen by benchmarks/codecs.py on activations of the bundled model (see the README).
DEFAULT_CODEC = "blosc-zstd-5"

_HELP = "zstd[-LEVEL], lz4, blosc-zstd[-LEVEL], blosc-lz4[-LEVEL], none"


def _level(text: str, default: int, lo: int, hi: int, name: str) -> int:
    if not text:
        return default
    try:
        v = int(text)
    except ValueError:
        raise UserError(f"invalid codec {name!r}: the level must be a whole number; valid codecs: {_HELP}") from None
    if not lo <= v <= hi:
        raise UserError(f"invalid codec {name!r}: level must be within {lo}..{hi}")
    return v


def compressors(name: str) -> list:
    """The bytes-to-bytes codecs (compressor, then crc32c) for a codec name such as 'zstd-3'."""
    n = name.strip().lower()
    base, _, lvl = n.partition("-")
    if n.startswith("blosc-"):
        rest = n[len("blosc-"):]
        cname, _, lvl = rest.partition("-")
        if cname not in ("zstd", "lz4", "lz4hc", "zlib", "blosclz"):
            raise UserError(f"invalid codec {name!r}; valid codecs: {_HELP}")
        level = _level(lvl, 5 if cname == "zstd" else 5, 0, 9, name)
        comp = [BloscCodec(cname=cname, clevel=level, shuffle="shuffle", typesize=2)]
    elif base == "zstd":
        comp = [ZstdCodec(level=_level(lvl, 3, -7, 22, name))]
    elif base == "lz4":
        from zarr.codecs.numcodecs import LZ4

        comp = [LZ4(acceleration=_level(lvl, 1, 1, 64, name))]
    elif n == "none":
        comp = []
    else:
        raise UserError(f"invalid codec {name!r}; valid codecs: {_HELP}")
    return comp + [Crc32cCodec()]


def validate(name: str) -> str:
    """Check a codec name early (before any model is loaded); returns it normalised."""
    compressors(name)
    return name.strip().lower()
