"""DeepSeek's own layout for DeepSeek-V4 (and V3.2's indexer names): names checked against DeepSeek's inference code
(written out by hand below) and transformers' own conversion of DeepSeek's names; FP4 routed experts written in
DeepSeek's layout and loaded back (dequantised) give the logits of their dequantised twin in transformers'
DeepseekV4ForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from configs import v4_config
from deepmoe.io.deepseek_layout import (
    DeepSeekCheckpoint,
    load_deepseek,
    model_args,
    split_dim,
    to_deepseek,
    to_hf,
    write_deepseek,
)
from deepmoe.io.fp4 import dequantize_fp4, quantize_fp4
from deepmoe.io.safetensors_stream import PendingTensor
from deepmoe.model import from_pretrained, save_pretrained
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.tools.convert import convert_checkpoint
from reference import randomise_parameters

pytestmark = pytest.mark.cpu_only  # checkpoint files

# DeepSeek-V3.2-Exp inference/convert.py maps the indexer's modules to themselves, whole on every rank
PUBLISHED_V32 = {
    "model.layers.0.self_attn.indexer.wq_b.weight": "layers.0.attn.indexer.wq_b.weight",
    "model.layers.0.self_attn.indexer.wq_b.weight_scale_inv": "layers.0.attn.indexer.wq_b.scale",
    "model.layers.0.self_attn.indexer.wk.weight": "layers.0.attn.indexer.wk.weight",
    "model.layers.0.self_attn.indexer.k_norm.weight": "layers.0.attn.indexer.k_norm.weight",
    "model.layers.0.self_attn.indexer.k_norm.bias": "layers.0.attn.indexer.k_norm.bias",
    "model.layers.0.self_attn.indexer.weights_proj.weight": "layers.0.attn.indexer.weights_proj.weight",
}

# The V4 HF layout (names transformers writes) -> (DeepSeek-V4-Flash inference/model.py's name, its convert.py split)
PUBLISHED_V4 = {
    "model.embed_tokens.weight": ("embed.weight", 0),
    "head.weight": ("head.weight", 0),
    "model.norm.weight": ("norm.weight", None),
    "model.hc_head.hc_fn": ("hc_head_fn", None),
    "model.layers.1.hc_attn_base": ("layers.1.hc_attn_base", None),
    "model.layers.1.hc_ffn_scale": ("layers.1.hc_ffn_scale", None),
    "model.layers.1.attn_norm.weight": ("layers.1.attn_norm.weight", None),
    "model.layers.1.attn.attn_sink": ("layers.1.attn.attn_sink", 0),
    "model.layers.1.attn.wq_a.weight": ("layers.1.attn.wq_a.weight", None),
    "model.layers.1.attn.wq_b.weight_scale_inv": ("layers.1.attn.wq_b.scale", 0),
    "model.layers.1.attn.norm.weight": ("layers.1.attn.kv_norm.weight", None),
    "model.layers.1.attn.wo_a.weight": ("layers.1.attn.wo_a.weight", 0),
    "model.layers.1.attn.wo_b.weight": ("layers.1.attn.wo_b.weight", 1),
    "model.layers.1.attn.compressor.ape": ("layers.1.attn.compressor.ape", None),
    "model.layers.1.attn.compressor.norm.weight": ("layers.1.attn.compressor.norm.weight", None),
    "model.layers.1.attn.indexer.wq_b.weight": ("layers.1.attn.indexer.wq_b.weight", 0),
    "model.layers.1.attn.indexer.weights_proj.weight": ("layers.1.attn.indexer.weights_proj.weight", 0),
    "model.layers.1.attn.indexer.compressor.wgate.weight": ("layers.1.attn.indexer.compressor.wgate.weight", None),
    "model.layers.0.ffn.gate.tid2eid": ("layers.0.ffn.gate.tid2eid", None),
    "model.layers.1.ffn.gate.bias": ("layers.1.ffn.gate.bias", None),
    "model.layers.1.ffn.experts.3.w2.weight_scale_inv": ("layers.1.ffn.experts.3.w2.scale", None),
    "model.layers.1.ffn.shared_experts.w1.weight": ("layers.1.ffn.shared_experts.w1.weight", None),
    # an MTP module (MTPBlock): its own tensors, and its block's under mtp.{k}. in both layouts
    "mtp.0.e_proj.weight": ("mtp.0.e_proj.weight", None),
    "mtp.0.hnorm.weight": ("mtp.0.hnorm.weight", None),
    "mtp.0.norm.weight": ("mtp.0.norm.weight", None),
    "mtp.0.hc_head_fn": ("mtp.0.hc_head_fn", None),
    "mtp.0.attn.norm.weight": ("mtp.0.attn.kv_norm.weight", None),
    "mtp.0.attn.wq_b.weight": ("mtp.0.attn.wq_b.weight", 0),
    "mtp.0.ffn.experts.2.w3.weight_scale_inv": ("mtp.0.ffn.experts.2.w3.scale", None),
}

V4_CONFIG = dict(
    vocab_size=64, hidden_size=32, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, head_dim=32,
    q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1, o_groups=2, o_lora_rank=8,
    index_n_heads=2, index_head_dim=16, index_topk=2, sliding_window=4, hc_mult=2, hc_sinkhorn_iters=3,
    partial_rotary_factor=0.25, max_position_embeddings=64,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"],
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
)  # fmt: skip
ROUTED = (".w1.weight", ".w2.weight", ".w3.weight")


def is_routed_expert(name: str) -> bool:
    return ".ffn.experts." in name and name.endswith(ROUTED)


@pytest.mark.parametrize("hf", list(PUBLISHED_V32))
def test_v32_indexer_names_are_deepseeks(hf):
    assert to_deepseek(hf) == PUBLISHED_V32[hf]
    assert to_hf(PUBLISHED_V32[hf]) == hf
    assert split_dim(PUBLISHED_V32[hf]) is None
    # the main attention's wq_b is still q_b_proj, split by rows
    assert to_hf("layers.0.attn.wq_b.weight") == "model.layers.0.self_attn.q_b_proj.weight"


@pytest.mark.parametrize("hf", list(PUBLISHED_V4))
def test_v4_names_and_split_dims_are_deepseeks(hf):
    ds, dim = PUBLISHED_V4[hf]
    assert to_deepseek(hf, "deepseek_v4") == ds
    assert to_hf(ds, "deepseek_v4") == hf
    assert split_dim(ds, "deepseek_v4") == dim


def test_v4_unknown_names_are_refused():
    with pytest.raises(ValueError, match="no_such"):
        to_deepseek("model.layers.0.attn.no_such.weight", "deepseek_v4")
    with pytest.raises(ValueError, match="wkv_a"):
        to_hf("layers.0.attn.wkv_a.weight", "deepseek_v4")  # a V3 name


@pytest.fixture(scope="module")
def v4_source(tmp_path_factory):
    """transformers' tiny DeepseekV4ForCausalLM with uneven random weights (and a random hash table), saved by
    transformers (the V4 HF layout); (its directory, its model)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(**V4_CONFIG)).eval()
    randomise_parameters(model, seed=1)
    with torch.no_grad():
        model.model.layers[0].mlp.gate.tid2eid.copy_(torch.randint(0, 4, (64, 2)))
    path = tmp_path_factory.mktemp("v4") / "hf"
    model.save_pretrained(path)
    return path, model


