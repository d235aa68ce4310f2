"""DSA and NSA against dense MLA by context length: time per decoded token of one MLA layer (issue 20, item 5;
docs/design.md#m7-deepseek-sparse-attention, #m7b-native-sparse-attention-on-mla).

One MLA layer of V3-style shapes (hidden 512, 8 heads, q_lora 192, kv_lora 128, nope/rope/v 64/32/64; the
attention of `_common.small_v3_config`) in float32, both variants in the absorbed form (`absorb = True`, what
decoding uses), with the same MLA weights:
  - dense: model_type deepseek_v3, attention over every cached latent [c_KV; k^R];
  - DSA: model_type deepseek_v32 with a lightning indexer (--index-heads x --index-dim, top --topk): the
    indexer scores the new token against every cached k^I, then MLA attends over the k selected latents only;
  - NSA: the nsa_* fields (compression blocks of --nsa-block tokens at stride --nsa-stride, --nsa-select-count
    selection blocks of --nsa-select-block tokens, a window of --nsa-window; by default 6 x 64 + 128 = 512 = k
    tokens attended uncompressed, as DSA's k) plus the T / d compressed latents, the three branches gated.

For each context T the KV cache is built directly, not by prefill (a 16k prefill of the naive form would
dominate the run): T random hidden states go through the layer's own projections (kv_a_proj_with_mqa,
kv_a_layernorm, MLA's RoPE; the indexer's wk, k_norm and half-split RoPE) and the results are written with
`KVCache.update`, the latent into all three caches, k^I into the DSA one, and NSA's compressed latents
(`NativeSparseAttention.update_cache`) into the NSA one. Then single-token decode steps at position
T are timed (the cache cropped back to T after each, so every step sees T cached tokens): --steps per sample,
--rounds samples per variant, variants interleaved round by round (`_common.interleaved_medians`), medians.
"indexer" times the DSA layer's indexer alone (scores + top-k over the T + 1 keys) on the same step.

Checked first (assertions): with T + 1 <= k the DSA layer's decoded output equals the dense layer's (the
selection keeps every key, so the timings compare the same computation); with T + 1 > k the absorbed DSA
output (gathered latents) equals the naive masked form of the same layer, and differs from dense; the NSA
layer's decoded output over its built cache equals its uncached forward over the same hidden states.

Peak memory is not measured: the cache bytes per token (per layer: the latent, plus the indexer key for DSA,
plus NSA's slot for the compressed latent of the block ending at that token) are counted by
`KVCache.nbytes_per_token`.

    python benchmarks/sparse_attention.py [--contexts 1024 2048 4096 8192 16384] [--topk 512] [--rounds 31]
        [--steps 16] [--threads 1] [--nsa-block 32] [--nsa-stride 16] [--nsa-select-block 64]
        [--nsa-select-count 6] [--nsa-window 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import interleaved_medians, small_v3_config
from deepmoe import DeepSeekConfig
from deepmoe.model.attention import KVCache, MultiHeadLatentAttention, _rope, _rotate
from deepmoe.model.sparse_attention import allowed_keys


def configs(
    topk: int, index_heads: int, index_dim: int, max_len: int, nsa: dict[str, int]
) -> tuple[DeepSeekConfig, DeepSeekConfig, DeepSeekConfig]:
    """(dense V3 config, the same with DSA's indexer, the same with NSA's `nsa` fields) of small_v3_config's
    attention shapes."""
    fields = {**small_v3_config().to_dict(), "max_position_embeddings": max(max_len, topk)}
    dense = DeepSeekConfig.from_dict(fields)
    sparse = DeepSeekConfig.from_dict(
        {
            **fields,
            "model_type": "deepseek_v32",
            "index_topk": topk,
            "index_n_heads": index_heads,
            "index_head_dim": index_dim,
        }
    )
    return dense, sparse, DeepSeekConfig.from_dict({**fields, **nsa})


def layers(dense_config: DeepSeekConfig, sparse_config: DeepSeekConfig, nsa_config: DeepSeekConfig, seed: int = 0):
    """(dense layer, DSA layer, NSA layer) with the same MLA weights, absorbed form, eval mode."""
    torch.manual_seed(seed)
    sparse = MultiHeadLatentAttention(sparse_config, 0)
    dense = MultiHeadLatentAttention(dense_config, 0)
    nsa = MultiHeadLatentAttention(nsa_config, 0)
    missing, unexpected = dense.load_state_dict(sparse.state_dict(), strict=False)
    assert not missing and all(k.startswith("indexer.") for k in unexpected), (missing, unexpected)
    missing, unexpected = nsa.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("nsa.") for k in missing), (missing, unexpected)
    for layer in (dense, sparse, nsa):
        layer.eval()
        layer.absorb = True
    return dense, sparse, nsa


def hidden_states(length: int, hidden: int, seed: int, chunk: int = 4096):
    """The random hidden states [1, n, H] of the cached tokens, `chunk` at a time: (start, x)."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, length, chunk):
        yield start, torch.randn(1, min(chunk, length - start), hidden, generator=g)


