"""T2 data: bundled corpus, user text, split, tokenizer cache, packing, held-out batches, unigram entropy."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from deepmoe import data
from deepmoe.data import (
    EOT_TOKEN,
    PackedBatches,
    TextSource,
    bundled_corpus,
    get_tokenizer,
    heldout_batches,
    prepare_corpus,
    read_text_path,
    split_documents,
    unigram_entropy,
)

# cpu_only: data pipelines: files, numpy and CPU generators
pytestmark = pytest.mark.cpu_only

# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus() -> list[TextSource]:
    return bundled_corpus()


@pytest.fixture(scope="module")
def small_corpus(corpus) -> list[TextSource]:
    """A few documents of each bundled domain: enough to train and split quickly."""
    english = [s for s in corpus if s.domain == "english"][:4]
    code = [s for s in corpus if s.domain == "code"][:30]
    return english + code


@pytest.fixture(scope="module")
def tokenizer(small_corpus, tmp_path_factory):
    return get_tokenizer(small_corpus, 512, tmp_path_factory.mktemp("tok-cache"))


def _stream(n: int = 1000) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) * 7 % 1009  # distinct values per position for n <= 1009


# ---------------------------------------------------------------------------------------- bundled corpus


def test_bundled_corpus_has_two_domains_of_real_text(corpus):
    by_domain = Counter(s.domain for s in corpus)
    assert set(by_domain) == {"english", "code"}
    assert by_domain["english"] == 42  # the modern-spelling Shakespeare works
    sizes = {d: sum(len(s.text.encode()) for s in corpus if s.domain == d) for d in by_domain}
    assert 4e6 < sizes["english"] < 6e6
    assert 2e6 < sizes["code"] <= data.CODE_DOMAIN_BYTES
    names = [s.name for s in corpus]
    assert len(set(names)) == len(names)
    assert "shakespeare/hamlet" in names
    hamlet = next(s.text for s in corpus if s.name == "shakespeare/hamlet")
    assert "To be, or not to be" in hamlet
    code_names = [n for n in names if n.startswith("stdlib/")]
    assert not any("/test" in n or n.split("/")[-1].startswith("test_") for n in code_names)
    assert all(("def " in s.text or "class " in s.text) for s in corpus if s.domain == "code")


def test_bundled_corpus_is_deterministic(corpus):
    again = bundled_corpus()
    assert [(s.name, s.domain) for s in again] == [(s.name, s.domain) for s in corpus]
    assert data.corpus_hash(again) == data.corpus_hash(corpus)


# ------------------------------------------------------------------------------------------- user text


def test_read_text_path_folder_nested(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text\n")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "sub" / "b.md").write_text("# beta\n")
    (tmp_path / "sub" / "deeper" / "c.py").write_text("x = 1\n")
    (tmp_path / "sub" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")  # not a text type: skipped
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("hidden\n")
    (tmp_path / "empty.txt").write_text("   \n")  # whitespace only: skipped
    sources = read_text_path(tmp_path)
    assert [s.name for s in sources] == ["a.txt", "sub/b.md", "sub/deeper/c.py"]
    assert {s.domain for s in sources} == {"user"}
    assert sources[2].text == "x = 1\n"
    single = read_text_path(tmp_path / "sub" / "deeper" / "c.py")
    assert [(s.name, s.text) for s in single] == [("c.py", "x = 1\n")]


def test_read_text_path_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no text files") as e:
        read_text_path(empty)
    assert str(empty) in str(e.value)

    bad_dir = tmp_path / "bad"
    (bad_dir / "sub").mkdir(parents=True)
    (bad_dir / "ok.txt").write_text("fine\n")
    bad = bad_dir / "sub" / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    for path in (bad_dir, bad):
        with pytest.raises(ValueError, match="not UTF-8") as e:
            read_text_path(path)
        assert str(bad) in str(e.value) and "0xe9" in str(e.value)

    with pytest.raises(ValueError, match="does not exist"):
        read_text_path(tmp_path / "missing")
    blank = tmp_path / "blank.txt"
    blank.write_text("")
    with pytest.raises(ValueError, match="no text") as e:
        read_text_path(blank)
    assert str(blank) in str(e.value)


def test_prepare_corpus_rejects_bad_user_data_with_value_error(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="no text files"):
        prepare_corpus(tmp_path / "d", vocab_size=300, cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------------- split


def _docs(domain: str, n: int, size: int = 500) -> list[TextSource]:
    return [TextSource(f"{domain}/{i}", domain, f"{domain} document {i}\n" * (size // 20)) for i in range(n)]


def test_split_is_deterministic_and_disjoint_by_document():
    sources = _docs("english", 40) + _docs("code", 60)
    train, heldout = split_documents(sources, 0.1)
    again_train, again_heldout = split_documents(list(reversed(sources)), 0.1)
    assert [s.name for s in train] == [s.name for s in again_train]  # does not depend on the input order
    assert [s.name for s in heldout] == [s.name for s in again_heldout]
    train_names, heldout_names = {s.name for s in train}, {s.name for s in heldout}
    assert not train_names & heldout_names
    assert train_names | heldout_names == {s.name for s in sources}
    for domain, n in (("english", 40), ("code", 60)):
        held = sum(s.domain == domain for s in heldout)
        assert 1 <= held <= math.ceil(0.2 * n)  # each domain has held-out documents, about 10% of them
    # adding an unrelated document does not move the others between the sides ... within its own domain
    other_train, other_heldout = split_documents(sources + _docs("user", 5), 0.1)
    assert {s.name for s in other_heldout if s.domain != "user"} == heldout_names


def test_split_of_a_single_document_holds_out_its_tail():
    text = "".join(f"line {i}\n" for i in range(1000))
    train, heldout = split_documents([TextSource("book.txt", "user", text)], 0.05)
    assert [s.name for s in train] == ["book.txt"] and [s.name for s in heldout] == ["book.txt#heldout"]
    assert train[0].text + heldout[0].text == text
    assert heldout[0].text.startswith("line ") and 0.03 < len(heldout[0].text) / len(text) < 0.07


def test_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_documents(_docs("x", 3), 0.0)
    with pytest.raises(ValueError, match="unique"):
        split_documents(_docs("x", 3) + _docs("x", 1), 0.1)


# --------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tokenizer):
    assert tokenizer.token_to_id(EOT_TOKEN) is not None
    assert tokenizer.get_vocab_size() == 512
    for text in (
        "To be, or not to be, that is the question:\n",
        "def f(x):\n    return {'a': x ** 2}  # comment\n\n\tTabs\r\n",
        "Ünïcödé — 中文 🤖 and bytes like \x00\x7f",
        "",
    ):
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_cache_hit_does_not_retrain(small_corpus, tmp_path, monkeypatch):
    sources = small_corpus[:3]
    first = get_tokenizer(sources, 400, tmp_path)
    files = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(files) == 1 and not list(tmp_path.rglob(".*.tmp-*"))
    mtime = files[0].stat().st_mtime_ns

    class NoTraining:
        def BpeTrainer(self, *args, **kwargs):  # noqa: N802
            raise AssertionError("the tokenizer was retrained despite a cached one")

    monkeypatch.setattr(data.tokenizer, "trainers", NoTraining())
    second = get_tokenizer(sources, 400, tmp_path)
    assert second.to_str() == first.to_str()
    assert files[0].stat().st_mtime_ns == mtime
    # another vocab size or corpus is another cache entry (and would train: the patched trainer refuses)
    with pytest.raises(AssertionError, match="retrained"):
        get_tokenizer(sources, 401, tmp_path)
    with pytest.raises(AssertionError, match="retrained"):
        get_tokenizer(sources[:2], 400, tmp_path)


def test_cache_dir_from_environment(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPMOE_CACHE", str(tmp_path / "env-cache"))
    assert data.resolve_cache_dir() == tmp_path / "env-cache"
    assert data.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"  # the argument wins
    get_tokenizer(small_corpus[:2], 300, None)
    assert len(list((tmp_path / "env-cache" / "tokenizers").glob("bpe-300-*.json"))) == 1
    monkeypatch.delenv("DEEPMOE_CACHE")
    assert data.resolve_cache_dir() == Path.home() / ".cache" / "deepmoe"


def test_damaged_cache_file_is_replaced(small_corpus, tmp_path):
    get_tokenizer(small_corpus[:2], 300, tmp_path)
    (path,) = (tmp_path / "tokenizers").glob("*.json")
    path.write_text("{ not json")
    with pytest.warns(UserWarning, match="unreadable cached tokenizer"):
        tok = get_tokenizer(small_corpus[:2], 300, tmp_path)
    assert tok.get_vocab_size() == 300
    assert json.loads(path.read_text())["model"]["type"] == "BPE"


def test_vocab_size_validation(small_corpus, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        get_tokenizer(small_corpus[:1], 100, tmp_path)


# ------------------------------------------------------------------------------------------------ corpus


def test_prepare_corpus_user_folder_and_token_cache(tmp_path):
    folder = tmp_path / "texts"
    (folder / "nested").mkdir(parents=True)
    for i in range(12):
        sub = folder / "nested" if i % 2 else folder
        (sub / f"doc{i}.txt").write_text(f"Document {i} says hello to the world. <|endoftext|> is plain text.\n" * 40)
    cache = tmp_path / "cache"
    tc = prepare_corpus(folder, vocab_size=320, heldout_fraction=0.1, cache_dir=cache)
    assert tc.vocab_size == tc.tokenizer.get_vocab_size() <= 320
    assert tc.train.dtype == tc.heldout.dtype == torch.int64
    assert set(tc.domains) == {"user"}
    assert torch.equal(tc.domains["user"][0], tc.train) and torch.equal(tc.domains["user"][1], tc.heldout)
    assert set(tc.train_documents).isdisjoint(tc.heldout_documents) and len(tc.heldout_documents) >= 1
    # every document ends with exactly one end-of-text token; the literal string inside a text is not one
    assert int((tc.train == tc.eot_id).sum()) == len(tc.train_documents)
    assert int((tc.heldout == tc.eot_id).sum()) == len(tc.heldout_documents)
    assert tc.train[-1] == tc.eot_id and int(tc.train.max()) < tc.vocab_size
    first_doc = tc.train[: int((tc.train == tc.eot_id).nonzero()[0])]
    assert "hello to the world. <|endoftext|> is plain" in tc.tokenizer.decode(first_doc.tolist())

    (token_file,) = (cache / "tokens").glob("*.npz")
    mtime = token_file.stat().st_mtime_ns
    again = prepare_corpus(folder, vocab_size=320, heldout_fraction=0.1, cache_dir=cache)
    assert token_file.stat().st_mtime_ns == mtime  # loaded, not rewritten
    assert torch.equal(again.train, tc.train) and torch.equal(again.heldout, tc.heldout)
    assert again.corpus_id == tc.corpus_id
    assert not list(cache.rglob(".*.tmp-*"))


def test_prepare_bundled_corpus_subset(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(data.corpus, "bundled_corpus", lambda: list(small_corpus))
    tc = prepare_corpus(None, vocab_size=512, cache_dir=tmp_path)
    assert set(tc.domains) == {"english", "code"}
    for domain, (train, heldout) in tc.domains.items():
        assert train.numel() > 0 and heldout.numel() > 0, domain
    assert sum(t.numel() for t, _ in tc.domains.values()) == tc.train.numel()
    assert sum(h.numel() for _, h in tc.domains.values()) == tc.heldout.numel()
    assert tc.documents_per_domain == {"english": 4, "code": 30}
    assert 3.0 < unigram_entropy(tc.train, tc.vocab_size) < math.log(tc.vocab_size)


# ----------------------------------------------------------------------------------------------- packing


def _window_starts(stream: torch.Tensor, batch: torch.Tensor, seq_len: int) -> list[int]:
    """Where each row lies in the stream; it must be exactly one of the non-overlapping windows."""
    starts = []
    for row in batch:
        found = [i for i in range(0, stream.numel() - seq_len + 1) if torch.equal(stream[i : i + seq_len], row)]
        assert len(found) == 1 and found[0] % seq_len == 0, "a row is not one of the stream's windows"
        starts.append(found[0])
    return starts


def test_packed_batches_are_real_windows_covering_each_epoch():
    stream, seq_len, batch_size = _stream(1000), 16, 5  # 62 windows: batches cross epoch boundaries
    batches = PackedBatches(stream, batch_size, seq_len, seed=3)
    seen = []
    for _ in range(25):  # 125 windows: two epochs and one more
        batch = next(batches)
        assert batch.shape == (batch_size, seq_len) and batch.dtype == torch.int64
        seen += _window_starts(stream, batch, seq_len)
    assert sorted(seen[:62]) == list(range(0, 62 * seq_len, seq_len))  # epoch 0: each window once
    assert sorted(seen[62:124]) == list(range(0, 62 * seq_len, seq_len))  # epoch 1 too
    assert seen[:62] != seen[62:124]  # in another order
    assert batches.state_dict()["epoch"] == 2 and batches.state_dict()["position"] == 1


def test_packed_batches_determinism():
    stream = _stream(1000)
    a = [next(PackedBatches(stream, 4, 8, seed=7)) for _ in range(1)]
    one, two, other = (PackedBatches(stream, 4, 8, seed=s) for s in (7, 7, 8))
    first = [next(one) for _ in range(10)]
    assert all(torch.equal(x, next(two)) for x in first)
    assert torch.equal(a[0], first[0])
    assert not all(torch.equal(x, next(other)) for x in first)
    assert iter(one) is one


@pytest.mark.parametrize("k", [0, 3, 7, 12, 20])
def test_packed_batches_resume(k):
    stream = _stream(700)  # 43 windows of 16, batch 6: epoch boundaries inside batches 7, 14, 21
    uninterrupted = PackedBatches(stream, 6, 16, seed=11)
    expected = [next(uninterrupted) for _ in range(k + 10)]

    interrupted = PackedBatches(stream, 6, 16, seed=11)
    for _ in range(k):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state_dict()))  # JSON-serialisable
    resumed = PackedBatches(stream, 6, 16, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    for i in range(10):
        assert torch.equal(next(resumed), expected[k + i]), f"batch {k + i} differs after resume"


def test_packed_batches_state_must_match_the_stream():
    state = PackedBatches(_stream(700), 6, 16, seed=1).state_dict()
    with pytest.raises(ValueError, match="seq_len=16"):
        PackedBatches(_stream(700), 6, 8, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="num_tokens=700"):
        PackedBatches(_stream(703), 6, 16, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        PackedBatches(_stream(700), 6, 16, seed=1).load_state_dict({**state, "position": 43})


def test_packed_batches_small_stream_and_validation():
    batches = PackedBatches(_stream(20), batch_size=4, seq_len=8, seed=0)  # 2 windows, 4 rows per batch
    assert next(batches).shape == (4, 8)
    with pytest.raises(ValueError, match=r"7 tokens.*seq_len=8"):
        PackedBatches(_stream(7), 2, 8, seed=0)
    with pytest.raises(ValueError, match="seq_len=0"):
        PackedBatches(_stream(100), 2, 0, seed=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        PackedBatches(_stream(100), 0, 8, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        PackedBatches(_stream(100).view(10, 10), 2, 8, seed=0)


def test_heldout_batches_fixed_in_order():
    stream = _stream(1000)
    batches = heldout_batches(stream, 4, 16)
    assert [tuple(b.shape) for b in batches] == [(4, 16)] * 15 + [(2, 16)]  # 62 windows, the last batch short
    assert torch.equal(torch.cat(batches).reshape(-1), stream[: 62 * 16])
    assert all(torch.equal(a, b) for a, b in zip(batches, heldout_batches(stream, 4, 16), strict=True))
    assert len(heldout_batches(stream, 4, 16, max_batches=3)) == 3
    with pytest.raises(ValueError, match=r"5 tokens.*seq_len=16"):
        heldout_batches(stream[:5], 4, 16)
    with pytest.raises(ValueError, match="max_batches=0"):
        heldout_batches(stream, 4, 16, max_batches=0)


# ---------------------------------------------------------------------------------------------- entropy


def test_unigram_entropy_matches_the_formula():
    tokens = torch.tensor([0, 0, 1, 2, 2, 2, 5, 0])
    counts = Counter(tokens.tolist())
    expected = -sum(c / 8 * math.log(c / 8) for c in counts.values())
    assert unigram_entropy(tokens, 6) == pytest.approx(expected, rel=1e-12)
    assert unigram_entropy(torch.arange(16), 16) == pytest.approx(math.log(16))
    assert unigram_entropy(torch.full((5,), 3), 4) == 0.0
    with pytest.raises(ValueError, match="range"):
        unigram_entropy(tokens, 5)
    with pytest.raises(ValueError, match="non-empty"):
        unigram_entropy(torch.zeros(0, dtype=torch.int64), 5)


def test_no_temp_files_left_in_cache(small_corpus, tmp_path):
    get_tokenizer(small_corpus[:2], 300, tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".")) == []
    assert os.listdir(tmp_path) == ["tokenizers"]
