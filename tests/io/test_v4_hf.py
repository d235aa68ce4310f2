"""DeepSeek-V4 against transformers' DeepseekV4ForCausalLM: logits within 1e-4 (relative, float32) and equal greedy
tokens in both directions (deepmoe save -> transformers load, transformers save -> deepmoe load), on tiny configs
with every attention kind (sliding, CSA with its indexer, HCA), hash-routed and learned MoE layers, and YaRN on the
compressed layers. The prompts (40 tokens) close 10 CSA windows of 4 and 5 HCA windows of 8, and the indexer
keeps 2 of up to 10 entries, so compression and selection change the logits (checked below)."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from safetensors import safe_open

from configs import V4_LAYERS, v4_config
from deepmoe.config import DeepSeekConfig
from deepmoe.io import config_from_hf, config_to_hf
from deepmoe.model import from_pretrained, save_pretrained
from deepmoe.model.attention import KVCache
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.generate import generate
from reference import randomise_parameters, transformers_model

pytestmark = [pytest.mark.cpu_only, pytest.mark.usefixtures("one_thread")]
transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}
CASES = {
    "every-layer-kind": v4_config(),
    "yarn-4-streams": v4_config(
        rope_scaling=YARN, hc_mult=4, index_topk=3, sliding_window=6, mlp_layer_types=["hash_moe", "moe", "moe", "moe"]
    ),  # fmt: skip
}


def _hash_table(model, seed: int) -> None:
    """Random distinct experts per token id in every hash-routed layer (transformers initialises the table to 0)."""
    generator = torch.Generator().manual_seed(seed)
    for name, table in model.named_buffers():
        if name.endswith("tid2eid"):
            n = model.config.n_routed_experts
            table.copy_(torch.rand(table.shape[0], n, generator=generator).argsort(-1)[:, : table.shape[1]])


def _model(config: DeepSeekConfig, seed: int) -> DeepSeekForCausalLM:
    model = DeepSeekForCausalLM(config).eval()
    randomise_parameters(model, seed)
    return model


def _hf_model(config: DeepSeekConfig, seed: int):
    written = config_to_hf(config)
    written.pop("architectures")
    hf_config = transformers.AutoConfig.for_model(**written)
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    assert type(model).__name__ == "DeepseekV4ForCausalLM"
    randomise_parameters(model, seed)
    _hash_table(model, seed)
    return model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_checkpoint_gives_transformers_logits(case, tmp_path):
    hf_model = _hf_model(CASES[case], seed=1)
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    assert model.config == CASES[case]
    ids = _ids(2, 40, seed=0)
    assert _relative_error(_logits(model, ids), _logits(hf_model, ids)) < 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_deepmoe_checkpoint_gives_the_same_logits_in_transformers(case, tmp_path):
    """With an MTP module, saved as DeepSeek's `mtp.0.*` tensors: transformers skips them, deepmoe reads them back."""
    model = _model(dataclasses.replace(CASES[case], num_nextn_predict_layers=1), seed=2)
    save_pretrained(model, tmp_path / "ours")
    hf_model = transformers_model(tmp_path / "ours")
    assert type(hf_model).__name__ == "DeepseekV4ForCausalLM"
    ids = _ids(2, 40, seed=1)
    assert _relative_error(_logits(model, ids), _logits(hf_model, ids)) < 1e-4
    for mmap in (False, True):  # memory-mapped loading builds each layer's experts when it runs
        assert torch.equal(_logits(from_pretrained(tmp_path / "ours", mmap=mmap), ids), _logits(model, ids))
    with torch.no_grad():
        mtp = from_pretrained(tmp_path / "ours")(ids, output_mtp=True).mtp_logits[0]
        assert torch.equal(mtp, model(ids, output_mtp=True).mtp_logits[0])
    hf_model.save_pretrained(tmp_path / "theirs")  # the same tensor names on disk as transformers writes
    names = []
    for directory in ("ours", "theirs"):
        with safe_open(tmp_path / directory / "model.safetensors", "pt") as f:
            names.append(set(f.keys()))
    mtp = {name for name in names[0] if name.startswith("mtp.0.")}
    assert names[0] - mtp == names[1]
    assert "model.layers.1.attn.indexer.compressor.ape" in names[0] and "model.layers.0.ffn.gate.tid2eid" in names[0]
    assert {"mtp.0.e_proj.weight", "mtp.0.hc_head_fn", "mtp.0.attn.wq_a.weight", "mtp.0.ffn.gate.bias"} <= mtp


