"""Robustness: fuzzed configs (hypothesis), hostile token ids and text inputs.

Every input either works or is refused with one `ValueError` that names what is wrong; anything else
(a TypeError, a crash deep in torch, a hang) is a defect. Each input is recorded in the ledger.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepmoe import DeepSeekConfig, DeepSeekForCausalLM, MoE, MoEConfig
from deepmoe.data import prepare_corpus, read_text_path
from deepmoe.model.generate import generate, generate_speculative

# cpu_only: CLI and files attacked with bad configs and inputs
pytestmark = pytest.mark.cpu_only

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# values of any type for any field: wrong types, negatives, zero, non-finite, huge-but-bounded
JUNK = st.one_of(
    st.integers(-3, 12),
    st.sampled_from([0, 1, 2, 3, 4, 8, 16, 10**6, 2**40]),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.5, 1.0, 2.0, -1.0, float("nan"), float("inf")]),
    st.none(),
    st.booleans(),
    st.sampled_from(["", "x", "8", "softmax", "sigmoid", "greedy", "noaux_tc", "mla", "mha", "yarn", "expert"]),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["type", "factor"]), st.sampled_from(["yarn", "x", 2.0, -1, None]), max_size=2),
)

MOE_BASE = dict(
    hidden_size=8,
    moe_intermediate_size=4,
    n_routed_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    scoring_func="softmax",
    topk_method="greedy",
    n_group=1,
    topk_group=1,
)
MOE_FIELDS = sorted(MoEConfig.__dataclass_fields__)
MODEL_BASE = dict(
    vocab_size=32,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    kv_lora_rank=4,
    qk_nope_head_dim=4,
    qk_rope_head_dim=2,
    v_head_dim=4,
    max_position_embeddings=16,
)
MODEL_FIELDS = sorted(f for f in DeepSeekConfig.__dataclass_fields__ if f != "moe")


def small_enough(values: dict) -> bool:
    """Build a model only when every size is small (huge-but-valid configs are checked, not built)."""
    return all(not isinstance(v, int) or isinstance(v, bool) or v <= 64 for v in values.values())


def expect_clear_error(error: ValueError, cls: str, fields: list[str]) -> bool:
    text = str(error)
    return text.count("\n") == 0 and any(f"{cls}.{field}=" in text for field in fields)


def try_config(ledger, cls, fields: dict, mutated: list[str], base_names: list[str]):
    """Build the config; a ValueError must name a field. Returns the config or None."""
    try:
        return cls(**fields)
    except ValueError as error:
        ok = expect_clear_error(error, cls.__name__, base_names)
        ledger.record("configs", "clear_error" if ok else "crash", f"{cls.__name__}({mutated}): {error}")
        assert ok, f"{error!r} names no field of {cls.__name__}"
        return None
    except Exception as error:  # noqa: BLE001 - every other exception is the defect being hunted
        ledger.record("configs", "crash", f"{cls.__name__}({mutated}): {error!r}")
        raise AssertionError(f"{cls.__name__}(**{fields!r}) raised {error!r}, not a ValueError") from error


@st.composite
def mutations(draw, names: list[str]) -> dict:
    chosen = draw(st.lists(st.sampled_from(names), min_size=0, max_size=3, unique=True))
    return {name: draw(JUNK) for name in chosen}


@FUZZ
@given(mutations(MOE_FIELDS))
def test_fuzzed_moe_config_builds_and_runs_or_names_a_field(ledger, changes):
    fields = {**MOE_BASE, **changes}
    config = try_config(ledger, MoEConfig, fields, sorted(changes), MOE_FIELDS)
    if config is None:
        return
    if not small_enough(fields):
        ledger.record("configs", "ok", f"MoEConfig({sorted(changes)}) valid, too big to build")
        return
    try:
        layer = MoE(config)
        out = layer(torch.randn(2, 3, config.hidden_size))
        assert out.hidden_states.shape == (2, 3, config.hidden_size) if hasattr(out, "hidden_states") else True
    except Exception as error:  # noqa: BLE001
        ledger.record("configs", "crash", f"MoE({fields}): {error!r}")
        raise
    ledger.record("configs", "ok", f"MoEConfig({sorted(changes)})")


@FUZZ
@given(mutations(MODEL_FIELDS), st.booleans())
def test_fuzzed_model_config_builds_and_runs_or_names_a_field(ledger, changes, with_moe):
    fields = {**MODEL_BASE, **changes}
    if with_moe:
        hidden = fields["hidden_size"]
        moe_hidden = hidden if isinstance(hidden, int) and not isinstance(hidden, bool) and hidden >= 1 else 8
        fields["moe"] = MoEConfig(**{**MOE_BASE, "hidden_size": min(moe_hidden, 64)})
    names = [*MODEL_FIELDS, "moe"]
    config = try_config(ledger, DeepSeekConfig, fields, sorted(changes), names)
    if config is None:
        return
    if not small_enough(changes):
        ledger.record("configs", "ok", f"DeepSeekConfig({sorted(changes)}) valid, too big to build")
        return
    try:
        model = DeepSeekForCausalLM(config).eval()
        seq = min(4, config.max_position_embeddings)
        ids = torch.randint(0, config.vocab_size, (1, seq))
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, seq, config.vocab_size)
    except Exception as error:  # noqa: BLE001
        ledger.record("configs", "crash", f"DeepSeekForCausalLM({changes}): {error!r}")
        raise
    ledger.record("configs", "ok", f"DeepSeekConfig({sorted(changes)})")


def test_from_dict_with_a_bad_nested_moe_names_the_field(ledger):
    for bad in ({"moe": {"n_routed_experts": "four"}}, {"moe": {"hidden_size": 7}}, {"rope_scaling": "yarn"}):
        with pytest.raises(ValueError, match=r"(MoEConfig|DeepSeekConfig)\.\w+="):
            DeepSeekConfig.from_dict({**MODEL_BASE, **bad})
        ledger.record("configs", "clear_error", f"from_dict({bad})")


# ---- token ids ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> DeepSeekForCausalLM:
    torch.manual_seed(0)
    config = DeepSeekConfig(**MODEL_BASE, moe=MoEConfig(**MOE_BASE), num_nextn_predict_layers=1)
    return DeepSeekForCausalLM(config).eval()


BAD_IDS = {
    "empty [1, 0]": torch.zeros(1, 0, dtype=torch.long),
    "empty [0, 3]": torch.zeros(0, 3, dtype=torch.long),
    "id == vocab": torch.tensor([[1, 32]]),
    "huge id": torch.tensor([[1, 2**40]]),
    "negative id": torch.tensor([[-1, 2]]),
    "float ids": torch.tensor([[1.0, 2.0]]),
    "bool ids": torch.tensor([[True, False]]),
    "1-D ids": torch.tensor([1, 2, 3]),
    "3-D ids": torch.zeros(1, 2, 3, dtype=torch.long),
    "too long (17 > 16)": torch.zeros(1, 17, dtype=torch.long),
    "list, not a tensor": [[1, 2, 3]],
}


@pytest.mark.parametrize("name", list(BAD_IDS))
def test_bad_token_ids_are_refused_clearly(ledger, tiny_model, name):
    ids = BAD_IDS[name]
    for call in ("forward", "generate", "speculative"):
        try:
            with torch.no_grad():
                if call == "forward":
                    tiny_model(ids)
                elif call == "generate":
                    generate(tiny_model, ids, max_new_tokens=2)
                else:
                    generate_speculative(tiny_model, ids, max_new_tokens=2)
        except ValueError as error:
            assert "\n" not in str(error)
            ledger.record("tokens", "clear_error", f"{call}({name}): {error}")
            continue
        except Exception as error:  # noqa: BLE001
            ledger.record("tokens", "crash", f"{call}({name}): {error!r}")
            raise AssertionError(f"{call}({name}) raised {error!r}") from error
        ledger.record("tokens", "crash", f"{call}({name}) was accepted")
        raise AssertionError(f"{call}({name}) was accepted")


@pytest.mark.parametrize(
    ("prompt_len", "max_new", "ok"),
    [(16, 0, True), (15, 1, True), (16, 1, False), (8, 9, False), (1, 15, True), (3, -1, False), (1, 10**9, False)],
)
def test_generation_past_the_context_is_refused(ledger, tiny_model, prompt_len, max_new, ok):
    ids = torch.ones(1, prompt_len, dtype=torch.long)
    for call in (generate, generate_speculative):
        detail = f"{call.__name__}(prompt={prompt_len}, max_new_tokens={max_new})"
        try:
            out = call(tiny_model, ids, max_new_tokens=max_new)
        except ValueError as error:
            ledger.record("tokens", "clear_error" if not ok else "crash", f"{detail}: {error}")
            assert not ok, f"{detail} refused: {error}"
            continue
        except Exception as error:  # noqa: BLE001
            ledger.record("tokens", "crash", f"{detail}: {error!r}")
            raise
        tokens = out[0] if isinstance(out, tuple) else out
        ledger.record("tokens", "ok" if ok else "crash", detail)
        assert ok, f"{detail} was accepted"
        assert prompt_len <= tokens.shape[1] <= prompt_len + max_new


def test_sampling_settings_are_checked(ledger, tiny_model):
    ids = torch.tensor([[1, 2, 3]])
    for kwargs in ({"do_sample": True, "temperature": 0.0}, {"do_sample": True, "temperature": -1.0}):
        with pytest.raises(ValueError):
            generate(tiny_model, ids, max_new_tokens=2, **kwargs)
        ledger.record("tokens", "clear_error", f"generate({kwargs})")
    out = generate(tiny_model, ids, max_new_tokens=2, do_sample=True, temperature=0.7, top_k=1000, top_p=1.0)
    assert out.shape == (1, 5) and int(out.max()) < 32
    ledger.record("tokens", "ok", "top_k larger than the vocabulary")


def test_speculative_needs_an_mtp_model(ledger):
    model = DeepSeekForCausalLM(DeepSeekConfig(**MODEL_BASE)).eval()
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        generate_speculative(model, torch.tensor([[1, 2]]), max_new_tokens=2)
    ledger.record("tokens", "clear_error", "speculative without MTP")


# ---- text and data files --------------------------------------------------------------------------------


def _refused(ledger, detail, call, match):
    try:
        call()
    except ValueError as error:
        ok = match in str(error) and "\n" not in str(error)
        ledger.record("text", "clear_error" if ok else "crash", f"{detail}: {error}")
        assert ok, f"{detail}: {error!r} does not say {match!r}"
        return
    except Exception as error:  # noqa: BLE001
        ledger.record("text", "crash", f"{detail}: {error!r}")
        raise AssertionError(f"{detail} raised {error!r}") from error
    ledger.record("text", "crash", f"{detail} was accepted")
    raise AssertionError(f"{detail} was accepted")


def test_hostile_data_paths(ledger, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("  \n\n")
    (blank / "b.md").write_bytes(b"")
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "ok.txt").write_text("hello world\n" * 20)
    (latin / "bad.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)))
    only_binary = tmp_path / "nontext"
    only_binary.mkdir()
    (only_binary / "x.bin").write_bytes(b"\x00\x01")
    cases = [
        ("missing path", tmp_path / "nope", "does not exist"),
        ("empty folder", empty, "has no text files"),
        ("folder of blank files", blank, "has no text"),
        ("folder with a latin-1 file", latin, "is not UTF-8"),
        ("binary file", binary, "is not UTF-8"),
        ("folder without text extensions", only_binary, "has no text files"),
    ]
    for detail, path, match in cases:
        _refused(ledger, f"read_text_path({detail})", lambda p=path: read_text_path(p), match)
    cache = tmp_path / "cache"
    for detail, path, match in cases[:3] + cases[4:5]:
        _refused(ledger, f"prepare_corpus({detail})", lambda p=path: prepare_corpus(data=p, cache_dir=cache), match)
    for vocab in (0, 10, "4096", 4096.0):
        _refused(
            ledger,
            f"prepare_corpus(vocab_size={vocab!r})",
            lambda v=vocab: prepare_corpus(data=latin / "ok.txt", vocab_size=v, cache_dir=cache),
            "vocab_size",
        )


def test_odd_but_valid_text_is_read(ledger, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "bom.txt").write_bytes("\ufeffline one\n".encode() * 30)
    (docs / "emoji.md").write_text("🙂 naïve — 漢字\n" * 30, encoding="utf-8")
    (docs / "crlf.txt").write_bytes(b"a\r\nb\r\n" * 30)
    (docs / ".hidden.txt").write_bytes(b"\xff\xfe")  # hidden: skipped, never read
    sources = read_text_path(docs)
    assert sorted(s.name for s in sources) == ["bom.txt", "crlf.txt", "emoji.md"]
    assert not any(s.text.startswith("\ufeff") for s in sources)
    ledger.record("text", "ok", "BOM, emoji, CRLF, hidden non-UTF-8 file skipped")
    corpus = prepare_corpus(data=docs, vocab_size=300, cache_dir=tmp_path / "cache")
    assert corpus.train.numel() > 0 and int(corpus.train.max()) < 300
    assert math.isfinite(float(corpus.train.float().mean()))
    ledger.record("text", "ok", "prepare_corpus on odd but valid text")
