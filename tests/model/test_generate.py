"""Generation: incremental detokenisation, sampling arguments, padded batches and EOS handling."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from configs import tiny_preset
from corpora import byte_level_bpe
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.generate import IncrementalDecoder, TextStreamer, generate, generate_speculative, left_padded

MULTIBYTE = "東京 こんにちは, café — “quoted” naïve 日本語のテキスト ok"


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE like the bundled one, trained here: its merges split multi-byte characters."""
    text = "the quick brown fox jumps over the lazy dog. 東京の天気はこんにちは、café au lait — “yes” " * 50
    tokenizer = byte_level_bpe(text)
    return tokenizer


# ---- finding 5: streaming text that splits characters across tokens ---------------------------------


def test_single_token_decoding_garbles_the_text(byte_bpe):
    """The test text does split characters across tokens (what the old per-token CLI decoding broke on)."""
    ids = byte_bpe.encode(MULTIBYTE).ids
    assert byte_bpe.decode(ids) == MULTIBYTE
    assert "\ufffd" in "".join(byte_bpe.decode([i]) for i in ids)


@pytest.mark.parametrize("text", [MULTIBYTE, "東京", "é", "—", "“quotes”", "a—b", "x"])
def test_incremental_decoder_streams_complete_characters(byte_bpe, text):
    ids = byte_bpe.encode(text).ids
    decoder = IncrementalDecoder(byte_bpe)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == byte_bpe.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def _byte_symbol(byte: int) -> str:
    """The character ByteLevel's vocabulary writes for one byte (GPT-2's bytes_to_unicode)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def test_incremental_decoder_in_chunks_and_with_invalid_bytes(byte_bpe):
    """Any chunking gives the text of one decode, invalid byte sequences (U+FFFD) and special tokens included."""
    vocab = byte_bpe.get_vocab()
    invalid = [vocab[_byte_symbol(b)] for b in (0x80, 0xE6, 0xC3)]  # a lone continuation byte, two lone leads
    eot = byte_bpe.token_to_id("<|endoftext|>")
    ids = byte_bpe.encode(MULTIBYTE).ids
    rng = random.Random(0)
    for trial in range(20):
        stream = list(ids)
        for _ in range(3):
            stream.insert(rng.randrange(len(stream) + 1), rng.choice([eot, *invalid]))
        if trial == 0:
            stream.append(invalid[1])  # ends on a lead byte, inside a character: the flush writes it
        want = byte_bpe.decode(stream)
        decoder, pieces, i = IncrementalDecoder(byte_bpe), [], 0
        while i < len(stream):
            n = rng.randint(1, 4)
            pieces.append(decoder.push(stream[i : i + n]))
            i += n
        pieces.append(decoder.flush())
        assert "".join(pieces) == want


def test_text_streamer_is_a_generate_streamer(byte_bpe):
    ids = byte_bpe.encode(MULTIBYTE).ids
    out: list[str] = []
    streamer = TextStreamer(byte_bpe, out.append)
    for i in ids:
        streamer(torch.tensor([i]))
    streamer.end()
    assert "".join(out) == MULTIBYTE and all(out)


@pytest.mark.cpu_only  # the CLI on a checkpoint on disk
def test_cli_prints_multibyte_text_whole(tmp_path, capsys, byte_bpe, monkeypatch):
    """`deepmoe generate --prompt` prints the decoded text of the generated ids, not U+FFFD per byte."""
    import importlib

    from deepmoe.cli import main

    config = tiny_preset(num_hidden_layers=2, vocab_size=byte_bpe.get_vocab_size())
    torch.manual_seed(0)
    DeepSeekForCausalLM(config).save_pretrained(tmp_path)
    byte_bpe.save(str(tmp_path / "tokenizer.json"))
    target = byte_bpe.encode(MULTIBYTE).ids

    def scripted(model, input_ids, max_new_tokens, streamer=None, **kwargs):  # the model "says" MULTIBYTE
        assert input_ids.tolist() == [byte_bpe.encode("東京 こんにちは").ids]
        for t in target[:max_new_tokens]:
            streamer(torch.tensor([t]))
        return torch.cat([input_ids, torch.tensor([target[:max_new_tokens]])], dim=1)

    monkeypatch.setattr(importlib.import_module("deepmoe.cli.generate"), "generate", scripted)
    argv = ["generate", str(tmp_path), "--prompt", "東京 こんにちは", "--max-new-tokens", str(len(target))]
    assert main(argv) == 0
    assert capsys.readouterr().out == MULTIBYTE + "\n"
    monkeypatch.undo()

    # a real run: what is printed is the decode of the generated ids (random ids: often invalid UTF-8)
    model = DeepSeekForCausalLM.from_pretrained(tmp_path).eval()
    prompt = byte_bpe.encode("東京 こんにちは").ids
    want = model.generate(torch.tensor([prompt]), max_new_tokens=12)[0, len(prompt) :].tolist()
    assert main(["generate", str(tmp_path), "--prompt", "東京 こんにちは", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == byte_bpe.decode(want) + "\n"


# ---- finding 6: sampling arguments are applied or refused --------------------------------------------


def _tiny(name="tiny-v3", std=0.2, **overrides) -> DeepSeekForCausalLM:
    """A random 2-layer float32 model; a larger init spreads the logits so greedy has no near-ties."""
    torch.manual_seed(0)
    fields = {"num_hidden_layers": 2, "vocab_size": 97, "initializer_range": std, "max_position_embeddings": 64}
    config = tiny_preset(name, **{**fields, **overrides})
    return DeepSeekForCausalLM(config).eval()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"do_sample": True, "temperature": -1.0}, "temperature"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"do_sample": True, "temperature": float("nan")}, "temperature"),
        ({"do_sample": False, "temperature": -1.0}, "temperature"),
        ({"do_sample": False, "temperature": 0.7}, "temperature=0.7.*do_sample"),
        ({"do_sample": True, "top_p": 1.7}, "top_p"),
        ({"do_sample": True, "top_p": -1.0}, "top_p"),
        ({"do_sample": True, "top_p": 0.0}, "top_p"),
        ({"do_sample": True, "top_k": 0}, "top_k"),
        ({"do_sample": True, "top_k": -3}, "top_k"),
        ({"do_sample": True, "top_k": 2.5}, "top_k"),
        ({"top_k": 50, "top_p": 0.5}, "top_k.*do_sample"),
        ({"top_p": 0.5}, "top_p.*do_sample"),
        ({"do_sample": "yes"}, "do_sample"),
    ],
)
def test_library_refuses_sampling_settings_it_would_ignore(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(_tiny(), torch.tensor([[1, 2, 3]]), max_new_tokens=2, **kwargs)


def test_library_applies_sampling_settings():
    model = _tiny()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    greedy = generate(model, ids, max_new_tokens=6)
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    assert torch.equal(generate(model, ids, 6, do_sample=True, top_k=1, generator=g), greedy)
    assert torch.equal(generate(model, ids, 6, do_sample=True, top_p=1e-6, generator=g), greedy)
    assert torch.equal(generate(model, ids, 6, do_sample=True, temperature=1e-4, generator=g), greedy)
    hot = [generate(model, ids, 6, do_sample=True, temperature=50.0, generator=g) for _ in range(3)]
    assert any(not torch.equal(h, greedy) for h in hot)
    assert torch.equal(generate(model, ids, 6, temperature=0.0), greedy)  # temperature 0 = greedy


def _write_checkpoint(path) -> DeepSeekForCausalLM:
    model = _tiny()
    model.save_pretrained(path)
    return DeepSeekForCausalLM.from_pretrained(path).eval()


@pytest.mark.cpu_only  # the CLI on a checkpoint on disk
def test_cli_applies_temperature_top_k_and_top_p(tmp_path, capsys):
    from deepmoe.cli import main

    model = _write_checkpoint(tmp_path)
    prompt = torch.tensor([[5, 17, 42]])
    base = ["generate", str(tmp_path), "--ids", "5", "17", "42", "--max-new-tokens", "8"]

    def run(*flags: str) -> list[int]:
        assert main([*base, *flags]) == 0
        return [int(t) for t in capsys.readouterr().out.split()]

    greedy = generate(model, prompt, 8)[0, 3:].tolist()
    sampled = generate(
        model, prompt, 8, do_sample=True, temperature=3.0, top_p=0.9, generator=torch.Generator().manual_seed(4)
    )[0, 3:].tolist()
    assert sampled != greedy  # the reference draw does differ from greedy
    assert run("--temperature", "3", "--top-p", "0.9", "--seed", "4") == sampled
    assert run("--temperature", "0.8", "--top-k", "1") == greedy
    assert run() == greedy


@pytest.mark.cpu_only  # the CLI
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--top-k", "50", "--top-p", "0.5"], "set --temperature"),
        (["--top-k", "5", "--temperature", "0"], "set --temperature"),
        (["--top-p", "0.5"], "set --temperature"),
        (["--speculative", "--temperature", "0.8"], "--speculative"),
        (["--speculative", "--top-k", "4"], "--speculative"),
    ],
)
def test_cli_refuses_sampling_flags_it_would_ignore(capsys, tmp_path, flags, message):
    from deepmoe.cli import main

    assert main(["generate", str(tmp_path / "ckpt"), "--ids", "1", *flags]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepmoe generate: error: ") and message in err[0]


@pytest.mark.cpu_only  # the CLI
@pytest.mark.parametrize(
    "flags",
    [["--temperature", "-1"], ["--temperature", "nan"], ["--top-p", "1.7"], ["--top-p", "-1", "--temperature", "1"],
     ["--top-p", "0", "--temperature", "1"]],
)  # fmt: skip
def test_cli_refuses_out_of_range_sampling_values(capsys, flags):
    from deepmoe.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["generate", "ckpt", "--ids", "1", *flags])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("deepmoe generate: error: argument --") and "Traceback" not in last


# ---- finding 13: padded batches, EOS and pad ----------------------------------------------------------


def _left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_left_padded_is_the_layout_generate_takes():
    ids, mask = left_padded([[5, 17, 42], [61], [9, 33]], pad_id=3)
    assert ids.tolist() == [[5, 17, 42], [3, 3, 61], [3, 9, 33]] and mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    want = _left_pad([[5, 17, 42], [61], [9, 33]], pad=3)
    assert torch.equal(ids, want[0]) and torch.equal(mask, want[1])


PROMPTS = [[5, 17, 42, 8, 3], [61, 2], [9, 33, 70, 12, 44, 1, 90], [7]]
ATTENTION_FORMS = [
    ("tiny-v2", {}, False),
    ("tiny-v2", {}, True),
    ("tiny-v3", {}, False),
    ("tiny-v3", {}, True),
    ("tiny-deepseek-moe", {}, False),  # MHA
    ("tiny-deepseek-moe", {"num_key_value_heads": 2}, False),  # GQA: grouped query rows
]


@pytest.mark.parametrize(
    ("name", "overrides", "absorb", "use_cache"),
    [(*form, True) for form in ATTENTION_FORMS] + [(*ATTENTION_FORMS[3], False), (*ATTENTION_FORMS[5], False)],
)
def test_left_padded_batch_generates_what_each_prompt_does_alone(name, overrides, absorb, use_cache):
    model = _tiny(name, **overrides)
    model.set_absorbed_attention(absorb)
    ids, mask = _left_pad(PROMPTS)
    batched = generate(model, ids, max_new_tokens=6, attention_mask=mask, use_cache=use_cache)
    assert batched.shape == (len(PROMPTS), ids.shape[1] + 6)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=6, use_cache=use_cache)
        assert batched[row, ids.shape[1] :].tolist() == alone[0, len(prompt) :].tolist(), f"row {row}"
    assert torch.equal(batched[:, : ids.shape[1]], ids)


@pytest.mark.parametrize(("name", "overrides", "absorb"), ATTENTION_FORMS[1::2] + ATTENTION_FORMS[2:3])
def test_padded_forward_matches_unpadded_logits(name, overrides, absorb):
    """The model's forward with attention_mask: the real positions' logits are those of the prompt alone."""
    model = _tiny(name, **overrides)
    model.set_absorbed_attention(absorb)
    ids, mask = _left_pad(PROMPTS, pad=13)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(logits[row, -len(prompt) :], alone, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(logits).all()  # padding rows attend to themselves: no NaN


def test_padding_does_not_change_outputs_of_a_training_mode_model_with_capacity():
    """Generation runs the router as at inference: capacity dropping (train mode) would let the
    padding push real tokens out of their experts."""
    model = _tiny("tiny-v3", moe={"capacity_factor": 0.5}).train()
    ids, mask = _left_pad(PROMPTS)
    batched = generate(model, ids, max_new_tokens=4, attention_mask=mask)
    assert model.training  # the mode is restored
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=4)
        assert batched[row, ids.shape[1] :].tolist() == alone[0, len(prompt) :].tolist()


def test_model_generate_takes_the_attention_mask():
    model = _tiny("tiny-v2")
    ids, mask = _left_pad(PROMPTS[:2])
    assert torch.equal(
        model.generate(ids, max_new_tokens=3, attention_mask=mask), generate(model, ids, 3, attention_mask=mask)
    )


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.tensor([[1, 1, 0]]), "left padding"),
        (torch.tensor([[0, 0, 0]]), "left padding|no token"),
        (torch.tensor([[1, 2, 1]]), "only 0 .padding. and 1"),
        (torch.tensor([[1, 1]]), "shape"),
        ([[1, 1, 1]], "tensor"),
    ],
)
def test_bad_attention_masks_are_refused(mask, message):
    with pytest.raises(ValueError, match=message):
        if isinstance(mask, torch.Tensor):
            mask = mask.to(torch.get_default_device())
        generate(_tiny(), torch.tensor([[1, 2, 3]]), max_new_tokens=2, attention_mask=mask)


def test_batched_speculative_decoding_equals_greedy_row_by_row():
    """Left-padded rows of different lengths, where row 0's drafts are always right (its logits say 7) and the
    others' mostly wrong: rows accept and reject independently in the same steps, and every row's tokens are
    greedy decoding's, in the batch and alone."""
    model = _tiny("tiny-v3", num_nextn_predict_layers=1)
    head = model.head
    model.head = lambda x: torch.cat([F.one_hot(torch.full_like(x[:1, ..., 0], 7, dtype=torch.long), 97).float(),
                                      head(x[1:])])  # fmt: skip
    ids = torch.randint(0, 97, (3, 7), generator=torch.Generator(torch.get_default_device()).manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :1] = 0
    greedy = generate(model, ids, 12, attention_mask=mask, eos_token_id=[])
    speculative, stats = generate_speculative(model, ids, 12, attention_mask=mask, eos_token_id=[])
    assert torch.equal(speculative, greedy)
    assert 0 < stats.accepted < stats.drafted  # both kinds of row in the same steps
    assert (speculative[0, 7:] == 7).all()
    model.head = head  # what rows 1 and 2 saw
    for row in (1, 2):
        prompt = ids[row : row + 1, int((mask[row] == 0).sum()) :]
        alone, _ = generate_speculative(model, prompt, 12, eos_token_id=[])
        assert torch.equal(alone[0, -12:], greedy[row, -12:])
    with pytest.raises(ValueError, match="one sequence"):
        generate_speculative(model, ids, 2, streamer=print)