def pending(tensors: dict[str, torch.Tensor]) -> dict[str, PendingTensor]:
    return {n: PendingTensor(t.dtype, tuple(t.shape), lambda t=t: t) for n, t in tensors.items()}


def transformers_renamed(name: str) -> str:
    """The in-memory name transformers' own conversion mapping gives a checkpoint name (renamings only)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    renamings = [t for t in get_checkpoint_conversion_mapping("deepseek_v4") if type(t) is WeightRenaming]
    renamed = apply_renamings(name.removeprefix("model."), renamings)
    return renamed if renamed.startswith("lm_head.") else "model." + renamed


def test_every_v4_tensor_transformers_writes_has_deepseeks_name(v4_source):
    path, model = v4_source
    names = list(load_file(path / "model.safetensors"))
    in_memory = set(model.state_dict())
    for hf in names:
        ds = to_deepseek(hf, "deepseek_v4")
        assert to_hf(ds, "deepseek_v4") == hf
        if not is_routed_expert(ds):  # transformers fuses these; the others it renames to one of its tensors
            assert transformers_renamed(ds) == transformers_renamed(hf) and transformers_renamed(ds) in in_memory


def test_v4_model_args_use_deepseeks_fields(v4_source):
    path, _ = v4_source
    config = json.loads((path / "config.json").read_text())
    args = model_args(config, fp8=False, fp4=True)
    fields = {"vocab_size", "dim", "moe_inter_dim", "n_layers", "n_hash_layers", "n_mtp_layers", "n_heads",
              "n_routed_experts", "n_shared_experts", "n_activated_experts", "score_func", "route_scale",
              "swiglu_limit", "q_lora_rank", "head_dim", "rope_head_dim", "norm_eps", "o_groups", "o_lora_rank",
              "window_size", "compress_ratios", "compress_rope_theta", "original_seq_len", "rope_theta", "rope_factor",
              "beta_fast", "beta_slow", "index_n_heads", "index_head_dim", "index_topk", "hc_mult",
              "hc_sinkhorn_iters", "hc_eps", "dtype", "scale_fmt", "expert_dtype", "scale_dtype"}  # fmt: skip
    assert set(args) <= fields  # DeepSeek-V4-Flash inference/model.py ModelArgs
    assert args["compress_ratios"] == [0, 4, 8] and args["n_hash_layers"] == 1 and args["rope_head_dim"] == 8
    assert (args["dim"], args["moe_inter_dim"], args["window_size"]) == (32, 32, 4)
    assert (args["dtype"], args["expert_dtype"], args["scale_fmt"]) == ("bf16", "fp4", "ue8m0")


def test_fp4_experts_in_deepseeks_layout_load_with_the_logits_of_their_dequantised_twin(v4_source, tmp_path):
    import transformers

    path, model = v4_source
    hf_config = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    (tmp_path / "fp4").mkdir()
    write_deepseek(pending(tensors), hf_config, tmp_path / "fp4", mp=2, fp4_experts=True)

    # as DeepSeek ships them: int8 packed values, float8_e8m0fnu scales per 32 of a row, on the expert's rank
    with safe_open(tmp_path / "fp4" / "model1-mp2.safetensors", "pt") as f:
        assert f.get_slice("layers.1.ffn.experts.3.w2.weight").get_dtype() == "I8"
        assert f.get_slice("layers.1.ffn.experts.3.w2.weight").get_shape() == [32, 16]
        assert f.get_slice("layers.1.ffn.experts.3.w2.scale").get_dtype() == "F8_E8M0"
        assert f.get_slice("layers.1.ffn.experts.3.w2.scale").get_shape() == [32, 1]
        assert "layers.1.ffn.experts.0.w2.weight" not in f.keys()
        assert f.get_slice("layers.0.ffn.gate.tid2eid").get_dtype() == "I32"

    # the twin: the same model with every routed expert dequantised (FP4 values are exact in bfloat16)
    twin = dict(tensors)
    for name, t in tensors.items():
        if is_routed_expert(name):
            twin[name] = dequantize_fp4(*quantize_fp4(t), dtype=torch.float32)
    assert not all(twin[n].equal(tensors[n]) for n in tensors if is_routed_expert(n))
    (tmp_path / "twin").mkdir()
    save_file(twin, tmp_path / "twin" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "twin" / "config.json").write_text(json.dumps(hf_config))

    config, loaded = load_deepseek(tmp_path / "fp4")  # the experts dequantised to the config's float32
    assert config == hf_config and loaded.keys() == tensors.keys()
    assert loaded["model.layers.0.ffn.gate.tid2eid"].equal(tensors["model.layers.0.ffn.gate.tid2eid"])
    (tmp_path / "loaded").mkdir()
    save_file(loaded, tmp_path / "loaded" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "loaded" / "config.json").write_text(json.dumps(hf_config))

    def logits(directory):
        quiet = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            m = transformers.DeepseekV4ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
        finally:
            transformers.logging.set_verbosity(quiet)
        with torch.no_grad():
            return m(torch.arange(3, 3 + 2 * 19).remainder(64).reshape(2, 19)).logits.float()

    fp4_logits = logits(tmp_path / "loaded")
    assert torch.equal(fp4_logits, logits(tmp_path / "twin"))
    assert not torch.allclose(fp4_logits, logits(path), atol=1e-3)  # the experts really were quantised


def test_deepseek_v4_checkpoint_reports_its_stored_tensors(v4_source, tmp_path):
    path, _ = v4_source
    hf_config = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    write_deepseek(pending(tensors), hf_config, tmp_path, mp=2, fp4_experts=True)
    ckpt = DeepSeekCheckpoint(tmp_path)
    try:
        expert = "model.layers.2.ffn.experts.1.w1.weight"
        assert ckpt.dtype(expert) == torch.int8 and ckpt.shape(expert) == (32, 16) == tuple(ckpt.get(expert).shape)
        scale = expert + "_scale_inv"
        assert ckpt.dtype(scale) == torch.float8_e8m0fnu and ckpt.shape(scale) == (32, 1)
        sink = "model.layers.1.attn.attn_sink"  # split over the two ranks, joined
        assert ckpt.shape(sink) == (4,) and ckpt.get(sink).equal(tensors[sink])
        assert ckpt.dtype("model.layers.0.ffn.gate.tid2eid") == torch.int64
    finally:
        ckpt.close()


def test_deepmoe_v4_from_deepseeks_layout_with_fp4_experts_is_its_dequantised_twin(tmp_path):
    # FP4 rows of whole 32-blocks; an MTP module (mtp.0.*, its experts FP4 too)
    config = v4_config(intermediate_size=32, moe={"moe_intermediate_size": 32}, num_nextn_predict_layers=1)
    model = DeepSeekForCausalLM(config).eval()
    randomise_parameters(model, seed=2)
    torch.manual_seed(2)
    for name, table in model.named_buffers():
        if name.endswith("tid2eid"):
            table.copy_(torch.randint(0, config.moe.n_routed_experts, table.shape))
    save_pretrained(model, tmp_path / "hf")
    (tmp_path / "ds").mkdir()
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    write_deepseek(pending(load_file(tmp_path / "hf" / "model.safetensors")), hf_config, tmp_path / "ds", mp=2,
                   fp4_experts=True)  # fmt: skip
    with safe_open(tmp_path / "ds" / "model1-mp2.safetensors", "pt") as f:  # MTP experts 2, 3 on rank 1, in FP4
        assert f.get_slice("mtp.0.ffn.experts.3.w2.weight").get_dtype() == "I8"
        assert f.get_slice("mtp.0.attn.kv_norm.weight").get_dtype() == "F32"
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        original = model(ids).logits
        for name, p in model.named_parameters():  # the twin: each expert's rows through FP4 and back
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(dequantize_fp4(*quantize_fp4(p), dtype=torch.float32))
        twin = model(ids).logits
        loaded = from_pretrained(tmp_path / "ds", dtype=torch.float32)
        assert torch.equal(loaded(ids).logits, twin)
        # in bfloat16: V4's float32 tensors (mHC maps, sinks, compressor biases, selection biases) stay float32
        twin_bf16 = model.to(torch.bfloat16)
        loaded = from_pretrained(tmp_path / "ds", dtype=torch.bfloat16)
        own, expected = loaded.state_dict(), twin_bf16.state_dict()
        assert all(own[n].dtype == t.dtype and torch.equal(own[n], t) for n, t in expected.items())
        assert {t.dtype for t in own.values() if t.is_floating_point()} == {torch.bfloat16, torch.float32}
        assert torch.equal(loaded(ids).logits, twin_bf16(ids).logits)
    assert not torch.allclose(twin, original, atol=1e-3)
    with pytest.raises(ValueError, match="without mmap"):
        from_pretrained(tmp_path / "ds", mmap=True)


def test_fp8_weights_with_ue8m0_block_scales_are_dequantised(v4_source, tmp_path):
    path, _ = v4_source
    hf_config = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.attn.wq_b.weight"  # [128, 16]: one 128x128 block (partial in its columns)
    q = (tensors[name] * 8).to(torch.float8_e4m3fn)
    tensors[name] = q
    tensors[name + "_scale_inv"] = torch.tensor([[0.125]]).to(torch.float8_e8m0fnu)  # 2^-3, as V4 stores scales
    write_deepseek(pending(tensors), hf_config, tmp_path, mp=1)
    with safe_open(tmp_path / "model0-mp1.safetensors", "pt") as f:
        assert f.get_slice("layers.1.attn.wq_b.scale").get_dtype() == "F8_E8M0"
    _, loaded = load_deepseek(tmp_path, dtype=torch.float32)
    assert torch.equal(loaded[name], q.float() / 8) and name + "_scale_inv" not in loaded


def test_deepseek_v4_as_released_loads(tmp_path, caplog):
    """DeepSeek's names in Hugging Face files beside a HF config.json (how deepseek-ai publishes V4): FP4 experts,
    `.scale`, `embed.weight`, and MTP tensors `mtp.*`, which deepmoe skips."""
    config = v4_config(intermediate_size=32, moe={"moe_intermediate_size": 32})
    model = DeepSeekForCausalLM(config).eval()
    randomise_parameters(model, seed=4)
    save_pretrained(model, tmp_path / "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "ds").mkdir()
    write_deepseek(pending(load_file(tmp_path / "hf" / "model.safetensors")), hf_config, tmp_path / "ds", mp=1,
                   fp4_experts=True)  # fmt: skip
    with safe_open(tmp_path / "ds" / "model0-mp1.safetensors", "pt") as f:
        release = {name: f.get_tensor(name) for name in f.keys()}
    (tmp_path / "release").mkdir()
    names = sorted(release)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        save_file({n: release[n] for n in part}, tmp_path / "release" / f"model-0000{i + 1}-of-00002.safetensors")
    (tmp_path / "release" / "config.json").write_text(json.dumps(hf_config))

    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), caplog.at_level("WARNING"):
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.copy_(dequantize_fp4(*quantize_fp4(p), dtype=torch.float32))
        convert_checkpoint(tmp_path / "release", tmp_path / "converted", "hf", dtype=torch.float32)
        assert torch.equal(from_pretrained(tmp_path / "converted")(ids).logits, model(ids).logits)
        # an MTP module the config does not have (num_nextn_predict_layers=0) is left unread, with a warning
        save_file({"mtp.0.e_proj.weight": torch.zeros(32, 32)}, tmp_path / "release" / "model-mtp.safetensors")
        assert torch.equal(from_pretrained(tmp_path / "release", dtype=torch.float32)(ids).logits, model(ids).logits)
    assert "its config has no MTP module" in caplog.text