def test_cached_greedy_decoding_equals_uncached_and_transformers(tmp_path):
    """20 prompt tokens, then 12 decoded one at a time: the steps close CSA and HCA windows, the window slides."""
    hf_model = _hf_model(CASES["yarn-4-streams"], seed=3)
    hf_model.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    prompt = _ids(2, 20, seed=2)
    cached = generate(model, prompt, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(cached, generate(model, prompt, max_new_tokens=12, eos_token_id=[], use_cache=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(cached, theirs)


def test_cached_steps_equal_the_full_forward_and_the_cache_keeps_the_window_and_the_entries():
    """Prefill 9 tokens, then 21 one at a time: each step's logits are the full forward's. The cache then holds
    the last sliding_window − 1 = 7 kv per layer, and 30 // 4 CSA entries and 30 // 8 HCA entries."""
    model = _model(v4_config(), seed=5)
    ids = _ids(2, 30, seed=4)
    cache = KVCache()
    with torch.no_grad():
        steps = [model(ids[:, :9], past_key_values=cache).logits]
        steps += [model(ids[:, i : i + 1], past_key_values=cache).logits for i in range(9, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 30 and all(cache.states[i]["window"].shape == (2, 7, 16) for i in range(4))
    assert cache.states[1]["compressor"].entries.shape == (2, 7, 16) and cache.states[1]["indexer"].closed == 7
    assert cache.states[2]["compressor"].entries.shape == (2, 3, 16) and "compressor" not in cache.states[0]


def test_compression_and_selection_change_the_logits():
    """The same weights without the compressed entries (every layer sliding), and with an indexer keeping every
    entry: the logits of the tokens before the first window closes (t < 3) are unchanged, the later ones are not.
    (One RoPE base for all layers, so that only the compressed entries tell the layer kinds apart.)"""
    config = v4_config(compress_rope_theta=10000.0)
    model = _model(config, seed=4)
    state = model.state_dict()
    sliding = DeepSeekForCausalLM(dataclasses.replace(config, layer_types=["sliding_attention"] * 4)).eval()
    sliding.load_state_dict({k: v for k, v in state.items() if ".compressor." not in k})
    everything = DeepSeekForCausalLM(dataclasses.replace(config, index_topk=64)).eval()
    everything.load_state_dict(state)
    ids = _ids(2, 40, seed=3)
    logits = _logits(model, ids)
    for other in (sliding, everything):
        changed = _logits(other, ids)
        torch.testing.assert_close(changed[:, :3], logits[:, :3], rtol=1e-5, atol=1e-5)
        assert _relative_error(changed[:, 3:], logits[:, 3:]) > 1e-2


def test_config_round_trips_and_transformers_reads_it():
    config = CASES["yarn-4-streams"]
    written = json.loads(json.dumps(config_to_hf(config)))
    assert written["architectures"] == ["DeepseekV4ForCausalLM"]
    assert config_from_hf(written) == config
    hf = transformers.AutoConfig.for_model(**{k: v for k, v in written.items() if k != "architectures"})
    assert hf.layer_types == V4_LAYERS and hf.qk_rope_head_dim == 8 and hf.head_dim == 16
    assert hf.rope_parameters["compress"]["rope_type"] == "yarn" and hf.rope_parameters["main"]["rope_theta"] == 1e4
    legacy = {**written, "compress_ratios": [0, 4, 128, 4], "num_hash_layers": 1}  # older configs' spelling
    del legacy["layer_types"], legacy["mlp_layer_types"]
    read = config_from_hf(legacy)
    assert read.layer_types == ["sliding_attention", *V4_LAYERS[1:3], V4_LAYERS[1]]
    assert read.mlp_layer_types == ["hash_moe", "moe", "moe", "moe"]


def test_bfloat16_load_casts_the_csa_indexer_head_like_the_rest(tmp_path):
    """V4's `attn.indexer.weights_proj` is not V3.2's float32-kept head: a bf16 load must run (it once stayed
    float32 and the first forward failed on mixed dtypes)."""
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(v4_config()).eval()
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.bfloat16)
    logits = loaded(torch.randint(0, model.config.vocab_size, (1, 24))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
