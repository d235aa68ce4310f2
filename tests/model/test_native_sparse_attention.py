"""Native Sparse Attention (NSA) on MLA: the compression φ against eq. 7 written out block by block, the block
weights of eq. 10, each branch against a naive masked attention over the keys the paper's rules give (token by
token, in plain Python), the whole layer against per-head attention with decompressed keys and values, cached
decoding (and a cropped cache) against the full forward, the config errors, save/load, and training."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from configs import tiny_model_config
from corpora import StandInCorpus
from deepmoe.cli import main
from deepmoe.config import DeepSeekConfig
from deepmoe.model import from_pretrained, save_pretrained
from deepmoe.model.attention import KVCache, MultiHeadLatentAttention, _rope, _rotate
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.native_sparse_attention import NativeSparseAttention, selection_scores
from deepmoe.tools import study
from deepmoe.train import trainer as trainer_module
from deepmoe.train.config import TrainConfig, build_model_config
from reference import randomise_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

NSA = dict(nsa_compress_block=4, nsa_compress_stride=2, nsa_select_block=4, nsa_select_count=3, nsa_window=5)
CASES = {  # (l, d, l', n, w)
    "l=4 d=2 l'=4 n=3 w=5": NSA,
    "l=4 d=2 l'=8 n=4 w=3": dict(NSA, nsa_select_block=8, nsa_select_count=4, nsa_window=3),
    "l=d=l'=4 n=5 w=1": dict(NSA, nsa_compress_stride=4, nsa_select_count=5, nsa_window=1),
}


def _config(**overrides) -> DeepSeekConfig:
    return tiny_model_config(**{**NSA, **overrides})


def _model(config: DeepSeekConfig, seed: int = 0) -> DeepSeekForCausalLM:
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(config).eval()
    randomise_parameters(model, seed)
    return model


# ---- the naive reference: which keys each branch lets token t see ----------------------------------------------


def _compressed_keys(t: int, n_compressed: int, l: int, d: int, real: list[bool]) -> list[int]:  # noqa: E741
    """Compressed blocks complete by t (i·d + l − 1 <= t) without a padding token."""
    return [i for i in range(n_compressed) if i * d + l - 1 <= t and all(real[i * d : i * d + l])]


def _selected_keys(t: int, p_cmp: list[float], l: int, d: int, ls: int, n: int, real: list[bool]) -> list[int]:  # noqa: E741
    """Tokens <= t of the top-n selection blocks: block j scored by Σ_i p_cmp[i] · (tokens shared with block i) / d,
    the initial block and the 2 local ones always taken."""
    candidates = [j for j in range((t // ls) + 1)]
    scores = {}
    for j in candidates:
        block = set(range(j * ls, (j + 1) * ls))
        scores[j] = sum(p * len(block & set(range(i * d, i * d + l))) / d for i, p in enumerate(p_cmp))
    forced = [j for j in candidates if j in (0, t // ls, t // ls - 1)]
    rest = sorted((j for j in candidates if j not in forced), key=lambda j: -scores[j])
    chosen = forced + rest[: max(0, n - len(forced))]
    return [s for j in chosen for s in range(j * ls, (j + 1) * ls) if s <= t and (real[s] or s == t)]


def _window_keys(t: int, w: int, real: list[bool]) -> list[int]:
    return [s for s in range(max(0, t - w + 1), t + 1) if real[s] or s == t]


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ · scale) v for one token: q [n, D], keys [K, D] (or per head [n, K, D]), values likewise; 0
    when there is no key."""
    if keys.shape[-2] == 0:
        return q.new_zeros(q.shape[0], values.shape[-1])
    keys = keys.expand(q.shape[0], *keys.shape[-2:])
    values = values.expand(q.shape[0], *values.shape[-2:])
    p = (torch.einsum("hd,hkd->hk", q, keys) * scale).softmax(-1)
    return torch.einsum("hk,hkd->hd", p, values)


