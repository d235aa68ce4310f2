"""DeepSeek-V4's modules against their formulas written out plainly (docs/design.md#deepseek-v4): √softplus and
hash routing, the clamped SwiGLU of routed and shared experts, mHC's maps and Sinkhorn projection, the compressors'
gated pooling (HCA's disjoint windows, CSA's overlapping ones) fed at once or in pieces, sliding-window attention
with sinks and the grouped output, and the config's checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from configs import v4_config
from deepmoe.config import DeepSeekConfig, MoEConfig
from deepmoe.model.hyper_connections import HyperConnection
from deepmoe.model.v4_attention import Compressor, CompressorState, SharedKVAttention, V4Rotary
from deepmoe.moe import MoE
from deepmoe.moe.router import Router
from reference import randomise_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

V4_MOE = dict(hidden_size=8, moe_intermediate_size=4, n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2,
              scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5)  # fmt: skip


# ---- routing ------------------------------------------------------------------------------------------


def test_sqrtsoftplus_routing_is_top_k_of_biased_scores_normalised_and_scaled():
    config = MoEConfig(**V4_MOE, use_expert_bias=True)
    router = Router(config)
    randomise_parameters(router, seed=0, bias_std=0.3)
    x = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    out = router(x)
    for t in range(12):
        scores = [math.sqrt(math.log1p(math.exp(float(router.weight[i].detach() @ x[t])))) for i in range(6)]
        ranked = sorted(range(6), key=lambda i: -(scores[i] + float(router.e_score_correction_bias[i])))[:2]
        assert sorted(out.topk_idx[t].tolist()) == sorted(ranked)
        total = sum(scores[i] for i in ranked)
        for j, i in enumerate(out.topk_idx[t].tolist()):
            assert out.topk_weight[t, j].item() == pytest.approx(1.5 * scores[i] / total, rel=1e-5)


def test_hash_routing_takes_the_experts_of_the_token_id_and_the_weights_of_the_gate():
    router = Router(MoEConfig(**V4_MOE, hash_vocab_size=10))
    assert router.tid2eid.shape == (10, 2) and "tid2eid" in router.state_dict()
    assert all(len(set(row)) == 2 for row in router.tid2eid.tolist())  # distinct experts per token id
    ids = torch.tensor([3, 3, 7, 0, 9])
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    out = router(x, token_ids=ids)
    assert torch.equal(out.topk_idx, router.tid2eid[ids])
    scores = F.softplus(x @ router.weight.T).sqrt().gather(1, out.topk_idx)
    torch.testing.assert_close(out.topk_weight, 1.5 * scores / scores.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="token ids"):
        router(x)


# ---- clamped SwiGLU -------------------------------------------------------------------------------------


def _clamped_swiglu(x, w_gate, w_up, w_down, limit):
    gate, up = (w_gate @ x).clamp(max=limit), (w_up @ x).clamp(-limit, limit)
    return w_down @ (F.silu(gate) * up)


@pytest.mark.parametrize("implementation", ["grouped_mm", "loop"])
def test_clamped_swiglu_in_routed_and_shared_experts(implementation):
    layer = MoE(MoEConfig(**V4_MOE, swiglu_limit=0.5, experts_implementation=implementation))
    randomise_parameters(layer, seed=3)
    x = 2 * torch.randn(10, 8, generator=torch.Generator().manual_seed(4))
    out = layer(x).hidden_states
    routing, inter = layer.gate(x), 4
    shared = layer.shared_experts
    for t in range(10):
        expected = _clamped_swiglu(x[t], shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight, 0.5)
        for j, e in enumerate(routing.topk_idx[t].tolist()):
            gate_up = layer.experts.gate_up_proj[e]
            expert = _clamped_swiglu(x[t], gate_up[:inter], gate_up[inter:], layer.experts.down_proj[e], 0.5)
            expected = expected + routing.topk_weight[t, j] * expert
        torch.testing.assert_close(out[t], expected, rtol=1e-5, atol=1e-5)
    layer.config = dataclasses.replace(layer.config, swiglu_limit=None)
    assert (layer(x).hidden_states - out).abs().max() > 1e-2  # the clamps were active


# ---- mHC ------------------------------------------------------------------------------------------------


def test_hyper_connection_maps_and_sinkhorn_follow_the_formula():
    config = v4_config(hc_mult=3, hc_sinkhorn_iters=30)
    hc = HyperConnection(config)
    randomise_parameters(hc, seed=5)
    streams = torch.randn(1, 2, 3, 32, generator=torch.Generator().manual_seed(6))
    collapsed, post, res = hc(streams)
    n, eps = 3, config.hc_eps
    fn, base, scale = hc.fn.detach().double(), hc.base.detach().double(), hc.scale.detach().double()
    for s in range(2):
        flat = streams[0, s].flatten().double()
        flat = flat / math.sqrt(float((flat**2).mean()) + config.rms_norm_eps)
        mix = [float(fn[i] @ flat) for i in range(fn.shape[0])]
        pre = [1 / (1 + math.exp(-(mix[i] * scale[0] + base[i]))) + eps for i in range(n)]
        expected_post = [2 / (1 + math.exp(-(mix[n + i] * scale[1] + base[n + i]))) for i in range(n)]
        logits = [[mix[2 * n + i * n + j] * scale[2] + base[2 * n + i * n + j] for j in range(n)] for i in range(n)]
        m = [[math.exp(v) / sum(math.exp(w) for w in row) + eps for v in row] for row in logits]
        for step in range(2 * 30 - 1):  # columns first, then rows and columns alternately
            if step % 2 == 0:
                sums = [sum(m[i][j] for i in range(n)) + eps for j in range(n)]
                m = [[m[i][j] / sums[j] for j in range(n)] for i in range(n)]
            else:
                m = [[v / (sum(row) + eps) for v in row] for row in m]
        torch.testing.assert_close(res[0, s].double(), torch.tensor(m, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(post[0, s].double(), torch.tensor(expected_post, dtype=torch.float64))
        expected = sum(pre[i] * streams[0, s, i].double() for i in range(n))
        torch.testing.assert_close(collapsed[0, s].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res.sum(-1), torch.ones(1, 2, 3), atol=1e-4, rtol=0)  # doubly stochastic
    torch.testing.assert_close(res.sum(-2), torch.ones(1, 2, 3), atol=1e-4, rtol=0)
    out = torch.randn(1, 2, 32)
    merged = HyperConnection.merge(out, streams, post, res)
    for k in range(n):  # X'_k = post_k F(x) + Σ_j res_jk X_j
        expected = post[..., k, None] * out + sum(res[..., j, k, None] * streams[:, :, j] for j in range(n))
        torch.testing.assert_close(merged[:, :, k], expected, rtol=1e-5, atol=1e-6)


# ---- compressors ----------------------------------------------------------------------------------------


def _pooled(kv, gate, norm_weight, eps):
    """RMSNorm(Σ_s softmax_s(gate) ⊙ kv) over the slots s (dim 0) of one window."""
    pooled = (kv * gate.softmax(dim=0)).sum(0)
    return norm_weight * pooled / torch.sqrt(pooled.pow(2).mean() + eps)


@pytest.mark.parametrize("overlap", [False, True], ids=["hca", "csa"])
def test_compressor_pools_each_window_and_is_the_same_fed_in_pieces(overlap):
    torch.manual_seed(7)
    m, d, rope = 4, 8, 4
    compressor = Compressor(16, d, m, overlap, 1e-6)
    randomise_parameters(compressor, seed=7)
    rotary = V4Rotary(rope, 10000.0, None)
    x = torch.randn(2, 14, 16)  # 3 closed windows, 2 tokens left open
    entries = compressor(x, CompressorState(), rotary)
    assert entries.shape == (2, 3, d)
    kv, gate = compressor.kv_proj(x), compressor.gate_proj(x)
    bias = compressor.position_bias
    for b in range(2):
        for w in range(3):
            rows = slice(w * m, (w + 1) * m)
            if not overlap:
                expected = _pooled(kv[b, rows], gate[b, rows] + bias, compressor.kv_norm.weight, 1e-6)
            else:  # the first halves of window w − 1 and the second halves of window w, 2m slots
                values, gates = [kv[b, rows, d:]], [gate[b, rows, d:] + bias[:, d:]]
                if w > 0:
                    previous = slice((w - 1) * m, w * m)
                    values.insert(0, kv[b, previous, :d])
                    gates.insert(0, gate[b, previous, :d] + bias[:, :d])
                expected = _pooled(torch.cat(values), torch.cat(gates), compressor.kv_norm.weight, 1e-6)
            cos, sin = rotary(torch.tensor([w * m]))
            a, c = expected[-rope::2], expected[-rope + 1 :: 2]  # interleaved pairs of the trailing dims
            rotated = torch.stack((a * cos[0] - c * sin[0], c * cos[0] + a * sin[0]), dim=-1).flatten()
            expected = torch.cat((expected[:-rope], rotated))
            torch.testing.assert_close(entries[b, w], expected, rtol=1e-5, atol=1e-5)
    state = CompressorState()  # the same tokens in pieces of 3, 6 and 5, as a cache feeds them
    for piece in (x[:, :3], x[:, 3:9], x[:, 9:]):
        pieces = compressor(piece, state, rotary)
    torch.testing.assert_close(pieces, entries, rtol=1e-6, atol=1e-6)
    assert state.pending_kv.shape[1] == 2


# ---- attention --------------------------------------------------------------------------------------------


@torch.no_grad()
def test_sliding_attention_with_sinks_and_grouped_output_follows_the_formula():
    config = v4_config(sliding_window=3)
    attention = SharedKVAttention(config, 0)  # layer 0 is a sliding layer
    randomise_parameters(attention, seed=8)
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(9))
    out = attention(x, torch.arange(6))
    n, d, rope, eps = 4, 16, 8, config.rms_norm_eps
    cos, sin = attention.rotary(torch.arange(6))

    def rotate(v, t, sign=1.0):  # interleaved pairs of the trailing `rope` dims at position t
        a, c = v[-rope::2], v[-rope + 1 :: 2]
        turned = torch.stack((a * cos[t] - sign * c * sin[t], c * cos[t] + sign * a * sin[t]), dim=-1).flatten()
        return torch.cat((v[:-rope], turned))

    q_compressed = attention.q_a_norm(attention.q_a_proj(x[0]))
    kv = [rotate(attention.kv_norm(attention.kv_proj(x[0, s])), s) for s in range(6)]
    for t in range(6):
        heads = []
        q_all = attention.q_b_proj(q_compressed[t]).view(n, d)
        for h in range(n):
            q = rotate(q_all[h] / torch.sqrt(q_all[h].pow(2).mean() + eps), t)
            keys = [s for s in range(6) if 0 <= t - s < 3]
            logits = [float(q @ kv[s]) / math.sqrt(d) for s in keys]
            norm = sum(math.exp(v) for v in logits) + math.exp(float(attention.sinks[h]))
            value = sum(math.exp(v) / norm * kv[s] for v, s in zip(logits, keys, strict=True))
            heads.append(rotate(value, t, sign=-1.0))
        groups = torch.cat(heads).view(2, -1)  # 2 groups of 2 heads
        w_a = attention.o_a_proj.weight.view(2, 8, -1)
        expected = attention.o_b_proj.weight @ torch.cat([w_a[g] @ groups[g] for g in range(2)])
        torch.testing.assert_close(out[0, t], expected, rtol=1e-5, atol=1e-5)


# ---- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(layer_types=["sliding_attention"] * 3), r"layer_types=.* must list num_hidden_layers=4 entries"),
        (dict(mlp_layer_types=["hash_moe", "dense", "moe", "moe"]), r"mlp_layer_types=.*invalid"),
        (dict(compress_rates={"compressed_sparse_attention": 4}), r"compress_rates=.*invalid"),
        (dict(o_groups=3), r"o_groups=3 is invalid: must divide"),
        (dict(index_topk=None), r"index_topk=None is invalid: must be an integer >= 1 with CSA layers"),
        (dict(hc_mult=0), r"hc_mult=0 is invalid"),
        (dict(intermediate_size=48), r"intermediate_size=48 is invalid: must equal moe.moe_intermediate_size"),
        (dict(model_type="deepseek_v3"), r"is invalid: must be None unless model_type="),
    ],
)
def test_bad_v4_settings_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        v4_config(**change)


def test_v4_fields_are_refused_on_other_model_types():
    with pytest.raises(ValueError, match=r"hc_mult=4 is invalid: must be None unless model_type='deepseek_v4'"):
        DeepSeekConfig(hc_mult=4)
    with pytest.raises(ValueError, match=r"swiglu_limit=0 is invalid"):
        MoEConfig(**V4_MOE, swiglu_limit=0)


def test_hash_routed_layers_refuse_expert_masks():
    router = Router(MoEConfig(**V4_MOE, hash_vocab_size=10))
    with pytest.raises(ValueError, match="hash-routed MoE layer takes its experts from the token ids"):
        router.set_expert_mask(disabled=[0])
    with pytest.raises(ValueError, match="hash-routed"):
        router.row_mask([([0], None)])
    router.clear_expert_mask()  # nothing to clear: allowed


# ---- dtype, presets -------------------------------------------------------------------------------------


def test_mhc_maps_sinks_and_position_biases_stay_float32_in_a_bf16_model():
    from deepmoe.model.decoder import DeepSeekForCausalLM

    model = DeepSeekForCausalLM(v4_config()).eval().to(torch.bfloat16)
    kept = {name for name, p in model.named_parameters() if p.dtype == torch.float32}
    assert "model.layers.1.attn_hc.fn" in kept and "model.hc_head.hc_scale" in kept
    assert {"model.layers.3.self_attn.sinks", "model.layers.3.self_attn.compressor.indexer.position_bias"} <= kept
    assert all(name.endswith(("hc.fn", "hc.base", "hc.scale", "sinks", "position_bias")) or "hc_head" in name
               for name in kept)  # fmt: skip
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()


def test_v4_presets_count_the_published_sizes_and_tiny_v4_runs():
    """DeepSeek-V4-Flash is 284B parameters with 13B active, V4-Pro 1.6T with 49B (the released models' cards);
    active counts include the embedding and head, as inspect prints them."""
    from deepmoe.model.decoder import DeepSeekForCausalLM
    from deepmoe.model.parameters import count_parameters
    from deepmoe.presets import get_preset
    from deepmoe.tools.inspect import describe

    flash, pro = count_parameters(get_preset("deepseek-v4-flash")), count_parameters(get_preset("deepseek-v4-pro"))
    assert 283e9 < flash.total < 286e9 and 13e9 < flash.active < 14e9
    assert 1.55e12 < pro.total < 1.65e12 and 49e9 < pro.active < 50.5e9
    flash_config = get_preset("deepseek-v4-flash")
    assert describe(flash_config)["gate"] == "sqrtsoftplus/greedy"
    # the cache grows by the compressed entries: CSA an entry (512) and an indexer key (128) every 4 tokens, HCA an
    # entry every 128 tokens; bf16
    csa, hca = (
        flash_config.layer_types.count(k) for k in ("compressed_sparse_attention", "heavily_compressed_attention")
    )
    assert (csa, hca) == (20, 23)
    assert describe(flash_config)["kv_cache_bytes_per_token"] == 2 * (csa * (512 + 128) / 4 + hca * 512 / 128)
    tiny = DeepSeekForCausalLM(get_preset("tiny-v4")).eval()
    with torch.no_grad():
        assert tiny(torch.randint(0, 4096, (1, 40))).logits.isfinite().all()


@torch.no_grad()
def test_indexer_keeps_each_tokens_top_k_visible_entries_by_its_score():
    """I_t,w = Σ_h w_t,h · ReLU(q_t,h · K_w) / √c with w_t = W_w x_t / √n, over the entries visible at t
    (w < (t + 1) // m); ties (every head's ReLU at 0) go to the earlier entry."""
    from deepmoe.model.v4_attention import Indexer

    config = v4_config(index_topk=2, index_n_heads=3)
    indexer = Indexer(config, ratio=4)
    randomise_parameters(indexer, seed=10)
    rotary = V4Rotary(8, 160000.0, None)
    x, q_compressed = torch.randn(1, 22, 32), torch.randn(1, 22, 16)
    chosen = indexer.select(x, q_compressed, torch.arange(22), CompressorState(), rotary)
    keys = indexer(x, CompressorState(), rotary)[0]  # [5, 8]
    cos, sin = rotary(torch.arange(22))
    for t in range(22):
        q = indexer.q_b_proj(q_compressed[0, t]).view(3, 8)
        a, c = q[:, -8::2], q[:, -7::2]
        q = torch.stack((a * cos[t] - c * sin[t], c * cos[t] + a * sin[t]), dim=-1).flatten(-2)
        w = indexer.scorer.weights_proj(x[0, t]) / math.sqrt(3)
        visible = list(range(min(5, (t + 1) // 4)))
        score = {
            e: sum(float(w[h]) * max(0.0, float(q[h] @ keys[e])) / math.sqrt(8) for h in range(3)) for e in visible
        }
        best = sorted(visible, key=lambda e: (-score[e], e))[:2]
        assert sorted(chosen[0, t].nonzero().flatten().tolist()) == sorted(best), t
    indexer.scorer.weights_proj.weight.zero_()  # every score 0: the earliest visible entries
    chosen = indexer.select(x, q_compressed, torch.arange(22), CompressorState(), rotary)
    assert chosen[0, 21].nonzero().flatten().tolist() == [0, 1]


# ---- multi-token prediction -------------------------------------------------------------------------------


@torch.no_grad()
def test_v4_mtp_reads_the_streams_before_the_head_and_the_next_tokens():
    """Depth 1: X'_i = W_e RMSNorm(Emb(t_{i+1})) + W_h RMSNorm(H_i) on every stream of the main model's last
    streams H (before hc_head), a sliding-window block, logits = Head(RMSNorm(hc_head(·))); its loss is
    λ · CE(logits_i, t_{i+2})."""
    from deepmoe.model.decoder import DeepSeekForCausalLM
    from deepmoe.model.generate import generate_speculative

    model = DeepSeekForCausalLM(v4_config(num_nextn_predict_layers=1)).eval()
    randomise_parameters(model, seed=11)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(12))
    out = model(ids, labels=ids)
    streams = model.model.embed_tokens(ids).unsqueeze(2).expand(-1, -1, 2, -1)
    for layer in model.model.layers:
        streams, _ = layer(streams, torch.arange(20), None, token_ids=ids)
    mtp = model.model.mtp[0]
    assert mtp.block.self_attn.layer_type == "sliding_attention" and mtp.block.mlp.gate.tid2eid is None
    x = mtp.e_proj(mtp.enorm(model.model.embed_tokens(ids[:, 1:]))).unsqueeze(2) + mtp.h_proj(
        mtp.hnorm(streams[:, :-1])
    )
    h, _ = mtp.block(x, torch.arange(19), None)
    logits = model.lm_head(mtp.norm(mtp.hc_head(h)))
    torch.testing.assert_close(out.mtp_logits[0], logits, rtol=1e-5, atol=1e-5)
    expected = model.config.mtp_loss_weight * F.cross_entropy(logits[:, :18].flatten(0, 1), ids[:, 2:].flatten())
    torch.testing.assert_close(out.mtp_loss, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="speculative decoding does not take DeepSeek-V4"):
        generate_speculative(model, ids[:, :4], max_new_tokens=2)


def test_longer_layer_lists_are_cut_to_the_layers_as_transformers_does():
    config = v4_config(num_hidden_layers=2)
    assert config.layer_types == ["sliding_attention", "compressed_sparse_attention"]
    assert config.mlp_layer_types == ["hash_moe", "hash_moe"]
