"""`deepmoe.data.prepare.prepare_dataset` (the writing side of the prepared-dataset format, version 1): the
tokens of every input format, shards and their offsets, the held-out rule, token counts, workers, resume,
and bad input named by file and line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from corpora import byte_level_bpe
from deepmoe.data import prepare as prepare_module
from deepmoe.data.prepare import prepare_dataset
from deepmoe.data.tokenizer import _encode_documents

# cpu_only: data preparation: files and numpy
pytestmark = pytest.mark.cpu_only

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly banjo players".split()


def documents(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(rng.integers(1, 4))]
        docs.append(f"doc {i}: " + "\n".join(lines))
    return docs


@pytest.fixture
def tokenizer_path(tmp_path) -> Path:
    tokenizer = byte_level_bpe(" ".join(documents(50)) + " doc 0123456789:", vocab_size=300)
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tokenizer.save(str(path))
    return path


def expected_ids(tokenizer_path: Path, docs: list[str]) -> list[np.ndarray]:
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    return [d.astype(np.int64) for d in _encode_documents(tokenizer, docs, tokenizer.token_to_id("<|endoftext|>"))]


def read_split(out: Path, split: str) -> list[np.ndarray]:
    """The documents of one split, read back through index.json, .bin and .idx."""
    index = json.loads((out / "index.json").read_text())
    dtype = np.dtype("<u2" if index["dtype"] == "uint16" else "<u4")
    docs = []
    for shard in index["splits"][split]["shards"]:
        ids = np.fromfile(out / shard["file"], dtype=dtype).astype(np.int64)
        starts = np.fromfile(out / shard["index"], dtype="<i8")
        assert len(ids) == shard["tokens"] and len(starts) == shard["documents"] and starts[0] == 0
        assert np.all(np.diff(starts) > 0)
        docs += [ids[a:b] for a, b in zip(starts, [*starts[1:], len(ids)], strict=True)]
    return docs


def write_inputs(tmp_path: Path, docs: list[str]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"txt": tmp_path / "in.txt", "jsonl": tmp_path / "in.jsonl", "parquet": tmp_path / "in.parquet"}
    paths["txt"].write_text("\n\n".join(docs) + "\n")
    paths["jsonl"].write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"text": docs}), paths["parquet"], row_group_size=7)
    return paths


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "parquet"])
def test_every_format_gives_the_tokens_of_its_documents(tmp_path, tokenizer_path, fmt):
    docs = documents(40)
    path = write_inputs(tmp_path, docs)[fmt]
    report = prepare_dataset([path], tmp_path / "out", tokenizer=tokenizer_path, heldout_fraction=0)
    got = read_split(tmp_path / "out", "train")
    want = expected_ids(tokenizer_path, docs)
    assert len(got) == len(want) == 40 and all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["format"] == "deepmoe-tokens" and index["version"] == 1 and index["dtype"] == "uint16"
    assert index["chat"] is False and index["splits"]["heldout"] == {"tokens": 0, "documents": 0, "shards": []}
    assert index["tokenizer"]["eot_id"] == 0 and index["tokenizer"]["vocab_size"] == 300
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tokenizer_path.read_bytes()
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    source = {"path": str(path), "format": fmt, "bytes": path.stat().st_size, "sha256": sha256, "documents": 40}
    assert index["sources"] == [{**source, "skipped": 0}]
    assert report.splits["train"]["tokens"] == sum(len(w) for w in want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "in.parquet", "in.txt", "out", "tok"]


def test_a_large_vocabulary_is_written_as_uint32(tmp_path):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {f"filler{i}": i for i in range(70_000)}
    vocab.update({c: 70_000 + k for k, c in enumerate(sorted(alphabet))})
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(tmp_path / "big.json"))
    (tmp_path / "in.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
    prepare_dataset([tmp_path / "in.jsonl"], tmp_path / "out", tokenizer=tmp_path / "big.json", heldout_fraction=0)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["dtype"] == "uint32"
    got = read_split(tmp_path / "out", "train")
    assert [list(d) for d in got] == [list(d) for d in expected_ids(tmp_path / "big.json", ["hello", "world"])]
    assert min(got[0][:-1]) >= 70_000


def test_shards_offsets_heldout_rule_and_token_counts(tmp_path, tokenizer_path):
    docs = documents(120, seed=1)
    path = write_inputs(tmp_path, docs)["jsonl"]
    out = tmp_path / "out"
    prepare_dataset([path], out, tokenizer=tokenizer_path, shard_tokens=300, heldout_fraction=0.1)
    index = json.loads((out / "index.json").read_text())
    want = expected_ids(tokenizer_path, docs)
    held = [i for i in range(120) if i % 10 == 9]
    assert [list(d) for d in read_split(out, "heldout")] == [list(want[i]) for i in held]
    assert [list(d) for d in read_split(out, "train")] == [list(want[i]) for i in range(120) if i not in held]
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 3 and [s["file"] for s in shards] == [f"train-{k:05d}.bin" for k in range(len(shards))]
    train = read_split(out, "train")
    first = 0
    for shard in shards:  # a shard is closed by the document that makes it reach 300 tokens
        sizes = [len(d) for d in train[first : first + shard["documents"]]]
        first += shard["documents"]
        assert sum(sizes[:-1]) < 300 and (sum(sizes) >= 300 or shard is shards[-1])
    assert index["splits"]["train"]["documents"] == 108 and index["splits"]["heldout"]["documents"] == 12
    counts = np.load(out / "token_counts.npy")
    assert counts.dtype == np.int64 and counts.shape == (300,)
    assert np.array_equal(counts, np.bincount(np.concatenate(train), minlength=300))


def test_txt_paragraphs_folders_and_auto_format(tmp_path, tokenizer_path):
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "a.md").write_text("\ufefffirst line\nsecond\n\n\n  \nnext one\r\nwith crlf")
    (folder / "b" / "c.jsonl").write_text('{"body": "from json"}\n\n')
    (folder / ".hidden.txt").write_text("hidden")
    (folder / "skip.bin").write_bytes(b"\x00")
    prepare_dataset([folder], tmp_path / "out", tokenizer=tokenizer_path, heldout_fraction=0, text_field="body")
    want = expected_ids(tokenizer_path, ["first line\nsecond", "next one\nwith crlf", "from json"])
    assert [list(d) for d in read_split(tmp_path / "out", "train")] == [list(d) for d in want]


def test_a_long_txt_document_is_cut(tmp_path, tokenizer_path, monkeypatch):
    monkeypatch.setattr("deepmoe.data.readers.MAX_DOCUMENT_CHARS", 100)
    (tmp_path / "in.txt").write_text("".join(f"line {i} of one long paragraph\n" for i in range(20)))
    report = prepare_dataset([tmp_path / "in.txt"], tmp_path / "out", tokenizer=tokenizer_path, heldout_fraction=0)
    assert report.splits["train"]["documents"] == 5  # 4 lines (120 chars) per piece


def test_one_and_two_workers_write_identical_files(tmp_path, tokenizer_path):
    path = write_inputs(tmp_path, documents(300, seed=2))["jsonl"]
    for workers in (1, 2):
        prepare_dataset([path], tmp_path / f"w{workers}", tokenizer=tokenizer_path, workers=workers,
                        shard_tokens=2000, heldout_fraction=0.05)  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir()) and "train-00002.bin" in names
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_an_interrupted_run_resumes_after_its_complete_shards(tmp_path, tokenizer_path, monkeypatch):
    path = write_inputs(tmp_path, documents(200, seed=3))["jsonl"]
    kwargs = dict(tokenizer=tokenizer_path, shard_tokens=500, heldout_fraction=0.05, workers=2)
    full = prepare_dataset([path], tmp_path / "full", **kwargs)
    record = prepare_module._record
    calls = []

    def fail_on_third(*args):
        calls.append(args)
        if len(calls) == 3:  # the third shard is renamed but not recorded: it does not count
            raise RuntimeError("killed")
        record(*args)

    monkeypatch.setattr(prepare_module, "_record", fail_on_third)
    with pytest.raises(RuntimeError, match="killed"):
        prepare_dataset([path], tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    progress = json.loads((tmp_path / ".out.partial" / "progress.json").read_text())
    done = progress["splits"]["train"]["shards"]
    assert len(done) == 2 and progress["splits"]["heldout"]["shards"] == []
    monkeypatch.setattr(prepare_module, "_record", record)
    resumed = prepare_dataset([path], tmp_path / "out", **kwargs)
    assert resumed.resumed_shards == 2
    assert resumed.tokenized_documents == 200 - sum(s["documents"] for s in done)
    assert full.tokenized_documents == 200
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in names:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
    assert not (tmp_path / ".out.partial").exists()


def test_other_arguments_start_afresh(tmp_path, tokenizer_path, monkeypatch):
    path = write_inputs(tmp_path, documents(100, seed=4))["jsonl"]
    monkeypatch.setattr(prepare_module, "_record", lambda *a: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        prepare_dataset([path], tmp_path / "out", tokenizer=tokenizer_path, shard_tokens=300)
    monkeypatch.undo()
    report = prepare_dataset([path], tmp_path / "out", tokenizer=tokenizer_path, shard_tokens=400)
    assert report.resumed_shards == 0 and report.tokenized_documents == 100


def test_a_trained_tokenizer_and_the_output_directory_claim(tmp_path):
    path = write_inputs(tmp_path, documents(60, seed=5))["jsonl"]
    report = prepare_dataset([path], tmp_path / "out", vocab_size=280)
    splits = report.splits
    assert report.vocab_size == 280 and splits["train"]["documents"] + splits["heldout"]["documents"] == 60
    prepare_dataset([path], tmp_path / "out", vocab_size=280)  # its own earlier output is replaced
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        prepare_dataset([path], tmp_path / "foreign", vocab_size=280)
    with pytest.raises(ValueError, match="either --tokenizer"):
        prepare_dataset([path], tmp_path / "x")
    with pytest.raises(ValueError, match="overlaps"):
        prepare_dataset([tmp_path], tmp_path / "inside", vocab_size=280)


BAD_LINES = {
    "malformed JSON": ('{"text": "ok"', "malformed JSON"),
    "missing field": ('{"body": "x"}', "has no field 'text'"),
    "non-string field": ('{"text": 5}', "field 'text' is a int, not a string"),
    "empty document": ('{"text": "  "}', "empty document"),
    "not an object": ("[1, 2]", "not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_input_names_file_and_line_or_is_skipped_and_counted(tmp_path, tokenizer_path, case):
    line, message = BAD_LINES[case]
    path = tmp_path / "in.jsonl"
    path.write_text(f'{{"text": "good one"}}\n\n{line}\n{{"text": "good two"}}\n')
    with pytest.raises(ValueError, match=f"^{path}:3: {message}"):
        prepare_dataset([path], tmp_path / "out", tokenizer=tokenizer_path)
    report = prepare_dataset([path], tmp_path / "out", tokenizer=tokenizer_path, on_error="skip", heldout_fraction=0)
    assert report.skipped == 1 and report.splits["train"]["documents"] == 2
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["sources"][0]["skipped"] == 1 and index["sources"][0]["documents"] == 2


def test_bad_parquet_rows_invalid_utf8_and_empty_input(tmp_path, tokenizer_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["fine", None, ""]}), tmp_path / "in.parquet")
    with pytest.raises(ValueError, match=r"in\.parquet:row 2: has no field 'text'"):
        prepare_dataset([tmp_path / "in.parquet"], tmp_path / "out", tokenizer=tokenizer_path)
    report = prepare_dataset([tmp_path / "in.parquet"], tmp_path / "out", tokenizer=tokenizer_path, on_error="skip")
    assert report.skipped == 2
    (tmp_path / "bad.txt").write_bytes(b"fine\nbroken \xff here\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: not UTF-8"):
        prepare_dataset([tmp_path / "bad.txt"], tmp_path / "out2", tokenizer=tokenizer_path)
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match=r"no documents \(1 skipped"):
        prepare_dataset([tmp_path / "empty.jsonl"], tmp_path / "out3", tokenizer=tokenizer_path, on_error="skip")
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no documents"):
        prepare_dataset([tmp_path / "blank.txt"], tmp_path / "out4", tokenizer=tokenizer_path)