def _naive_branches(nsa: NativeSparseAttention, q, latent, compressed, scale, key_mask=None):
    """The three branches for every token, one at a time: lists of [n, d_c] per (batch row, token)."""
    bsz, seqlen, _, _ = q.shape
    total, d_c = latent.shape[1], nsa.kv_lora_rank
    l, d, ls, n, w = nsa.compress_block, nsa.compress_stride, nsa.select_block, nsa.select_count, nsa.window  # noqa: E741
    outs = torch.zeros(3, bsz, seqlen, q.shape[2], d_c)
    for b in range(bsz):
        real = [True] * total if key_mask is None else key_mask[b].tolist()
        for i in range(seqlen):
            t, qt = total - seqlen + i, q[b, i]
            ids = _compressed_keys(t, compressed.shape[1], l, d, real)
            keys = compressed[b, ids]
            outs[0, b, i] = _attend(qt, keys, keys[:, :d_c], scale)
            p_cmp = [0.0] * compressed.shape[1]
            if ids:
                probs = (torch.einsum("hd,kd->hk", qt, keys) * scale).softmax(-1).sum(0)
                for k, c in enumerate(ids):
                    p_cmp[c] = probs[k].item()
            for branch, ids in ((1, _selected_keys(t, p_cmp, l, d, ls, n, real)), (2, _window_keys(t, w, real))):
                outs[branch, b, i] = _attend(qt, latent[b, ids], latent[b, ids, :d_c], scale)
    return outs


# ---- the module's parts ---------------------------------------------------------------------------------------


def test_compression_is_the_mlp_of_each_block_plus_its_position_embedding():
    """ẽ_i = φ(e_{i·d : i·d+l} + p) (eq. 7) for every complete block; fewer than l tokens give none."""
    config = _config(nsa_compress_block=4, nsa_compress_stride=2)
    nsa = NativeSparseAttention(config)
    latent = torch.randn(2, 11, config.kv_lora_rank + config.qk_rope_head_dim)
    out = nsa.compress(latent)
    assert out.shape == (2, 4, latent.shape[-1])  # blocks at 0, 2, 4, 6 (the one at 8 is incomplete)
    for i in range(4):
        block = (latent[:, 2 * i : 2 * i + 4] + nsa.block_position.weight).flatten(1)
        hidden = F.silu(block @ nsa.compress_proj.weight.T)
        torch.testing.assert_close(out[:, i], hidden @ nsa.compress_out.weight.T)
    assert nsa.compress(latent[:, :3]).shape == (2, 0, latent.shape[-1])


def test_block_scores_use_the_weights_of_eq_10():
    """l = 32, d = 16, l' = 64 (the paper's sizes): block j gets weights 1, 2, 2, 2, 1 from the compressed blocks
    4j − 1 .. 4j + 3 (those sharing 16, 32, 32, 32, 16 tokens with it); l = d = l' maps block i to block i; and
    random p^cmp against the token overlaps counted one by one (l = 12, d = 4, l' = 16)."""
    weights = selection_scores(torch.eye(11), 3, 32, 16, 64)  # row i: compressed block i alone
    for j in range(3):
        expected = torch.zeros(11)
        for i, weight in zip(range(4 * j - 1, 4 * j + 4), (1, 2, 2, 2, 1), strict=True):
            if 0 <= i < 11:
                expected[i] = weight
        assert torch.equal(weights[:, j], expected)
    assert torch.equal(selection_scores(torch.eye(5), 5, 8, 8, 8), torch.eye(5))
    p_cmp = torch.rand(2, 15)  # T = 68 tokens: (68 − 12) / 4 + 1 = 15 blocks, 5 selection blocks
    expected = torch.tensor(
        [[sum(p[i].item() * len(set(range(4 * i, 4 * i + 12)) & set(range(16 * j, 16 * j + 16))) / 4
          for i in range(15)) for j in range(5)] for p in p_cmp]
    )  # fmt: skip
    torch.testing.assert_close(selection_scores(p_cmp, 5, 12, 4, 16), expected)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("padded", [False, True], ids=["", "padded"])
