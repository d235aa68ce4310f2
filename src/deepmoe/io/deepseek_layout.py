"""DeepSeek's own inference layout (github deepseek-ai/DeepSeek-V3, `inference/convert.py` and `model.py`;
docs/design.md#m5-hugging-face-checkpoints), read and written tensor by tensor.

A DeepSeek directory holds `model{rank}-mp{N}.safetensors` for ranks 0..N-1 under DeepSeek's names, a
`config.json` in the form of its `ModelArgs` (`inference/configs/config_671B.json`: vocab_size, dim,
inter_dim, ...; `dtype` "fp8" or "bf16"), and beside it the source's Hugging Face config as
`hf_config.json`, which is what the way back reads (ModelArgs lacks e.g. the norm epsilon and the
routing method). Names (HF -> DeepSeek): `model.` dropped, `self_attn` -> `attn`, `mlp` -> `ffn`,
`weight_scale_inv` -> `scale`, `e_score_correction_bias` -> `bias`, and the module name by `MODULES`
(e.g. `q_a_proj` -> `wq_a`, `gate_proj` -> `w1`, `lm_head` -> `head`).

Shards: routed expert E lives only on rank E // (n_routed_experts / N); a module with a split dimension
in `MODULES` (0: rows, e.g. `wq_b`, `w1`, `embed`, `head`; 1: columns, `wo`, `w2`) gives rank r the r-th
of N equal slices of its weight and of its FP8 scale along that dimension; everything else (norms, `wq_a`,
`wkv_a`, the router `gate`) is on every rank whole.

DeepSeek's convert.py skips the MTP layer (`model.layers.61`) and its `Transformer` has no place for it, so
the MTP tensors (layers >= num_hidden_layers) are not put in the rank shards (its demo loads them strictly):
they are kept whole, under their HF names, in `mtp.safetensors` beside them, with a warning, and come back
from there on the way to HF.

DeepSeek-V3.2's lightning indexer (`inference/model.py` of deepseek-ai/DeepSeek-V3.2-Exp, whose convert.py maps
`wq_b`, `wk`, `k_norm`, `weights_proj` to themselves with no split) keeps its names: `layers.N.attn.indexer.*`, whole
on every rank.

DeepSeek-V4 (`model_type="deepseek_v4"`; docs/design.md#fp4-experts-and-deepseeks-v4-layout) names its tensors
as `V4_LAYER_TENSOR` and `V4_TOP` (DeepSeek-V4-Flash's `inference/model.py`). Its HF layout (what transformers'
`save_pretrained` writes and deepmoe reads, `deepmoe.io.hf_v4`) already uses these names under `model.`, except
`model.embed_tokens`, `model.norm`, `model.hc_head.hc_*`, the attention's `kv_norm` (written `norm`) and FP8 scales
(`weight_scale_inv`); its MTP modules are `mtp.{k}.*` in both, in the rank shards (as DeepSeek's V4 convert.py
puts them). V4 splits only `V4_SPLIT` across ranks (its convert.py: `embed`, `head`, `wq_b`, `wo_a`, `wo_b`,
`attn_sink`, `weights_proj`). Its routed experts may be FP4 (`deepmoe.io.fp4`: int8 [out, in/2] or
float4_e2m1fn_x2, with float8_e8m0fnu `.scale` [out, in/32]) and its FP8 weights may have ue8m0 128×128 scales;
`load_deepseek` dequantises both, and `write_deepseek(..., fp4_experts=True)` writes routed experts as FP4.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from deepmoe.config import DeepSeekConfig
from deepmoe.io.checkpoint import _dtype_from_config, assemble_state, read_json
from deepmoe.io.distributed import cast_dtype
from deepmoe.io.files import write_json
from deepmoe.io.fp4 import BLOCK as FP4_BLOCK
from deepmoe.io.fp4 import PACKED_DTYPES, dequantize_fp4, quantize_fp4
from deepmoe.io.fp8_blocks import FP8_DTYPES, SCALE_SUFFIX, dequantize_fp8
from deepmoe.io.hf import config_from_hf, expected_hf_shapes, mtp_copies
from deepmoe.io.safetensors_stream import DTYPES, CheckpointError, PendingTensor, write_file

logger = logging.getLogger(__name__)

MODULES: dict[str, tuple[str, int | None]] = {
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None), "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0), "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0), "o_proj": ("wo", 1), "gate": ("gate", None),
    "gate_proj": ("w1", 0), "down_proj": ("w2", 1), "up_proj": ("w3", 0), "norm": ("norm", None),
    "lm_head": ("head", 0),
}  # fmt: skip
"""HF module name -> (DeepSeek module name, the dimension split across model-parallel ranks or None)."""
_HF_MODULE = {ds: hf for hf, (ds, _) in MODULES.items()}
_SPLIT = dict(MODULES.values())
_TENSOR = {"weight_scale_inv": "scale", "e_score_correction_bias": "bias"}
_HF_TENSOR = {ds: hf for hf, ds in _TENSOR.items()}
_PARTS = {"self_attn": "attn", "mlp": "ffn"}
_HF_PARTS = {ds: hf for hf, ds in _PARTS.items()}
INDEXER_V32 = ("wq_b", "wk", "k_norm", "weights_proj")
"""DeepSeek-V3.2's indexer modules (`attn.indexer.*`): the same names in both layouts, whole on every rank."""

