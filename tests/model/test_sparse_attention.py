"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2): the lightning indexer against its formula written out token by
token, the half-split (non-interleaved) RoPE of its queries and keys, logits and greedy tokens equal to
transformers' DeepseekV32ForCausalLM in both directions (prompts longer than index_topk, so the selection
changes the result), and the cached, absorbed and left-padded forms against the uncached naive forward."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

from configs import v32_config
from deepmoe.config import DeepSeekConfig
from deepmoe.io import config_from_hf, config_to_hf
from deepmoe.io.hf import expected_shapes
from deepmoe.model import from_pretrained, save_pretrained
from deepmoe.model.attention import KVCache
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.generate import generate
from deepmoe.model.rope import RotaryEmbedding
from deepmoe.model.sparse_attention import LightningIndexer, allowed_keys
from reference import randomise_parameters, transformers_model

pytestmark = [pytest.mark.cpu_only, pytest.mark.usefixtures("one_thread")]
transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.707}  # fmt: skip


CASES = {
    "yarn": v32_config(rope_scaling=YARN),
    "indexer-all-rope-3-layers": v32_config(index_head_dim=8, index_n_heads=16, index_topk=6, num_hidden_layers=3),
    "top-1": v32_config(index_topk=1, index_n_heads=4),
}


def _hf_model(config: DeepSeekConfig, seed: int = 0):
    written = config_to_hf(config)
    written.pop("architectures")
    hf_config = transformers.AutoConfig.for_model(**written)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    assert type(model).__name__ == "DeepseekV32ForCausalLM"
    randomise_parameters(model, seed)
    return model