def test_each_branch_equals_naive_masked_attention(case, padded):
    """Compressed, selected and window branches of the last 9 of 23 tokens (14 cached) against attention over the
    keys each branch's rules give, token by token; with left padding (3 and 6 tokens) padding keys are hidden."""
    config = _config(**CASES[case])
    torch.manual_seed(1)
    nsa = NativeSparseAttention(config)
    total, seqlen, width = 23, 9, config.kv_lora_rank + config.qk_rope_head_dim
    latent = torch.randn(2, total, width)
    q = torch.randn(2, seqlen, config.num_attention_heads, width)
    key_mask = None
    if padded:
        key_mask = torch.ones(2, total, dtype=torch.bool)
        key_mask[0, :3] = key_mask[1, :6] = False
    compressed = nsa.compress(latent)
    scale = 0.3
    got = torch.stack(nsa.branches(q, latent, compressed, scale, key_mask))
    expected = _naive_branches(nsa, q, latent, compressed, scale, key_mask)
    for branch in range(3):
        torch.testing.assert_close(got[branch], expected[branch], rtol=1e-5, atol=1e-6)
    assert got[0, :, 0].abs().sum() > 0  # token 14 already sees compressed blocks


def _naive_layer(attn: MultiHeadLatentAttention, x: torch.Tensor) -> torch.Tensor:
    """The NSA layer without the absorbed form: per head h, keys [W_UK,h c; k^R] and values W_UV,h c of every
    latent (compressed ones included), the branches' keys from the naive rules, o = o_proj(Σ_c g_c · Attn_c)."""
    nsa, (bsz, seqlen, _) = attn.nsa, x.shape
    positions = torch.arange(seqlen)
    cos, sin = _rope(attn.rotary, positions)
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))).view(bsz, seqlen, attn.n_heads, -1)
    q_nope, q_rope = q.split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    q = torch.cat((q_nope, _rotate(q_rope, cos, sin, attn.rope_interleave)), dim=-1)  # [B, S, n, d_qk]
    c_kv, k_rope = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    k_rope = _rotate(k_rope.unsqueeze(2), cos, sin, attn.rope_interleave).squeeze(2)
    latent = torch.cat((attn.kv_a_layernorm(c_kv), k_rope), dim=-1)
    compressed = nsa.compress(latent)

    def heads(entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[K, d_c + d_r] → keys [n, K, d_qk], values [n, K, d_v]."""
        kv = attn.kv_b_proj(entries[:, : attn.kv_lora_rank]).view(
            len(entries), attn.n_heads, attn.qk_nope_head_dim + attn.v_head_dim
        )
        k_nope, v = kv.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=-1)
        rope = entries[:, None, attn.kv_lora_rank :].expand(-1, attn.n_heads, -1)
        return torch.cat((k_nope, rope), dim=-1).transpose(0, 1), v.transpose(0, 1)

    gates = torch.sigmoid(nsa.gate(x)).view(bsz, seqlen, attn.n_heads, 3)
    l, d, ls, n, w = nsa.compress_block, nsa.compress_stride, nsa.select_block, nsa.select_count, nsa.window  # noqa: E741
    out = torch.zeros(bsz, seqlen, attn.n_heads, attn.v_head_dim)
    real = [True] * seqlen
    for b in range(bsz):
        for t in range(seqlen):
            ids = _compressed_keys(t, compressed.shape[1], l, d, real)
            k_c, v_c = heads(compressed[b, ids])
            branch = [_attend(q[b, t], k_c, v_c, attn.softmax_scale)]
            p_cmp = [0.0] * compressed.shape[1]
            if ids:
                probs = (torch.einsum("hd,hkd->hk", q[b, t], k_c) * attn.softmax_scale).softmax(-1).sum(0)
                for k, c in enumerate(ids):
                    p_cmp[c] = probs[k].item()
            for keys in (_selected_keys(t, p_cmp, l, d, ls, n, real), _window_keys(t, w, real)):
                branch.append(_attend(q[b, t], *heads(latent[b, keys]), attn.softmax_scale))
            out[b, t] = sum(gates[b, t, :, c, None] * branch[c] for c in range(3))
    return attn.o_proj(out.flatten(2))


def test_layer_equals_per_head_attention_over_decompressed_keys():
    """The absorbed NSA layer (q·W_UK against latents, W_UV after the gated sum) against per-head attention over
    decompressed keys and values, 26 tokens (6 compressed blocks, 7 selection blocks of which 3 are picked)."""
    config = _config()
    torch.manual_seed(2)
    attn = MultiHeadLatentAttention(config, 0).eval()
    x = torch.randn(2, 26, config.hidden_size)
    with torch.no_grad():
        got = attn(x, torch.arange(26))
        expected = _naive_layer(attn, x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ---- the model: cached decoding, training, save/load ----------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_cached_decoding_gives_the_full_forward_logits(case):
    """A 7-token prompt then one token at a time to 30 tokens (the compressed blocks written to the cache as they
    complete) gives the uncached forward's logits at every position; so does decoding again after cropping the
    cache back to 19 tokens (speculative decoding's rejection)."""
    model = _model(_config(**CASES[case]))
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache()
        steps = [model(ids[:, :7], past_key_values=cache).logits]
        steps += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(7, 30)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
        cache.crop(19)
        again = torch.cat([model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(19, 30)], dim=1)
    torch.testing.assert_close(again, full[:, 19:], rtol=1e-4, atol=1e-5)
    dense = DeepSeekForCausalLM(_config_without_nsa(model.config))
    dense.load_state_dict(model.state_dict(), strict=False)
    assert not torch.allclose(dense.eval()(ids).logits, full, atol=1e-3)  # NSA computes something else than MLA


def _config_without_nsa(config: DeepSeekConfig) -> DeepSeekConfig:
    return DeepSeekConfig.from_dict({**config.to_dict(), **dict.fromkeys(DeepSeekConfig.NSA_FIELDS)})


def test_gradients_reach_the_compression_and_the_gates():
    """The LM loss trains φ, p (through the compressed branch) and W_g (through all three branches)."""
    model = _model(_config()).train()
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(4))
    model(ids, labels=ids).loss.backward()
    nsa = model.model.layers[0].self_attn.nsa
    for param in (nsa.block_position.weight, nsa.compress_proj.weight, nsa.compress_out.weight, nsa.gate.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


@pytest.mark.cpu_only
def test_save_and_load_round_trip(tmp_path):
    """deepmoe's save_pretrained/from_pretrained keep the nsa_* fields and NSA's weights (logits equal); saving
    warns that other libraries cannot compute the model."""
    model = _model(_config())
    with pytest.warns(UserWarning, match="Native Sparse Attention"):
        save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["deepmoe"]["nsa_select_block"] == 4
    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)


# ---- config errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(nsa_window=None), "nsa_window=None is invalid: must be set with the other NSA fields"),
        (dict(nsa_window=0), "nsa_window=0 is invalid: must be an integer >= 1"),
        (dict(nsa_compress_stride=8), "nsa_compress_stride=8 is invalid: must divide nsa_compress_block=4"),
        (dict(nsa_compress_stride=3), "nsa_compress_stride=3 is invalid: must divide nsa_compress_block=4"),
        (dict(nsa_select_block=5), "nsa_select_block=5 is invalid: must be a multiple of nsa_compress_stride=2"),
        (dict(nsa_select_block=2), "nsa_select_block=2 is invalid: must be a multiple of nsa_compress_stride=2, >="),
        (dict(nsa_select_count=2), "nsa_select_count=2 is invalid: must be >= 3"),
        (dict(nsa_select_count=40, max_position_embeddings=128), "nsa_select_count=40 is invalid"),
        (dict(nsa_window=200, max_position_embeddings=128), "nsa_window=200 is invalid: must be <= max_position"),
        (dict(nsa_compress_block=256, max_position_embeddings=128), "nsa_compress_block=256 is invalid"),
        (dict(model_type="deepseek_v32", index_topk=4, index_head_dim=8, index_n_heads=2), "model_type='deepseek_v32"),
    ],
)
def test_bad_nsa_settings_are_one_error_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match="^DeepSeekConfig." + message.replace("(", r"\(").replace(")", r"\)")):
        _config(**overrides)