@torch.inference_mode()
def build_caches(sparse: MultiHeadLatentAttention, nsa: MultiHeadLatentAttention, length: int, seed: int):
    """(dense cache, DSA cache, NSA cache) of `length` tokens: random hidden states through the layers' own
    projections (what a forward would cache for them), written with KVCache.update; room for one more token."""
    dense_cache, sparse_cache, nsa_cache = KVCache(length + 1), KVCache(length + 1), KVCache(length + 1)
    for start, x in hidden_states(length, sparse.kv_a_proj_with_mqa.in_features, seed):
        cos, sin = _rope(sparse.rotary, torch.arange(start, start + x.shape[1]))
        c_kv, k_rope = sparse.kv_a_proj_with_mqa(x).split([sparse.kv_lora_rank, sparse.qk_rope_head_dim], dim=-1)
        k_rope = _rotate(k_rope.unsqueeze(2), cos, sin, sparse.rope_interleave).squeeze(2)
        latent = torch.cat((sparse.kv_a_layernorm(c_kv), k_rope), dim=-1)
        dense_cache.update(0, latent)
        sparse_cache.update(0, latent, sparse.indexer.keys(x, cos, sin))
        nsa.nsa.update_cache(latent, nsa_cache, 0)
    return dense_cache, sparse_cache, nsa_cache


def decoder(layer: MultiHeadLatentAttention, cache: KVCache, x: torch.Tensor, length: int, steps: int):
    """`steps` decode steps of x at position `length` over the cache's first `length` tokens."""
    positions = torch.tensor([length])

    @torch.inference_mode()
    def run() -> torch.Tensor:
        for _ in range(steps):
            out = layer(x, positions, cache)
            cache.crop(length)
        return out

    return run


def indexer_only(sparse: MultiHeadLatentAttention, cache: KVCache, x: torch.Tensor, length: int, steps: int):
    """The DSA layer's indexer on the decode step: scores against the T + 1 keys and top-k."""
    positions = torch.tensor([length])
    with torch.inference_mode():
        cos, sin = _rope(sparse.rotary, positions)
        q_compressed = sparse.q_a_layernorm(sparse.q_a_proj(x))
        keys = torch.cat((cache.layers[0][1], sparse.indexer.keys(x, cos, sin)), dim=1)  # [1, T + 1, D]
        allowed = allowed_keys(1, 1, length + 1, length, None, x.device)

    @torch.inference_mode()
    def run() -> None:
        for _ in range(steps):
            sparse.indexer(x, q_compressed, keys, cos, sin, allowed)

    return run


