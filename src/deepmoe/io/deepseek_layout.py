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
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from deepmoe.io.checkpoint import read_json
from deepmoe.io.files import write_json
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


def to_deepseek(hf_name: str) -> str:
    """The DeepSeek name of a (non-MTP) HF tensor name, e.g. `model.layers.0.self_attn.q_a_proj.weight_scale_inv`
    -> `layers.0.attn.wq_a.scale`."""
    parts = hf_name.removeprefix("model.").split(".")
    parts = [_PARTS.get(p, p) for p in parts]
    if len(parts) < 2 or parts[-2] not in MODULES:
        raise ValueError(f"tensor {hf_name!r} has no name in DeepSeek's inference layout")
    parts[-2] = MODULES[parts[-2]][0]
    parts[-1] = _TENSOR.get(parts[-1], parts[-1])
    return ".".join(parts)


def to_hf(ds_name: str) -> str:
    """The HF name of a DeepSeek tensor name (the inverse of `to_deepseek`)."""
    parts = ds_name.split(".")
    if len(parts) < 2 or parts[-2] not in _HF_MODULE:
        raise ValueError(f"tensor {ds_name!r} is not a name of DeepSeek's inference layout")
    parts[-2] = _HF_MODULE[parts[-2]]
    parts[-1] = _HF_TENSOR.get(parts[-1], parts[-1])
    parts = [_HF_PARTS.get(p, p) for p in parts]
    name = ".".join(parts)
    return name if name.startswith("lm_head.") else "model." + name


def split_dim(ds_name: str) -> int | None:
    """The dimension along which the ranks hold slices of this tensor (None: whole on every rank, or an expert's)."""
    if _EXPERT.search(ds_name):
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


def model_args(hf_config: Mapping[str, Any], fp8: bool) -> dict[str, Any]:
    """DeepSeek's ModelArgs JSON (inference/configs/*.json field names) for a HF DeepSeek config."""
    get = hf_config.get
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


def is_deepseek_dir(directory: Path) -> bool:
    return directory.is_dir() and any(SHARD.fullmatch(p.name) for p in directory.iterdir())


def write_deepseek(
    tensors: Mapping[str, PendingTensor], hf_config: dict[str, Any], directory: Path, mp: int,
    block: tuple[int, int] = (128, 128),
) -> dict[str, Any]:  # fmt: skip
    """Write HF-named pending `tensors` into `directory` in DeepSeek's layout with `mp` rank shards (each
    source tensor made once per rank that holds part of it), plus config.json (ModelArgs) and hf_config.json.
    Returns the ModelArgs written. Raises ValueError where a tensor cannot be split `mp` ways."""
    layers = int(hf_config.get("num_hidden_layers", 0))
    experts = int(hf_config.get("n_routed_experts") or 0)
    if mp < 1 or (experts and experts % mp):
        raise ValueError(f"--model-parallel {mp}: must divide the {experts} routed experts")
    mtp = {n: t for n, t in tensors.items() if is_mtp(n, layers)}
    ranks: list[dict[str, PendingTensor]] = [{} for _ in range(mp)]
    for hf, t in tensors.items():
        if hf in mtp:
            continue
        ds = to_deepseek(hf)
        dim, home = split_dim(ds), owner(ds, experts, mp)
        if dim is not None and t.shape[dim] % mp:
            raise ValueError(f"tensor {hf!r} of shape {list(t.shape)} cannot be split {mp} ways along dim {dim}")
        if dim is not None and mp > 1 and ds.endswith(".scale"):
            weight = tensors[hf.removesuffix("_scale_inv")]
            if (weight.shape[dim] // mp) % block[dim]:
                part = weight.shape[dim] // mp
                raise ValueError(f"tensor {hf!r}: a rank's {part} rows/columns of its FP8 weight are not whole "
                                 f"{block[dim]}-blocks, so its scales cannot be split {mp} ways")  # fmt: skip
        shape = tuple(n // mp if d == dim else n for d, n in enumerate(t.shape))
        for r in range(mp) if home is None else (home,):
            make = lambda t=t, dim=dim, r=r: rank_slice(t.make(), dim, r, mp).contiguous()  # noqa: E731
            ranks[r][ds] = PendingTensor(t.dtype, shape, make)
    for r, state in enumerate(ranks):
        write_file(directory / shard_name(r, mp), state)
    if mtp:
        logger.warning("DeepSeek's inference code has no MTP module: its %d tensors are kept whole under their HF "
                       "names in %s (not loaded by DeepSeek's demo; read back by `deepmoe convert --to hf`)",
                       len(mtp), MTP_NAME)  # fmt: skip
        write_file(directory / MTP_NAME, mtp)
    fp8 = any(t.dtype == torch.float8_e4m3fn for t in tensors.values())
    args = model_args(hf_config, fp8)
    write_json(directory / CONFIG_NAME, args)
    write_json(directory / HF_CONFIG_NAME, hf_config)
    return args


class DeepSeekCheckpoint:
    """A DeepSeek directory read as HF-named tensors: the ranks' slices joined, each expert from its rank,
    the MTP tensors from mtp.safetensors. `hf_config` is its hf_config.json."""

    def __init__(self, directory: Path):
        self.directory = directory
        shards = {int(m.group(1)): (int(m.group(2)), p) for p in directory.iterdir() if (m := SHARD.fullmatch(p.name))}
        sizes = {n for n, _ in shards.values()}
        if len(sizes) != 1 or sorted(shards) != list(range(next(iter(sizes)))):
            found = ", ".join(sorted(p.name for _, p in shards.values()))
            raise CheckpointError(f"{directory}: needs model{{r}}-mp{{N}}.safetensors for r = 0..N-1, has {found}")
        self.mp = sizes.pop()
        if not (directory / HF_CONFIG_NAME).is_file():
            raise CheckpointError(f"{directory}: has no {HF_CONFIG_NAME} (the Hugging Face config kept by "
                                  "`deepmoe convert --to deepseek`), so its HF config is unknown")  # fmt: skip
        self.hf_config = read_json(directory / HF_CONFIG_NAME, HF_CONFIG_NAME)
        self._files = [safe_open(str(shards[r][1]), framework="pt", device="cpu") for r in range(self.mp)]
        self._where: dict[str, tuple[str, list[int]]] = {}  # hf name -> (its name in the file, the files with it)
        for r, f in enumerate(self._files):
            for ds in f.keys():
                try:
                    hf = to_hf(ds)
                except ValueError as err:
                    raise CheckpointError(f"{shards[r][1]}: {err}") from None
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
        return None if len(files) == 1 or ds == name else split_dim(ds)

    def shape(self, name: str) -> tuple[int, ...]:
        ds, files = self._where[name]
        shape = list(self._files[files[0]].get_slice(ds).get_shape())
        dim = self._dim(name)
        if dim is not None:
            shape[dim] *= len(files)
        return tuple(shape)

    def dtype(self, name: str) -> torch.dtype:
        ds, files = self._where[name]
        return DTYPES[self._files[files[0]].get_slice(ds).get_dtype()]

    def get(self, name: str) -> Tensor:
        ds, files = self._where[name]
        dim = self._dim(name)
        if dim is None:
            return self._files[files[0]].get_tensor(ds)
        if files != list(range(self.mp)):
            raise CheckpointError(f"{self.directory}: tensor {ds!r} is on ranks {files}, expected all {self.mp}")
        return torch.cat([self._files[r].get_tensor(ds) for r in files], dim=dim)

    def close(self) -> None:
        self._files.clear()