def test_nsa_needs_mla():
    with pytest.raises(ValueError, match="attention_type='mha' is invalid: must be 'mla' with NSA"):
        DeepSeekConfig(attention_type="mha", **NSA)


# ---- training -------------------------------------------------------------------------------------------------


def _options(out, **overrides) -> TrainConfig:
    options = dict(preset="tiny-v3", layers=2, hidden_size=32, seq_len=80, batch_size=2, steps=2, warmup_steps=1,
                   eval_every=0, save_every=0, keep_last=0, progress=False, out=str(out),
                   sparse_attention="nsa")  # fmt: skip
    return TrainConfig(**{**options, **overrides})


def test_nsa_option_sets_the_defaults_and_keeps_the_overrides(tmp_path):
    config = build_model_config(_options(tmp_path, model_overrides={"nsa_window": 8}), 64)
    assert [getattr(config, f) for f in DeepSeekConfig.NSA_FIELDS] == [16, 8, 16, 4, 8]
    with pytest.raises(ValueError, match="nsa_select_count × nsa_select_block = 64 is not below TrainConfig.seq_len"):
        build_model_config(_options(tmp_path, seq_len=64), 64)
    with pytest.raises(ValueError, match="preset 'tiny-deepseek-moe' uses multi-head attention"):
        build_model_config(_options(tmp_path, preset="tiny-deepseek-moe"), 64)
    with pytest.raises(ValueError, match="TrainConfig.sparse_attention='nsa' is invalid: 'nsa' trains new models"):
        TrainConfig(init_from=str(tmp_path), sparse_attention="nsa")


