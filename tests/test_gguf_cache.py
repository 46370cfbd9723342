"""The converted copy of a .gguf model: a second load reads it instead of the file, and gives the same
model as transformers' own reading of the .gguf file (the independent reference); a damaged copy or an
unwritable cache costs only the conversion."""

from __future__ import annotations

import logging
import shutil
import time

import pytest
import torch

from actcache.harvest import gguf_cache
from actcache.harvest.models import DEFAULT_MODEL, bundled_gguf, load_model

pytestmark = pytest.mark.slow  # the bundled model, converted once more

TEXTS = ["The capital of France is", "  spaces,\ttabs and ünïcödé — 東京 🙂", "<|im_start|>user\nhi<|im_end|>"]


IDS = torch.tensor([[1, 504, 3575, 282, 4649, 314]])


def _timed_load():
    t = time.process_time()
    model = load_model(DEFAULT_MODEL, device="cpu")
    return model, time.process_time() - t


def _same_as_transformers(model, hf_model):
    ref, ref_tok = hf_model
    for text in TEXTS:
        assert model.tokenizer(text).input_ids == ref_tok(text).input_ids, text
    msgs = [{"role": "user", "content": "Name a colour."}]
    assert (model.tokenizer.apply_chat_template(msgs, tokenize=False)
            == ref_tok.apply_chat_template(msgs, tokenize=False))
    with torch.no_grad():
        logits = model.tl(IDS)
        # the hooked model runs its own ops, which round differently from transformers' in the last bits
        torch.testing.assert_close(logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)
    return logits


def test_a_copy_gives_the_model_bit_for_bit_and_a_damaged_one_is_converted_again(bundled_model, hf_model, tmp_path,
                                                                                  monkeypatch, caplog):
    import transformers

    # the run's first load of the bundled model converted it into the run's cache (or read it from there)
    made = gguf_cache.entry_folder(bundled_gguf(), transformers.__version__)
    assert made is not None and (made / gguf_cache.MARKER).is_file() and (made / "model.safetensors").is_file()
    assert not [p for p in made.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]  # nothing that is a pickle
    assert not [p for p in made.parent.iterdir() if ".tmp-" in p.name]  # no temporary folder left
    entry = tmp_path / "gguf" / made.name
    shutil.copytree(made, entry)
    monkeypatch.setenv(gguf_cache.ENV, str(tmp_path))

    read, reading = _timed_load()  # from the copy
    from_copy = _same_as_transformers(read, hf_model)

    weights = entry / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level(logging.WARNING, logger="actcache"):
        converted, converting = _timed_load()  # the damaged copy: read from the .gguf file again
    assert any("could not be read" in r.getMessage() for r in caplog.records), caplog.text
    from_file = _same_as_transformers(converted, hf_model)
    assert torch.equal(from_copy, from_file)  # the same weights bit for bit
    assert weights.stat().st_size == size and (entry / gguf_cache.MARKER).is_file()  # converted and kept again
    assert reading < 0.3 * converting, (reading, converting)  # CPU-seconds, one process


def test_an_unwritable_cache_warns_once_and_leaves_nothing(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    with caplog.at_level(logging.WARNING, logger="actcache"):
        gguf_cache.save(blocker / "gguf" / "m-0", source, lambda tmp: (tmp / "x").write_text("y"))
    [record] = caplog.records
    assert "could not keep a converted copy of m.gguf" in record.getMessage()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "m.gguf"]

    # a write that fails half-way (a full disk) leaves no temporary folder
    def full(tmp):
        (tmp / "part").write_text("half")
        raise OSError(28, "No space left on device")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="actcache"):
        gguf_cache.save(tmp_path / "c" / "m-0", source, full)
    assert "No space left on device" in caplog.text
    assert list((tmp_path / "c").iterdir()) == []


def test_the_cache_folder_and_turning_it_off(monkeypatch, tmp_path):
    monkeypatch.delenv(gguf_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gguf_cache.cache_root() == tmp_path / "actcache"
    monkeypatch.setenv(gguf_cache.ENV, "off")
    assert gguf_cache.cache_root() is None and gguf_cache.entry_folder(tmp_path / "x.gguf", "1") is None
