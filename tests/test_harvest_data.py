"""harvest.data: sources (file, folder, glob, parquet, streaming), packing, determinism, skipping."""

import itertools
import json

import numpy as np
import pytest

from actcache.common.errors import UserError
from actcache.harvest.data import TokenWindows, resolve_source, stdlib_files
from harvest_fixtures import write_token_jsonl

WORDS = ["<bos>", "<eos>", "<unk>"] + "alpha beta gamma delta one two three four".split()


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def take(tw, n, skip=0):
    return np.stack(list(itertools.islice(tw.windows(skip), n)))


def test_text_is_tokenised_with_eos_between_documents_and_bos_first(tmp_path, tok):
    rows = [{"content": "alpha beta gamma"}, {"content": "one two"}, {"content": "delta delta delta delta"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tw = TokenWindows(resolve_source(str(tmp_path / "d.jsonl")), 4, tok, len(tok), text_column="content", seed=0)
    windows = take(tw, 3)
    assert (windows[:, 0] == 0).all()  # BOS
    body = windows[:, 1:].ravel().tolist()
    docs = {tuple(tok(r["content"], add_special_tokens=False)["input_ids"]) + (1,) for r in rows}
    # the stream is the three documents, each followed by EOS, in the seed's order, cut every 3 tokens
    assert any(body == list(itertools.chain(*p))[:9] for p in itertools.permutations(docs))
    assert tw.info().text_column == "content" and tw.prepend_bos

    no_bos = TokenWindows(resolve_source(str(tmp_path / "d.jsonl")), 4, tok, len(tok), text_column="content",
                          prepend_bos=False, seed=0)
    assert not no_bos.prepend_bos and 0 not in take(no_bos, 3)  # no BOS anywhere; EOS still separates
    assert 1 in take(no_bos, 3)


def test_windows_are_a_pure_function_of_the_seed_and_skip_is_exact(tmp_path):
    src = resolve_source(str(write_token_jsonl(tmp_path / "t.jsonl", n_docs=60)))
    a = take(TokenWindows(src, 16, vocab_size=1000, seed=5), 40)
    b = take(TokenWindows(src, 16, vocab_size=1000, seed=5), 40)
    c = take(TokenWindows(src, 16, vocab_size=1000, seed=6), 40)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(take(TokenWindows(src, 16, vocab_size=1000, seed=5), 13, skip=27), a[27:40])


def test_same_rows_from_jsonl_parquet_folder_and_glob_give_the_same_windows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jl = write_token_jsonl(tmp_path / "t.jsonl", n_docs=30)
    rows = [json.loads(l) for l in open(jl)]
    folder = tmp_path / "parts"
    folder.mkdir()
    pq.write_table(pa.table({"input_ids": [r["input_ids"] for r in rows[:15]]}), folder / "a.parquet")
    pq.write_table(pa.table({"input_ids": [r["input_ids"] for r in rows[15:]]}), folder / "b.parquet")
    ref = take(TokenWindows(resolve_source(str(jl)), 16, vocab_size=1000), 20)
    for spec in (str(folder), str(folder / "*.parquet")):
        src = resolve_source(spec)
        assert src.builder == "parquet" and len(src.files) == 2
        np.testing.assert_array_equal(take(TokenWindows(src, 16, vocab_size=1000), 20), ref)


def test_streaming_is_deterministic_and_skips_exactly(tmp_path):
    src = resolve_source(str(write_token_jsonl(tmp_path / "t.jsonl", n_docs=60)), streaming=True)
    a = take(TokenWindows(src, 16, vocab_size=1000, seed=1), 30)
    np.testing.assert_array_equal(take(TokenWindows(src, 16, vocab_size=1000, seed=1), 30), a)
    np.testing.assert_array_equal(take(TokenWindows(src, 16, vocab_size=1000, seed=1), 10, skip=20), a[20:])
    assert TokenWindows(src, 16, vocab_size=1000).info().streaming


def test_fingerprint_follows_the_file_content(tmp_path):
    f = write_token_jsonl(tmp_path / "t.jsonl", n_docs=5)
    before = resolve_source(str(f)).fingerprint()
    f.write_text(f.read_text().replace("1", "2", 1))
    assert resolve_source(str(f)).fingerprint() != before and len(before) == 16


def test_manifest_revision_of_local_files_is_their_fingerprint_and_of_a_hub_dataset_its_commit(tmp_path):
    from types import SimpleNamespace

    from actcache.harvest.data import hub_revision

    f = write_token_jsonl(tmp_path / "t.jsonl", n_docs=5)
    info = TokenWindows(resolve_source(str(f)), 16, vocab_size=1000).info()
    assert info.revision == info.fingerprint == resolve_source(str(f)).fingerprint()
    sha = "0123456789abcdef0123456789abcdef01234567"
    streamed = SimpleNamespace(info=SimpleNamespace(download_checksums={
        f"hf://datasets/org/name@{sha}/data/train-00000.parquet": {}}))
    cached = SimpleNamespace(cache_files=[{"filename": f"/c/org___name/default/0.0.0/{sha}/name-train.arrow"}])
    assert hub_revision(streamed) == hub_revision(cached) == sha
    assert hub_revision(SimpleNamespace(cache_files=[{"filename": "/c/json/default-0a1b/0.0.0/" + "f" * 64}])) is None


def test_stdlib_alias_is_this_pythons_own_sources():
    src = resolve_source("stdlib")
    assert src.builder == "text" and src.files == stdlib_files() and len(src.files) > 50
    assert any(f.endswith("/os.py") for f in src.files)


def test_bad_sources(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.parquet"))
    with pytest.raises(UserError, match="no files match"):
        resolve_source(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(UserError, match="holds no"):
        resolve_source(str(tmp_path))


def test_prefetch_keeps_order_and_raises_in_order():
    from actcache.harvest.data import prefetch

    assert list(prefetch(iter(range(1000)), depth=7)) == list(range(1000))

    def failing():
        yield 1
        yield 2
        raise UserError("bad row")

    got = prefetch(failing())
    assert [next(got), next(got)] == [1, 2]
    with pytest.raises(UserError, match="bad row"):
        next(got)


def test_text_files_stay_whole_documents_in_order(tmp_path):
    """A window is one document's tokens in order, or the end of one, EOS, and the start of the next:
    never a collage of paragraphs from several files (the shuffle moves whole files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n_files, per_file = 6, 90
    vocab = {"<bos>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": 3 + i for i in range(n_files * per_file)})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tk = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    for f in range(n_files):
        words = [f"w{f * per_file + j}" for j in range(per_file)]
        # paragraphs separated by blank lines, and lines within them: none of these may split the file
        paras = ["\n".join(" ".join(words[a + b:a + b + 5]) for b in range(0, 15, 5)) for a in range(0, per_file, 15)]
        (tmp_path / f"doc{f}.txt").write_text("\n\n".join(paras) + "\n")
    src = resolve_source(str(tmp_path))
    assert len(src.files) == n_files
    def files_in_order(seed):
        windows = take(TokenWindows(src, 16, tk, len(tk), seed=seed), (n_files * (per_file + 1)) // 15)
        assert (windows[:, 0] == 0).all()
        for w in windows:  # within a window: consecutive ids of one file, broken only by EOS
            for part in split_at_eos(w[1:].tolist()):
                ids = [i - 3 for i in part]
                assert ids == list(range(ids[0], ids[0] + len(ids))), w
                assert len({i // per_file for i in ids}) == 1, w
        # the whole stream is the files, each complete and in order, joined by EOS
        docs = split_at_eos(windows[:, 1:].ravel().tolist())[:-1]  # the last one may be cut
        order = [(d[0] - 3) // per_file for d in docs]
        for f, d in zip(order, docs):
            assert [i - 3 for i in d] == list(range(f * per_file, (f + 1) * per_file))
        assert len(set(order)) == len(order) >= n_files - 1
        return order

    # the seed shuffles whole files
    assert len({tuple(files_in_order(seed)) for seed in range(4)}) > 1


def split_at_eos(ids, eos=1):
    parts, cur = [], []
    for i in ids:
        if i == eos:
            parts.append(cur)
            cur = []
        else:
            cur.append(i)
    return [p for p in parts + [cur] if p]