V4_TOP = {
    "model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight", "head.weight": "head.weight",
    "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}  # fmt: skip
"""DeepSeek-V4, the HF layout's tensors outside the layers -> DeepSeek's."""
_V4_BLOCK = (
    r"(attn_norm\.weight|ffn_norm\.weight|hc_(attn|ffn)_(fn|base|scale)"
    r"|attn\.(attn_sink|compressor\.ape|indexer\.compressor\.ape)"
    r"|attn\.(wq_a|q_norm|wq_b|wkv|kv_norm|wo_a|wo_b|compressor\.(wkv|wgate|norm)|indexer\.(wq_b|weights_proj)"
    r"|indexer\.compressor\.(wkv|wgate|norm))\.(weight|scale)"
    r"|ffn\.gate\.(weight|bias|tid2eid)|ffn\.(shared_experts|experts\.\d+)\.(w1|w2|w3)\.(weight|scale))"
)
V4_LAYER_TENSOR = re.compile(
    rf"layers\.\d+\.{_V4_BLOCK}"
    rf"|mtp\.\d+\.({_V4_BLOCK}|(e_proj|h_proj)\.(weight|scale)|(enorm|hnorm|norm)\.weight|hc_head_(fn|base|scale))"
)
"""The name of every tensor of a DeepSeek-V4 layer and MTP module (DeepSeek-V4-Flash `inference/model.py`: `Block`,
`Attention`, `Compressor`, `Indexer`, `Gate`, `Expert`, `MTPBlock`; a weight's FP8/FP4 scale is `.scale`)."""
V4_SPLIT = {"embed": 0, "head": 0, "attn.wq_b": 0, "attn.indexer.wq_b": 0, "attn.wo_a": 0, "attn.wo_b": 1,
            "attn.attn_sink": 0, "attn.indexer.weights_proj": 0}  # fmt: skip
"""DeepSeek-V4's model-parallel splits (DeepSeek module or tensor -> dimension); everything else is whole on every
rank, routed experts on their one rank."""
V4_MTP_PREFIX = "mtp."
_V4_HF_TOP = {ds: hf for hf, ds in V4_TOP.items()}
_V4_LAYER = re.compile(r"(?:layers|mtp)\.(\d+)\.(.+)")
TID2EID = ".gate.tid2eid"
_FILE_DTYPES = {**DTYPES, "F4": torch.float4_e2m1fn_x2}
"""The dtypes of DeepSeek's files: also F4, two e2m1 values per byte, whose safetensors shape counts values."""
CONFIG_NAME = "config.json"
HF_CONFIG_NAME = "hf_config.json"
MTP_NAME = "mtp.safetensors"
SHARD = re.compile(r"model(\d+)-mp(\d+)\.safetensors")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.")


def shard_name(rank: int, mp: int) -> str:
    return f"model{rank}-mp{mp}.safetensors"


def is_mtp(hf_name: str, num_hidden_layers: int) -> bool:
    """Whether an HF tensor belongs to an MTP module (`model.layers.{L + k}.*`), which has no DeepSeek name."""
    match = _LAYER.match(hf_name)
    return match is not None and int(match.group(1)) >= num_hidden_layers


def to_deepseek(hf_name: str, model_type: str = "deepseek_v3") -> str:
    """The DeepSeek name of a (non-MTP) HF tensor name, e.g. `model.layers.0.self_attn.q_a_proj.weight_scale_inv`
    -> `layers.0.attn.wq_a.scale`. ValueError for a name with no DeepSeek name."""
    if model_type == "deepseek_v4":
        return _to_deepseek_v4(hf_name)
    parts = hf_name.removeprefix("model.").split(".")
    parts = [_PARTS.get(p, p) for p in parts]
    if _is_v32_indexer(parts):
        parts[-1] = "scale" if parts[-1] == "weight_scale_inv" else parts[-1]
        return ".".join(parts)
    if len(parts) < 2 or parts[-2] not in MODULES:
        raise ValueError(f"tensor {hf_name!r} has no name in DeepSeek's inference layout")
    parts[-2] = MODULES[parts[-2]][0]
    parts[-1] = _TENSOR.get(parts[-1], parts[-1])
    return ".".join(parts)


def to_hf(ds_name: str, model_type: str = "deepseek_v3") -> str:
    """The HF name of a DeepSeek tensor name (the inverse of `to_deepseek`)."""
    if model_type == "deepseek_v4":
        return _to_hf_v4(ds_name)
    parts = ds_name.split(".")
    if _is_v32_indexer(parts):
        parts[-1] = "weight_scale_inv" if parts[-1] == "scale" else parts[-1]
        return "model." + ".".join(_HF_PARTS.get(p, p) for p in parts)
    if len(parts) < 2 or parts[-2] not in _HF_MODULE:
        raise ValueError(f"tensor {ds_name!r} is not a name of DeepSeek's inference layout")
    parts[-2] = _HF_MODULE[parts[-2]]
    parts[-1] = _HF_TENSOR.get(parts[-1], parts[-1])
    parts = [_HF_PARTS.get(p, p) for p in parts]
    name = ".".join(parts)
    return name if name.startswith("lm_head.") else "model." + name


def _is_v32_indexer(parts: list[str]) -> bool:
    return len(parts) >= 3 and parts[-3] == "indexer" and parts[-2] in INDEXER_V32


def _to_deepseek_v4(hf_name: str) -> str:
    """The V4 HF layout (the names transformers writes: DeepSeek's, under `model.`, with the attention's `kv_norm`
    written `norm` and FP8 scales `weight_scale_inv`) -> DeepSeek's names."""
    if hf_name in V4_TOP:
        return V4_TOP[hf_name]
    name = re.sub(r"^((?:layers|mtp)\.\d+\.attn)\.norm\.", r"\1.kv_norm.", hf_name.removeprefix("model."))
    if name.endswith(".weight" + SCALE_SUFFIX):
        name = name.removesuffix("weight" + SCALE_SUFFIX) + "scale"
    if not V4_LAYER_TENSOR.fullmatch(name):
        raise ValueError(f"tensor {hf_name!r} has no name in DeepSeek-V4's inference layout")
    return name


def _to_hf_v4(ds_name: str) -> str:
    if ds_name in _V4_HF_TOP:
        return _V4_HF_TOP[ds_name]
    if not V4_LAYER_TENSOR.fullmatch(ds_name):
        raise ValueError(f"tensor {ds_name!r} is not a name of DeepSeek-V4's inference layout")
    name = re.sub(r"^((?:layers|mtp)\.\d+\.attn)\.kv_norm\.", r"\1.norm.", ds_name)
    if name.endswith(".scale"):
        name = name.removesuffix("scale") + "weight" + SCALE_SUFFIX
    return name if name.startswith(V4_MTP_PREFIX) else "model." + name  # MTP: `mtp.{k}.*` in both layouts


def keeps_float32_v4(hf_name: str) -> bool:
    """Whether a V4 tensor stays float32 whatever the model's dtype: those DeepSeek-V4's inference code holds in
    float32 (`Block`'s and `Transformer`'s hyper-connection tensors `hc_*`, `Attention.attn_sink`, the compressors'
    `ape`, `Gate.bias`), as deepmoe's V4 modules do. The norms, which that code also computes in float32, are
    stored in bfloat16 in DeepSeek's checkpoint and follow the model's dtype."""
    parts = hf_name.split(".")
    return parts[-1].startswith("hc_") or parts[-1] in ("attn_sink", "ape", "bias") or "hc_head" in parts


def split_dim(ds_name: str, model_type: str = "deepseek_v3") -> int | None:
    """The dimension along which the ranks hold slices of this tensor (None: whole on every rank, or an expert's)."""
    if _EXPERT.search(ds_name):
        return None
    if model_type == "deepseek_v4":
        layer = _V4_LAYER.fullmatch(ds_name)
        rest = layer[2] if layer else ds_name
        return V4_SPLIT.get(rest, V4_SPLIT.get(rest.rpartition(".")[0]))
    if _is_v32_indexer(ds_name.split(".")):
        return None
    return _SPLIT[ds_name.split(".")[-2]]


def owner(ds_name: str, n_routed_experts: int, mp: int) -> int | None:
    """The one rank holding a routed expert's tensor (expert E on rank E // (n_routed_experts / mp)); None
    for any other tensor (on every rank, whole or sliced)."""
    match = _EXPERT.search(ds_name)
    return None if match is None else int(match.group(1)) // (n_routed_experts // mp)


def rank_slice(t: Tensor, dim: int | None, rank: int, mp: int) -> Tensor:
    """Rank `rank`'s part of a tensor split `mp` ways along `dim` (DeepSeek's `narrow`), or all of it."""
    if dim is None:
        return t
    return t.narrow(dim, rank * (t.shape[dim] // mp), t.shape[dim] // mp)


def model_args(hf_config: Mapping[str, Any], fp8: bool, fp4: bool = False) -> dict[str, Any]:
    """DeepSeek's ModelArgs JSON (inference/configs/*.json field names) for a HF DeepSeek config; `fp8`: FP8 weights,
    `fp4`: FP4 routed experts (V4)."""
    get = hf_config.get
    if get("model_type") == "deepseek_v4":
        return _model_args_v4(hf_config, fp8, fp4)
    args: dict[str, Any] = {
        "vocab_size": get("vocab_size"), "dim": get("hidden_size"), "inter_dim": get("intermediate_size"),
        "moe_inter_dim": get("moe_intermediate_size"), "n_layers": get("num_hidden_layers"),
        "n_dense_layers": get("first_k_dense_replace"), "n_heads": get("num_attention_heads"),
        "n_routed_experts": get("n_routed_experts"), "n_shared_experts": get("n_shared_experts"),
        "n_activated_experts": get("num_experts_per_tok"), "n_expert_groups": get("n_group"),
        "n_limited_groups": get("topk_group"), "route_scale": get("routed_scaling_factor"),
        "score_func": get("scoring_func"), "q_lora_rank": get("q_lora_rank") or 0,
        "kv_lora_rank": get("kv_lora_rank"), "qk_nope_head_dim": get("qk_nope_head_dim"),
        "qk_rope_head_dim": get("qk_rope_head_dim"), "v_head_dim": get("v_head_dim"),
        "rope_theta": get("rope_theta"),
    }  # fmt: skip
    rope = get("rope_scaling") or {}
    if rope.get("type", rope.get("rope_type")) == "yarn":
        args |= {"original_seq_len": rope.get("original_max_position_embeddings"), "rope_factor": rope.get("factor"),
                 "beta_fast": rope.get("beta_fast"), "beta_slow": rope.get("beta_slow"),
                 "mscale": rope.get("mscale")}  # fmt: skip
    args["dtype"] = "fp8" if fp8 else "bf16"
    return {k: v for k, v in args.items() if v is not None}


def _model_args_v4(hf_config: Mapping[str, Any], fp8: bool, fp4: bool) -> dict[str, Any]:
    """DeepSeek-V4's ModelArgs (DeepSeek-V4-Flash `inference/model.py`) for a HF deepseek_v4 config."""
    get = hf_config.get
    ratio = {"sliding_attention": 0, **(get("compress_rates") or {})}
    head_dim, partial = get("head_dim"), get("partial_rotary_factor")
    rope_dim = get("qk_rope_head_dim") or (int(head_dim * partial) if head_dim and partial else None)
    args: dict[str, Any] = {
        "vocab_size": get("vocab_size"), "dim": get("hidden_size"), "moe_inter_dim": get("moe_intermediate_size"),
        "n_layers": get("num_hidden_layers"), "n_hash_layers": (get("mlp_layer_types") or []).count("hash_moe"),
        "n_mtp_layers": get("num_nextn_predict_layers") or 0, "n_heads": get("num_attention_heads"),
        "n_routed_experts": get("n_routed_experts"), "n_shared_experts": get("n_shared_experts"),
        "n_activated_experts": get("num_experts_per_tok"), "score_func": get("scoring_func"),
        "route_scale": get("routed_scaling_factor"), "swiglu_limit": get("swiglu_limit"),
        "q_lora_rank": get("q_lora_rank"), "head_dim": head_dim, "rope_head_dim": rope_dim,
        "norm_eps": get("rms_norm_eps"), "o_groups": get("o_groups"), "o_lora_rank": get("o_lora_rank"),
        "window_size": get("sliding_window"), "compress_ratios": [ratio[t] for t in get("layer_types") or []],
        "compress_rope_theta": get("compress_rope_theta"), "rope_theta": get("rope_theta"),
        "index_n_heads": get("index_n_heads"), "index_head_dim": get("index_head_dim"),
        "index_topk": get("index_topk"), "hc_mult": get("hc_mult"), "hc_sinkhorn_iters": get("hc_sinkhorn_iters"),
        "hc_eps": get("hc_eps"), "dtype": "fp8" if fp8 else "bf16",
    }  # fmt: skip
    rope = get("rope_scaling") or (get("rope_parameters") or {}).get("compress") or {}
    if rope.get("type", rope.get("rope_type")) == "yarn":
        args |= {"original_seq_len": rope.get("original_max_position_embeddings"), "rope_factor": rope.get("factor"),
                 "beta_fast": rope.get("beta_fast"), "beta_slow": rope.get("beta_slow")}  # fmt: skip
    if fp4:
        args |= {"expert_dtype": "fp4", "scale_fmt": "ue8m0"}
    return {k: v for k, v in args.items() if v is not None}


def is_deepseek_dir(directory: Path) -> bool:
    """A directory of DeepSeek's rank shards, or DeepSeek-V4 as DeepSeek releases it (`is_deepseek_release`)."""
    return directory.is_dir() and (
        any(SHARD.fullmatch(p.name) for p in directory.iterdir()) or is_deepseek_release(directory)
    )


def _weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".safetensors")


def is_deepseek_release(directory: Path) -> bool:
    """A Hugging Face directory (a deepseek_v4 config.json) whose safetensors hold DeepSeek's own names, as
    deepseek-ai publishes DeepSeek-V4 (`embed.weight`, `layers.N.attn.wq_a.scale`, FP4 experts, `mtp.*`)."""
    if not (directory / CONFIG_NAME).is_file():
        return False
    try:
        if read_json(directory / CONFIG_NAME, CONFIG_NAME).get("model_type") != "deepseek_v4":
            return False
    except CheckpointError:
        return False
    for path in _weight_files(directory):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if "embed.weight" in f.keys():
                return True
    return False


def write_deepseek(
    tensors: Mapping[str, PendingTensor], hf_config: dict[str, Any], directory: Path, mp: int,
    block: tuple[int, int] = (128, 128), fp4_experts: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Write HF-named pending `tensors` into `directory` in DeepSeek's layout with `mp` rank shards (each
    source tensor made once per rank that holds part of it), plus config.json (ModelArgs) and hf_config.json.
    `fp4_experts`: the routed experts' weights written as FP4 (`deepmoe.io.fp4`: int8 [out, in/2] and a
    float8_e8m0fnu `.scale` [out, in/32], as DeepSeek-V4 ships them; those already FP4 as they are). Returns
    the ModelArgs written. Raises ValueError where a tensor cannot be split `mp` ways or an expert cannot be
    written as FP4."""
    model_type = hf_config.get("model_type", "deepseek_v3")
    layers = int(hf_config.get("num_hidden_layers", 0))
    experts = int(hf_config.get("n_routed_experts") or 0)
    if mp < 1 or (experts and experts % mp):
        raise ValueError(f"--model-parallel {mp}: must divide the {experts} routed experts")
    mtp = {n: t for n, t in tensors.items() if is_mtp(n, layers)}
    ranks: list[dict[str, PendingTensor]] = [{} for _ in range(mp)]
    for hf, t in tensors.items():
        if hf in mtp:
            continue
        ds = to_deepseek(hf, model_type)
        dim, home = split_dim(ds, model_type), owner(ds, experts, mp)
        if dim is not None and t.shape[dim] % mp:
            raise ValueError(f"tensor {hf!r} of shape {list(t.shape)} cannot be split {mp} ways along dim {dim}")
        if dim is not None and mp > 1 and ds.endswith(".scale"):
            weight = tensors[hf.removesuffix("_scale_inv")]
            if (weight.shape[dim] // mp) % block[dim]:
                part = weight.shape[dim] // mp
                raise ValueError(f"tensor {hf!r}: a rank's {part} rows/columns of its FP8 weight are not whole "
                                 f"{block[dim]}-blocks, so its scales cannot be split {mp} ways")  # fmt: skip
        quantise = fp4_experts and home is not None and ds.endswith(".weight") and t.dtype not in PACKED_DTYPES
        stored = _fp4_pair(hf, ds, t) if quantise else {ds: _deepseek_dtype(ds, t)}  # FP4 already: as it is
        for name, pending in stored.items():
            shape = tuple(n // mp if d == dim else n for d, n in enumerate(pending.shape))
            for r in range(mp) if home is None else (home,):
                make = lambda p=pending, dim=dim, r=r: rank_slice(p.make(), dim, r, mp).contiguous()  # noqa: E731
                ranks[r][name] = PendingTensor(pending.dtype, shape, make)
    for r, state in enumerate(ranks):
        write_file(directory / shard_name(r, mp), state)
    if mtp:
        logger.warning("DeepSeek's inference code has no MTP module: its %d tensors are kept whole under their HF "
                       "names in %s (not loaded by DeepSeek's demo; read back by `deepmoe convert --to hf`)",
                       len(mtp), MTP_NAME)  # fmt: skip
        write_file(directory / MTP_NAME, mtp)
    fp8 = any(t.dtype == torch.float8_e4m3fn for t in tensors.values())
    args = model_args(hf_config, fp8, fp4=fp4_experts)
    write_json(directory / CONFIG_NAME, args)
    write_json(directory / HF_CONFIG_NAME, hf_config)
    return args


def _deepseek_dtype(ds: str, t: PendingTensor) -> PendingTensor:
    """`t` as DeepSeek stores it: V4's hash table `tid2eid` as int32 (its `Gate`), everything else as it is."""
    if ds.endswith(TID2EID) and t.dtype != torch.int32:
        return PendingTensor(torch.int32, t.shape, lambda: t.make().to(torch.int32))
    return t


def _fp4_pair(hf: str, ds: str, t: PendingTensor) -> dict[str, PendingTensor]:
    """A routed expert's weight as FP4: {ds: packed int8 [out, in/2], its `.scale`: ue8m0 [out, in/32]}."""
    if not ds.endswith(".weight") or not t.dtype.is_floating_point or t.dtype in FP8_DTYPES:
        raise ValueError(f"tensor {hf!r} ({t.dtype}): only an unquantised routed expert weight can be written as FP4")
    if len(t.shape) != 2 or t.shape[1] % FP4_BLOCK:
        raise ValueError(f"tensor {hf!r} of shape {list(t.shape)}: FP4 needs [out, in] with in a multiple of "
                         f"{FP4_BLOCK}")  # fmt: skip
    quantised: list[tuple[Tensor, Tensor]] = []  # the pair, made once: the weight is written right before its scale

    def part(i: int) -> Tensor:
        if not quantised:
            quantised.append(quantize_fp4(t.make()))
        return quantised[0][i].view(torch.int8) if i == 0 else quantised.pop()[1]

    out, cols = t.shape
    packed = PendingTensor(torch.int8, (out, cols // 2), lambda: part(0))
    return {
        ds: packed,
        ds.removesuffix("weight") + "scale": PendingTensor(
            torch.float8_e8m0fnu, (out, cols // FP4_BLOCK), lambda: part(1)
        ),
    }


class DeepSeekCheckpoint:
    """A DeepSeek directory read as HF-named tensors: the ranks' slices joined, each expert from its rank,
    the MTP tensors from mtp.safetensors, as stored (FP4 experts packed, FP8 weights with their scales; V4's
    `tid2eid` as int64, as HF's). `hf_config` is its hf_config.json; for DeepSeek-V4 as released
    (`is_deepseek_release`: one "rank", its safetensors files), its config.json."""

    def __init__(self, directory: Path):
        self.directory = directory
        shards = {int(m.group(1)): (int(m.group(2)), p) for p in directory.iterdir() if (m := SHARD.fullmatch(p.name))}
        if not shards and is_deepseek_release(directory):
            paths, self.mp, config_name = _weight_files(directory), 1, CONFIG_NAME
        else:
            sizes = {n for n, _ in shards.values()}
            if len(sizes) != 1 or sorted(shards) != list(range(next(iter(sizes)))):
                found = ", ".join(sorted(p.name for _, p in shards.values()))
                raise CheckpointError(f"{directory}: needs model{{r}}-mp{{N}}.safetensors for r = 0..N-1, has {found}")
            self.mp, config_name = sizes.pop(), HF_CONFIG_NAME
            paths = [shards[r][1] for r in range(self.mp)]
            if not (directory / HF_CONFIG_NAME).is_file():
                raise CheckpointError(f"{directory}: has no {HF_CONFIG_NAME} (the Hugging Face config kept by "
                                      "`deepmoe convert --to deepseek`), so its HF config is unknown")  # fmt: skip
        self.hf_config = read_json(directory / config_name, config_name)
        self.model_type = str(self.hf_config.get("model_type", "deepseek_v3"))
        self._files = [safe_open(str(path), framework="pt", device="cpu") for path in paths]
        self._where: dict[str, tuple[str, list[int]]] = {}  # hf name -> (its name in the file, the files with it)
        for r, f in enumerate(self._files):
            for ds in f.keys():
                try:
                    hf = to_hf(ds, self.model_type)
                except ValueError as err:
                    raise CheckpointError(f"{paths[r]}: {err}") from None
                self._where.setdefault(hf, (ds, []))[1].append(r)
        mtp = directory / MTP_NAME
        if mtp.is_file():
            self._files.append(safe_open(str(mtp), framework="pt", device="cpu"))
            for hf in self._files[-1].keys():
                self._where[hf] = (hf, [len(self._files) - 1])

    def names(self) -> list[str]:
        return list(self._where)

    def _dim(self, name: str) -> int | None:
        ds, files = self._where[name]
        return None if len(files) == 1 or files[0] >= self.mp else split_dim(ds, self.model_type)  # mtp file: whole

    def _stored_dtype(self, name: str) -> torch.dtype:
        ds, files = self._where[name]
        return _FILE_DTYPES[self._files[files[0]].get_slice(ds).get_dtype()]

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape `get` returns (a packed FP4 tensor: its bytes' shape, half the values per row)."""
        ds, files = self._where[name]
        shape = list(self._files[files[0]].get_slice(ds).get_shape())
        if self._stored_dtype(name) == torch.float4_e2m1fn_x2:
            shape[-1] //= 2  # safetensors counts F4 values, torch two per element
        dim = self._dim(name)
        if dim is not None:
            shape[dim] *= len(files)
        return tuple(shape)

    def dtype(self, name: str) -> torch.dtype:
        return torch.int64 if name.endswith(TID2EID) else self._stored_dtype(name)

    def get(self, name: str) -> Tensor:
        ds, files = self._where[name]
        dim = self._dim(name)
        if dim is None:
            t = self._files[files[0]].get_tensor(ds)
            return t.long() if name.endswith(TID2EID) else t
        if files != list(range(self.mp)):
            raise CheckpointError(f"{self.directory}: tensor {ds!r} is on ranks {files}, expected all {self.mp}")
        return torch.cat([self._files[r].get_tensor(ds) for r in files], dim=dim)

    def close(self) -> None:
        self._files.clear()


def dequantize_weight(
    weight: Tensor, scale: Tensor, block: tuple[int, int], dtype: torch.dtype
) -> Tensor:  # fmt: skip
    """A stored quantised weight in `dtype`: FP4 (`weight` packed, `scale` ue8m0 per 32 values of a row) or FP8
    (`scale` per `block`, float32 or ue8m0). ValueError for any other weight or a scale of the wrong shape."""
    if weight.dtype in PACKED_DTYPES:
        return dequantize_fp4(weight, scale, dtype=dtype)
    if weight.dtype in FP8_DTYPES:
        return dequantize_fp8(weight, scale, block, dtype)
    raise ValueError(f"has a scale, but is {weight.dtype}: neither packed FP4 nor FP8")


def load_deepseek(directory: Path, dtype: torch.dtype | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(hf_config, HF-named tensors) of a DeepSeek-layout directory, every quantised weight dequantised: FP4 routed
    experts and FP8 block-scaled weights (blocks of the config's `weight_block_size`, 128×128 by default) become
    `dtype` (None: the config's torch_dtype, else bfloat16); the other floating tensors become `dtype` (None: as
    stored), except those kept in float32 (`cast_dtype`'s; V4's: `keeps_float32_v4`). CheckpointError naming the
    directory and tensor for a weight that cannot be dequantised."""
    ckpt = DeepSeekCheckpoint(Path(directory))
    try:
        config = ckpt.hf_config
        block = tuple((config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))
        dequantised = dtype or _dtype_from_config(config) or torch.bfloat16
        names = set(ckpt.names())
        state: dict[str, Tensor] = {}
        for name in ckpt.names():
            if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in names:
                continue
            t = ckpt.get(name)
            if name + SCALE_SUFFIX in names:
                try:
                    t = dequantize_weight(t, ckpt.get(name + SCALE_SUFFIX), block, dequantised)  # type: ignore[arg-type]
                except ValueError as err:
                    raise CheckpointError(f"{directory}: tensor {name!r}: {err}") from None
            if ckpt.model_type == "deepseek_v4" and t.is_floating_point():
                state[name] = t.to(torch.float32 if keeps_float32_v4(name) else dtype or t.dtype)
            else:
                state[name] = t.to(cast_dtype(name, t.dtype, dtype))
        return config, state
    finally:
        ckpt.close()


def load_deepseek_checkpoint(
    directory: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[DeepSeekConfig, dict[str, Tensor]]:  # fmt: skip
    """(config, deepmoe state dict) of a DeepSeek-layout directory: `load_deepseek`'s dequantised tensors, checked
    against its hf_config.json and stacked as `load_checkpoint` stacks a HF checkpoint's. CheckpointError naming the
    directory for a config it cannot read or tensors that do not match it."""
    directory = Path(directory)
    hf_config, tensors = load_deepseek(directory, dtype)
    try:
        config = config_from_hf(hf_config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{directory}: its HF config: {err}") from None
    if config.model_type == "deepseek_v4":
        config, tensors = _v4_mtp(directory, config, tensors)
    expected = expected_hf_shapes(config, fused_layers=set())
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected and n not in mtp_copies(config)]
    if missing or unexpected:
        raise CheckpointError(f"{directory}: does not match its HF config: missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}")  # fmt: skip
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{directory}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                                  f"its HF config implies {list(shape)}")  # fmt: skip
    return config, assemble_state(config, tensors.__getitem__, tensors)


def _v4_mtp(
    directory: Path, config: DeepSeekConfig, tensors: dict[str, Tensor]
) -> tuple[DeepSeekConfig, dict[str, Tensor]]:  # fmt: skip
    """DeepSeek's V4 checkpoints hold MTP modules (`mtp.{k}.*`): a config without them leaves them unread, and a
    config with them over a checkpoint without them loads without them, each with a warning."""
    mtp = [n for n in tensors if n.startswith(V4_MTP_PREFIX)]
    if mtp and not config.num_nextn_predict_layers:
        logger.warning("%s: its config has no MTP module (num_nextn_predict_layers=0): its %d MTP tensors (mtp.*) "
                       "are not read", directory, len(mtp))  # fmt: skip
        return config, {n: t for n, t in tensors.items() if not n.startswith(V4_MTP_PREFIX)}
    if config.num_nextn_predict_layers and not mtp:
        logger.warning("%s: num_nextn_predict_layers=%d, but it has no MTP tensors (mtp.*): loading without the "
                       "multi-token-prediction modules", directory, config.num_nextn_predict_layers)  # fmt: skip
        return dataclasses.replace(config, num_nextn_predict_layers=0), tensors
    return config, tensors
