"""Reading prepared data (`deepmoe.data.prepared`): windows from memory-mapped shards, the same order as the
in-memory `PackedBatches`, mixtures that follow their weights and resume mid-stream, per-rank rows, chat windows
whose labels keep only the masked tokens, and a training run on prepared data (resume, tokens per source, and
the refusal of data made with another tokenizer than the checkpoint's)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from corpora import byte_level_bpe, write_prepared
from deepmoe.data import LabeledBatch, PackedBatches, PreparedCorpus, PreparedDataset

# cpu_only: prepared data read from memory-mapped files
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cpu_only]
TEXT = "".join(f"the router sends token {i % 29} to expert {i % 7}; " for i in range(400))


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_bpe(TEXT, 300)


def documents(seed: int, count: int, vocab: int = 300, low: int = 20, high: int = 90) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [[*g.integers(1, vocab, int(g.integers(low, high))).tolist(), 0] for _ in range(count)]


def test_one_source_reads_what_packed_batches_reads(tmp_path, tokenizer):
    """One prepared shard, one source: the batches (ids and order, over two epochs) are `PackedBatches`'s on
    the same token stream."""
    train = documents(0, 12)
    write_prepared(tmp_path / "d", tokenizer, train, documents(1, 3), shard_documents=len(train))
    corpus = PreparedCorpus([(str(tmp_path / "d"), 1.0)])
    stream = torch.tensor([t for d in train for t in d])
    ours, reference = corpus.batches(4, 16, seed=3), PackedBatches(stream, 4, 16, seed=3)
    windows = stream.numel() // 16
    for _ in range(2 * windows // 4 + 1):
        assert torch.equal(next(ours), next(reference))


def test_windows_never_span_shards_and_sizes_are_checked(tmp_path, tokenizer):
    train = documents(2, 9)
    directory = write_prepared(tmp_path / "d", tokenizer, train, documents(3, 2), shard_documents=2)
    dataset = PreparedDataset(directory)
    windows = dataset.train.windows(16, chat=False, pad_id=0)
    expected = [len(np.concatenate([np.array(d) for d in train[k : k + 2]])) // 16 for k in range(0, 9, 2)]
    assert windows.count == sum(expected)
    first_of_second = windows.read(expected[0])[0]
    assert first_of_second.tolist() == (train[2] + train[3])[:16]
    (directory / "train-00001.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"train-00001\.bin has 10 bytes"):
        PreparedDataset(directory)


def test_mixture_follows_its_weights_and_resumes_mid_stream(tmp_path, tokenizer):
    """Rows per source within 4σ of 0.7/0.3 over 4000 rows; a loader restored from the state after 37 batches
    continues with exactly the batches of the uninterrupted one."""
    a = write_prepared(tmp_path / "a", tokenizer, [[1] * 50 + [0]] * 8, documents(4, 2))
    b = write_prepared(tmp_path / "b", tokenizer, [[2] * 50 + [0]] * 8, documents(5, 2))
    corpus = PreparedCorpus([(str(a), 0.7), (str(b), 0.3)])
    loader = corpus.batches(8, 16, seed=0)
    rows = torch.cat([next(loader) for _ in range(500)])
    from_a = int((rows[:, 0] == 1).sum())
    n = rows.shape[0]
    assert abs(from_a - 0.7 * n) < 4 * math.sqrt(n * 0.7 * 0.3)
    assert loader.tokens_per_source == [from_a * 16, (n - from_a) * 16]
    first = corpus.batches(8, 16, seed=0)
    for _ in range(37):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))
    again = corpus.batches(8, 16, seed=0)
    again.load_state_dict(state)
    for _ in range(20):
        assert torch.equal(next(again), next(first))
    other = corpus.batches(8, 16, seed=1)
    assert not all(torch.equal(next(other), next(first)) for _ in range(5))


def test_each_rank_reads_its_rows(tmp_path, tokenizer):
    directory = write_prepared(tmp_path / "d", tokenizer, documents(6, 10), documents(7, 2))
    corpus = PreparedCorpus([(str(directory), 1.0)])
    whole = corpus.batches(4, 16, seed=0)
    ranks = [corpus.batches(4, 16, seed=0, rows=slice(2 * r, 2 * r + 2)) for r in range(2)]
    for _ in range(6):
        assert torch.equal(next(whole), torch.cat([next(r) for r in ranks]))


def test_chat_windows_keep_one_conversation_and_mask_the_rest(tmp_path, tokenizer):
    """A chat window is one conversation, cut at seq_len or padded; labels are the ids where the mask is 1 and
    -100 elsewhere (prompt and padding), so the loss counts only the assistant's tokens."""
    convs = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
    masks = [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1]]
    split_masks = {"train": masks, "heldout": masks[:1]}
    directory = write_prepared(tmp_path / "c", tokenizer, convs, convs[:1], masks=split_masks, chat=True)
    windows = PreparedDataset(directory).train.windows(8, chat=True, pad_id=0)
    assert windows.count == 2
    batch = windows.batch([0, 1])
    assert isinstance(batch, LabeledBatch)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 0, 0], [11, 12, 13, 14, 15, 16, 17, 18]]
    assert batch.labels.tolist() == [
        [-100, -100, -100, 8, 9, 10, -100, -100],
        [-100, -100, 13, 14, -100, -100, -100, 18],
    ]