def _free_run(model, ids, n=8):
    return generate(model, ids, max_new_tokens=n, eos_token_id=[])  # [] turns EOS off


def test_config_eos_is_the_default_and_finished_rows_are_padded():
    model = _tiny("tiny-v3")
    ids = torch.tensor([[5, 17, 42], [9, 33, 70]])
    free = _free_run(model, ids)
    new = free[:, 3:]
    eos = int(new[0, 2])
    assert eos not in new[1].tolist() and eos not in new[0, :2].tolist()  # row 1 never says it
    model.config.eos_token_id = eos
    model.config.pad_token_id = 0
    out = generate(model, ids, max_new_tokens=8)  # no eos_token_id argument: the config's
    assert out[0, 3:].tolist() == [*new[0, :3].tolist(), 0, 0, 0, 0, 0]
    assert torch.equal(out[1], free[1])
    model.config.pad_token_id = None  # pad falls back to the EOS id
    out = generate(model, ids, max_new_tokens=8)
    assert out[0, 3:].tolist() == [*new[0, :3].tolist(), eos, eos, eos, eos, eos]
    assert torch.equal(_free_run(model, ids), free)  # EOS off


def test_a_list_of_eos_ids_stops_at_any_of_them():
    model = _tiny("tiny-v3")
    ids = torch.tensor([[5, 17, 42], [9, 33, 70]])
    free = _free_run(model, ids)
    a, b = int(free[0, 3 + 1]), int(free[1, 3 + 3])
    assume = a not in free[0, 3:4].tolist() + free[1, 3:6].tolist() and b not in free[0, 3:5].tolist()
    assert assume and b not in free[1, 3:6].tolist()
    out = generate(model, ids, max_new_tokens=8, eos_token_id=[a, b], pad_token_id=1)
    assert out.shape == (2, 3 + 4)  # every row done after 4 steps
    assert out[0, 3:].tolist() == [*free[0, 3:5].tolist(), 1, 1]
    assert out[1, 3:].tolist() == free[1, 3:7].tolist()
    model.config.eos_token_id = [b, a]
    assert torch.equal(generate(model, ids, max_new_tokens=8, pad_token_id=1), out)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, ids, max_new_tokens=2, eos_token_id=[a, -1])


def test_speculative_uses_the_config_eos_and_eos_lists():
    model = _tiny("tiny-v3", num_nextn_predict_layers=1)
    ids = torch.tensor([[5, 17, 42]])
    free = _free_run(model, ids)
    eos = int(free[0, 3 + 2])
    assert eos not in free[0, 3:5].tolist()
    model.config.eos_token_id = eos
    out, _ = generate_speculative(model, ids, max_new_tokens=8)
    assert torch.equal(out, free[:, : 3 + 3])
    out, _ = generate_speculative(model, ids, max_new_tokens=8, eos_token_id=[99, eos])
    assert torch.equal(out, free[:, : 3 + 3])


def test_streamer_sees_the_padding_after_eos():
    model = _tiny("tiny-v3")
    ids = torch.tensor([[5, 17, 42], [9, 33, 70]])
    free = _free_run(model, ids, 6)
    columns: list[list[int]] = []
    out = generate(
        model, ids, 6, eos_token_id=int(free[0, 3]), pad_token_id=2, streamer=lambda t: columns.append(t.tolist())
    )
    assert torch.equal(torch.tensor(columns).T, out[:, 3:])