@pytest.mark.cpu_only
def test_deepmoe_train_sparse_attention_nsa(tmp_path, monkeypatch):
    """`deepmoe train --sparse-attention nsa` trains 2 steps and saves an NSA model that loads back."""
    g = torch.Generator().manual_seed(0)
    corpus = StandInCorpus(torch.randint(0, 64, (4000,), generator=g), torch.randint(0, 64, (400,), generator=g))
    monkeypatch.setattr(trainer_module, "load_corpus", lambda config, name, *rest: corpus)
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny-v3", "--sparse-attention", "nsa", "--layers", "2", "--hidden", "32",
            "--seq-len", "80", "--batch-size", "2", "--steps", "2", "--warmup-steps", "1", "--eval-every", "0",
            "--save-every", "0", "--keep-last", "0", "--final-eval-batches", "1", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    model = DeepSeekForCausalLM.from_pretrained(next(p.parent for p in out.rglob("config.json")))
    assert model.config.has_nsa and model.config.nsa_select_count == 4


def test_attention_study_compares_dense_dsa_and_nsa_at_one_budget(tmp_path):
    """`deepmoe study attention`: the same tiny-v3 shapes dense, with DSA (k = n·l' + w of NSA) and with NSA."""
    scale = study.SCALES["quick"]
    variants = study.variants_of("attention", scale)
    configs = {v.name: build_model_config(study.train_config(v, scale, tmp_path, 0), 64) for v in variants}
    assert list(configs) == ["dense", "dsa", "nsa"]
    assert not configs["dense"].has_indexer and not configs["dense"].has_nsa
    assert configs["dsa"].has_indexer and configs["dsa"].index_topk == 4 * 16 + 32
    assert configs["nsa"].has_nsa and not configs["nsa"].has_indexer
    shapes = {
        (c.hidden_size, c.num_hidden_layers, c.kv_lora_rank, c.num_nextn_predict_layers) for c in configs.values()
    }
    assert shapes == {(scale.hidden_size, scale.layers, 64, 0)}
    assert {study.train_config(v, scale, tmp_path, 0).seq_len for v in variants} == {4 * scale.seq_len}