def _model(config: DeepSeekConfig, seed: int = 0) -> DeepSeekForCausalLM:
    model = DeepSeekForCausalLM(config).eval()
    randomise_parameters(model, seed)
    return model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _errors(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(max |a − b|, max |a − b| / max |b|)."""
    diff = (ours - theirs).abs().max().item()
    return diff, diff / theirs.abs().max().item()


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the indexer, against its formula ----------------------------------------------------------


def _reference_scores(indexer: LightningIndexer, x, q_compressed, positions, rope_dim: int, base: float):
    """I[t][s] = Σ_j w_tj · H^-½ · ReLU(q_tj · k_s · D^-½), one token, head and dimension at a time, in float64;
    RoPE on the first rope_dim dims, pairing dim i with dim i + rope_dim/2."""
    n_heads, dim = indexer.n_heads, indexer.head_dim
    wq, wk = indexer.wq_b.weight.detach().double(), indexer.wk.weight.detach().double()
    wn, bn = indexer.k_norm.weight.detach().double(), indexer.k_norm.bias.detach().double()
    ww = indexer.weights_proj.weight.detach().double()
    half = rope_dim // 2

    def rope(v: list[float], pos: int) -> list[float]:
        out = list(v)
        for i in range(half):
            angle = pos * base ** (-2 * i / rope_dim)
            a, b = v[i], v[i + half]
            out[i] = a * math.cos(angle) - b * math.sin(angle)
            out[i + half] = b * math.cos(angle) + a * math.sin(angle)
        return out

    def layer_norm(v: list[float]) -> list[float]:
        mean = sum(v) / len(v)
        var = sum((e - mean) ** 2 for e in v) / len(v)
        return [(e - mean) / math.sqrt(var + 1e-6) * float(wn[i]) + float(bn[i]) for i, e in enumerate(v)]

    seq = x.shape[0]
    keys = [rope(layer_norm((wk @ x[s].double()).tolist()), int(positions[s])) for s in range(seq)]
    scores = []
    for t in range(seq):
        q_all = (wq @ q_compressed[t].double()).tolist()
        w = (ww @ x[t].double()).tolist()
        row = []
        for s in range(seq):
            total = 0.0
            for j in range(n_heads):
                q = rope(q_all[j * dim : (j + 1) * dim], int(positions[t]))
                dot = sum(a * b for a, b in zip(q, keys[s], strict=True))
                total += w[j] * n_heads**-0.5 * max(0.0, dot * dim**-0.5)
            row.append(total)
        scores.append(row)
    return scores


def test_indexer_scores_and_selection_equal_the_formula():
    config = v32_config(index_topk=3)
    indexer = LightningIndexer(config)
    randomise_parameters(indexer, seed=0)
    seq = 7
    x, q_compressed = torch.randn(1, seq, 64), torch.randn(1, seq, 24)
    positions = torch.arange(5, 5 + seq)  # RoPE matters: no token at position 0 only
    cos, sin = RotaryEmbedding(config)(positions)
    with torch.no_grad():
        keys = indexer.keys(x, cos, sin)
        scores = indexer.scores(x, q_compressed, keys, cos, sin)[0]
    want = _reference_scores(indexer, x[0], q_compressed[0], positions, 8, config.rope_theta)
    want = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(scores.double(), want, rtol=1e-5, atol=1e-5)

    indexer.max_logits = 8 * seq  # one query token per chunk, as a long prompt is scored
    with torch.no_grad():
        torch.testing.assert_close(indexer.scores(x, q_compressed, keys, cos, sin)[0], scores, rtol=1e-6, atol=1e-6)
    indices, valid = indexer(x, q_compressed, keys, cos, sin, allowed_keys(1, seq, seq, 0, None, x.device))
    assert indices.shape == (1, seq, 3)
    for t in range(seq):
        chosen = {int(s) for s, ok in zip(indices[0, t], valid[0, t], strict=True) if ok}
        assert chosen == set(sorted(range(t + 1), key=lambda s: -want[t, s])[:3])  # causal top-k, all when t < k


def test_indexer_rope_pairs_dim_i_with_dim_i_plus_half():
    """Half-split RoPE (rotate_half), not MLA's interleaved pairs: a key e_0 at position 1 rotates into dim d/2
    (interleaved would put it in dim 1), and a query e_0 at position 1 meets a key e_{d/2} at position 0 with
    q·k = sin(1) (interleaved: 0). Position 1 and θ_0 = 1 make the angle 1 radian."""
    config = v32_config()
    d, half, n_heads, dim = 8, 4, 8, 16
    indexer = LightningIndexer(config)
    with torch.no_grad():
        indexer.k_norm.weight.zero_()
        indexer.k_norm.bias.copy_(torch.eye(dim)[0])  # k_norm(anything) = e_0
        indexer.wq_b.weight.zero_()
        indexer.wq_b.weight[0, 0] = 1.0  # head 0's query = c^Q_0 · e_0
        indexer.weights_proj.weight.zero_()
        indexer.weights_proj.weight[0, 0] = 1.0  # w_t0 = x_0, the other heads weigh 0
    cos, sin = RotaryEmbedding(config)(torch.tensor([1]))
    key = indexer.keys(torch.randn(1, 1, 64), cos, sin)[0, 0]
    torch.testing.assert_close(key[[0, half, 1]], torch.tensor([math.cos(1.0), math.sin(1.0), 0.0]))
    assert key[d:].abs().max() == 0  # the dims after the rotary ones pass unchanged

    x = torch.zeros(1, 1, 64)
    x[..., 0] = 1.0
    q_compressed = torch.zeros(1, 1, 24)
    q_compressed[..., 0] = 1.0
    unrotated_key = torch.eye(dim)[half].view(1, 1, dim)  # e_{d/2}, as at position 0
    score = indexer.scores(x, q_compressed, unrotated_key, cos, sin)[0, 0, 0]
    assert score.item() == pytest.approx(n_heads**-0.5 * math.sin(1.0) * dim**-0.5, rel=1e-6)


# ---- logits against transformers ----------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_checkpoint_gives_transformers_logits(case, tmp_path):
    hf_model = _hf_model(CASES[case], seed=1)
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.config == CASES[case]
    ids = _ids(2, 16)  # longer than index_topk: most tokens attend to a subset
    _, rel = _errors(_logits(model, ids), _logits(hf_model, ids))
    assert rel < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_deepmoe_checkpoint_gives_the_same_logits_in_transformers(case, tmp_path):
    config = dataclasses.replace(CASES[case], num_nextn_predict_layers=1)  # V3.2's MTP layer, with its indexer
    model = _model(config, seed=2)
    save_pretrained(model, tmp_path)
    hf_model = transformers_model(tmp_path)
    assert type(hf_model).__name__ == "DeepseekV32ForCausalLM"
    ids = _ids(2, 16, seed=1)
    _, rel = _errors(_logits(model, ids), _logits(hf_model, ids))
    assert rel < 1e-4
    assert torch.equal(_logits(from_pretrained(tmp_path), ids), _logits(model, ids))


def test_selection_changes_the_logits_and_k_at_least_the_prompt_is_dense_mla():
    config = v32_config()
    sparse = _model(config, seed=3)
    state = sparse.state_dict()
    everything = DeepSeekForCausalLM(dataclasses.replace(config, index_topk=16)).eval()
    everything.load_state_dict(state)
    dense_config = dataclasses.replace(config, model_type="deepseek_v3", index_topk=None, index_head_dim=None,
                                       index_n_heads=None, num_nextn_predict_layers=0)  # fmt: skip
    dense = DeepSeekForCausalLM(dense_config).eval()
    dense.load_state_dict({k: v for k, v in state.items() if ".indexer." not in k})
    ids = _ids(2, 16, seed=2)
    torch.testing.assert_close(_logits(everything, ids), _logits(dense, ids), rtol=1e-5, atol=1e-5)
    assert _errors(_logits(sparse, ids), _logits(dense, ids))[1] > 1e-2
    # the first index_topk tokens see all their keys either way
    torch.testing.assert_close(_logits(sparse, ids)[:, :4], _logits(dense, ids)[:, :4], rtol=1e-5, atol=1e-5)


# ---- cached decoding ----------------------------------------------------------------------------


def test_cached_absorbed_and_naive_steps_equal_the_uncached_forward():
    """Prefill 9 tokens, then 6 one at a time with the cache (the indexer's keys cached beside the latents): every
    step's logits are the full forward's, in the naive and in the absorbed form (which gathers the k latents)."""
    model = _model(v32_config(rope_scaling=YARN), seed=4)
    ids = _ids(2, 15, seed=3)
    full = _logits(model, ids)
    for absorb in (False, True):
        model.set_absorbed_attention(absorb)
        cache = KVCache()
        with torch.no_grad():
            steps = [model(ids[:, :9], past_key_values=cache).logits]
            steps += [model(ids[:, i : i + 1], past_key_values=cache).logits for i in range(9, 15)]
        assert len(cache.layers[1]) == 2 and cache.layers[1][1].shape == (2, 15, 16)  # [c_KV; k^R], k^I
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    model.set_absorbed_attention(False)


@pytest.mark.parametrize("absorb", [False, True])
def test_cached_greedy_decoding_equals_uncached_and_transformers(absorb, tmp_path):
    hf_model = _hf_model(CASES["yarn"], seed=5)
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    model.set_absorbed_attention(absorb)
    prompt = _ids(2, 10, seed=4)
    cached = generate(model, prompt, max_new_tokens=10)
    assert torch.equal(cached, generate(model, prompt, max_new_tokens=10, use_cache=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf_model.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert torch.equal(cached, theirs)


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("padding", [3, 8])
def test_left_padded_row_decodes_as_its_prompt_alone(absorb, padding):
    """Padding keys are never selected: a left-padded row's tokens are those of its prompt decoded alone. With
    8 of 10 tokens padding the first steps have fewer allowed keys than k = 4, so some picks are invalid."""
    model = _model(v32_config(), seed=6)
    model.set_absorbed_attention(absorb)
    prompt = _ids(2, 10, seed=5)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :padding] = 0
    batched = generate(model, prompt, max_new_tokens=8, attention_mask=mask, pad_token_id=0, eos_token_id=[])
    alone = generate(model, prompt[:1, padding:], max_new_tokens=8, eos_token_id=[])
    assert torch.equal(batched[0, 10:], alone[0, 10 - padding :])


# ---- dtype, config ------------------------------------------------------------------------------


def test_weights_proj_stays_float32(tmp_path):
    model = _model(v32_config(), seed=7)
    weights = model.model.layers[1].self_attn.indexer.weights_proj.weight
    before = weights.detach().clone()
    model.to(torch.bfloat16)
    assert weights.dtype == torch.float32 and torch.equal(weights, before)
    assert model.model.layers[1].self_attn.o_proj.weight.dtype == torch.bfloat16
    assert model(_ids(1, 9)).logits.isfinite().all()
    model.float()
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
    attn = loaded.model.layers[1].self_attn
    assert attn.indexer.weights_proj.weight.dtype == torch.float32 and attn.indexer.wq_b.weight.dtype == torch.bfloat16


def test_config_round_trips_and_transformers_reads_it():
    config = CASES["yarn"]
    written = config_to_hf(config)
    assert written["architectures"] == ["DeepseekV32ForCausalLM"]
    assert (written["index_topk"], written["index_head_dim"], written["index_n_heads"]) == (4, 16, 8)
    assert config_from_hf(written) == config
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in written.items() if k != "architectures"})
    assert (hf.index_topk, hf.index_head_dim, hf.index_n_heads) == (4, 16, 8)
    names = expected_shapes(config)
    assert names["model.layers.1.self_attn.indexer.wq_b.weight"] == (8 * 16, 24)
    assert names["model.layers.1.self_attn.indexer.k_norm.bias"] == (16,)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(index_topk=None), r"index_topk=None is invalid: must be an integer >= 1"),
        (dict(index_topk=0), r"index_topk=0 is invalid"),
        (dict(index_topk=300), r"index_topk=300 is invalid: must be <= max_position_embeddings=256"),
        (dict(index_n_heads=2.0), r"index_n_heads=2.0 is invalid"),
        (dict(index_head_dim=4), r"index_head_dim=4 is invalid: must be >= qk_rope_head_dim=8"),
        (dict(q_lora_rank=None), r"q_lora_rank=None is invalid: must be set with model_type='deepseek_v32'"),
        (dict(model_type="deepseek_v3"), r"index_topk=4 is invalid: must be None unless model_type='deepseek_v32'"),
    ],
)
def test_bad_indexer_settings_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CASES["yarn"], **change)