def test_training_on_prepared_data_resumes_and_reports_its_sources(tmp_path, tokenizer):
    from deepmoe.train.trainer import TrainConfig, resume, train

    a = write_prepared(tmp_path / "a", tokenizer, documents(8, 30), documents(9, 6))
    b = write_prepared(tmp_path / "b", tokenizer, documents(10, 30), documents(11, 6))
    options = dict(preset="tiny-v3", layers=2, hidden_size=32, seq_len=16, batch_size=4, steps=3, warmup_steps=1,
                   eval_every=0, save_every=2, final_eval_batches=2, progress=False, out=str(tmp_path / "run"),
                   data=[f"{a}:3", f"{b}:1"])  # fmt: skip
    result = train(TrainConfig(**options))
    assert result.step == 3
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    seen = report["tokens_per_source"]
    assert sorted(seen) == sorted([str(a), str(b)]) and sum(seen.values()) == 3 * 4 * 16
    assert math.isfinite(report["unigram_entropy"]) and report["heldout_tokens"] > 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    (tmp_path / "run" / "last").write_text("step-2\n")
    resume(tmp_path / "run")
    again = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert again[2]["loss"] == log[2]["loss"]  # the same batch after resuming mid-mixture

    other = write_prepared(tmp_path / "other", byte_level_bpe(TEXT[::-1], 300), documents(12, 30), documents(13, 6))
    with pytest.raises(ValueError, match=r"prepared with another tokenizer \(\w+\) than .*run.*'s \(\w+\)"):
        train(TrainConfig(**{**options, "data": str(other), "out": str(tmp_path / "ft"), "preset": None,
                             "layers": None, "hidden_size": None, "vocab_size": None,
                             "init_from": str(tmp_path / "run")}))  # fmt: skip


def test_mixture_flags_on_the_command_line(tmp_path, tokenizer, capsys):
    """`deepmoe train --data A:3 --data B:1`: the repeated flag is the mixture; a text path in it is refused."""
    from deepmoe.cli import main

    a = write_prepared(tmp_path / "a", tokenizer, documents(14, 20), documents(15, 4))
    b = write_prepared(tmp_path / "b", tokenizer, documents(16, 20), documents(17, 4))
    common = ["train", "--preset", "tiny-v3", "--layers", "1", "--hidden", "32", "--seq-len", "16", "--batch-size",
              "2", "--steps", "1", "--warmup-steps", "1", "--final-eval-batches", "1", "--no-progress"]  # fmt: skip
    assert main([*common, "--data", f"{a}:3", "--data", f"{b}:1", "--out", str(tmp_path / "run")]) == 0
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["data"] == [f"{a}:3", f"{b}:1"]
    (tmp_path / "notes.txt").write_text("plain text " * 50)
    assert (
        main([*common, "--data", f"{a}:1", "--data", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "r2")]) == 1
    )
    assert "is not prepared data" in capsys.readouterr().err
    assert main([*common, "--data", f"{a}:1", "--data", f"{tmp_path / 'nope'}:1", "--out", str(tmp_path / "r3")]) == 1
    assert "nope' does not exist" in capsys.readouterr().err