def check(dense, sparse, nsa, topk: int) -> None:
    """DSA == dense when every key is selected; absorbed DSA == naive (masked) DSA != dense when not; NSA decoded
    over the built cache == NSA's uncached forward."""
    g = torch.Generator().manual_seed(1)
    hidden = dense.kv_a_proj_with_mqa.in_features
    x = torch.randn(1, 1, hidden, generator=g)
    short = topk - 1  # cache + the new token = k keys: all selected
    dense_cache, sparse_cache, nsa_cache = build_caches(sparse, nsa, short, seed=2)
    a = decoder(dense, dense_cache, x, short, 1)()
    b = decoder(sparse, sparse_cache, x, short, 1)()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    c = decoder(nsa, nsa_cache, x, short, 1)()
    with torch.inference_mode():
        whole = torch.cat([h for _, h in hidden_states(short, hidden, seed=2)] + [x], dim=1)
        torch.testing.assert_close(c, nsa(whole, torch.arange(short + 1))[:, -1:], rtol=1e-4, atol=1e-5)
    long = 2 * topk
    dense_cache, sparse_cache, _ = build_caches(sparse, nsa, long, seed=3)
    a = decoder(dense, dense_cache, x, long, 1)()
    b = decoder(sparse, sparse_cache, x, long, 1)()
    sparse.absorb = False
    try:
        c = decoder(sparse, sparse_cache, x, long, 1)()
    finally:
        sparse.absorb = True
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, b, rtol=1e-3, atol=1e-4), "DSA equals dense with T > k: the selection did nothing"
    diff = ((b - a).abs().max() / a.abs().max()).item()
    print(
        f"check: T={short} (T+1 <= k={topk}): DSA == dense; T={long}: absorbed DSA == masked naive DSA, "
        f"max |DSA - dense| / max |dense| = {diff:.3f}; T={short}: NSA decoded over its cache == NSA uncached"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--topk", type=int, default=512, help="index_topk, the keys DSA attends over (default 512)")
    parser.add_argument("--index-heads", type=int, default=4, help="indexer query heads (default 4)")
    parser.add_argument("--index-dim", type=int, default=64, help="indexer head width (default 64)")
    parser.add_argument("--nsa-block", type=int, default=32, help="NSA compression block l (default 32)")
    parser.add_argument("--nsa-stride", type=int, default=16, help="NSA compression stride d (default 16)")
    parser.add_argument("--nsa-select-block", type=int, default=64, help="NSA selection block l' (default 64)")
    parser.add_argument("--nsa-select-count", type=int, default=6, help="NSA selected blocks n (default 6)")
    parser.add_argument("--nsa-window", type=int, default=128, help="NSA sliding window w (default 128)")
    parser.add_argument("--rounds", type=int, default=31, help="timed samples per variant (default 31)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per sample (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    nsa_fields = dict(
        nsa_compress_block=args.nsa_block,
        nsa_compress_stride=args.nsa_stride,
        nsa_select_block=args.nsa_select_block,
        nsa_select_count=args.nsa_select_count,
        nsa_window=args.nsa_window,
    )
    configs_ = configs(args.topk, args.index_heads, args.index_dim, max(args.contexts) + 1, nsa_fields)
    dense_config = configs_[0]
    dense, sparse, nsa = layers(*configs_)
    print(
        f"one MLA layer: hidden {dense_config.hidden_size}, {dense_config.num_attention_heads} heads, q_lora "
        f"{dense_config.q_lora_rank}, kv_lora {dense_config.kv_lora_rank}, nope/rope/v {dense_config.qk_nope_head_dim}/"
        f"{dense_config.qk_rope_head_dim}/{dense_config.v_head_dim}; indexer {args.index_heads} x {args.index_dim}, "
        f"k = {args.topk}; NSA l={args.nsa_block}, d={args.nsa_stride}, l'={args.nsa_select_block}, "
        f"n={args.nsa_select_count}, w={args.nsa_window}; absorbed form, float32, {torch.get_num_threads()} "
        "thread(s), batch 1"
    )
    check(dense, sparse, nsa, args.topk)

    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, dense_config.hidden_size, generator=g)
    cases, nbytes = {}, {}
    for length in args.contexts:
        dense_cache, sparse_cache, nsa_cache = build_caches(sparse, nsa, length, seed=length)
        cases[length] = {
            "dense": decoder(dense, dense_cache, x, length, args.steps),
            "dsa": decoder(sparse, sparse_cache, x, length, args.steps),
            "indexer": indexer_only(sparse, sparse_cache, x, length, args.steps),
            "nsa": decoder(nsa, nsa_cache, x, length, args.steps),
        }
        nbytes[length] = (dense_cache.nbytes_per_token(), sparse_cache.nbytes_per_token(), nsa_cache.nbytes_per_token())
    medians = interleaved_medians(cases, args.rounds)

    print()
    print(
        "| T | dense ms/token | DSA ms/token | DSA/dense | DSA's indexer ms | DSA - indexer ms | NSA ms/token "
        "| NSA/dense | cache bytes/token dense / DSA / NSA | cache MiB at T dense / DSA / NSA |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.contexts:
        d, s, i, n = (medians[length, v] / args.steps * 1e3 for v in ("dense", "dsa", "indexer", "nsa"))
        sizes = nbytes[length]
        print(
            f"| {length:,} | {d:.3f} | {s:.3f} | {s / d:.2f} | {i:.3f} | {s - i:.3f} | {n:.3f} | {n / d:.2f} "
            f"| {' / '.join(map(str, sizes))} | {' / '.join(f'{b * length / 2**20:.1f}' for b in sizes)} |"
        )
    print()
    for variant, name in (("dsa", "DSA"), ("nsa", "NSA")):
        print(crossover(medians, args.contexts, variant, name))
        spread = statistics.median(medians[c, variant] / medians[c, "dense"] for c in args.contexts)
        print(f"median {name}/dense over the contexts: {spread:.2f}")
    print(f"run took {time.perf_counter() - start:.0f} s")


def crossover(medians: dict, contexts: list[int], variant: str, name: str) -> str:
    """The first context from which `variant` stays faster than dense, in words."""
    first = None
    for length in contexts:
        faster = medians[length, variant] < medians[length, "dense"]
        first = (first or length) if faster else None
    if first is None:
        return f"{name} crossover: not reached ({name} not faster than dense at T = {contexts[-1]:,})"
    if first == contexts[0]:
        return f"{name} crossover: {name} already faster at the shortest context measured, T = {first:,}"
    before = contexts[contexts.index(first) - 1]
    return f"{name} crossover: between T = {before:,} and T = {first:,} ({name} faster from T = {first:,} on)"


if __name__ == "__main__":
    main()
