"""`deepmoe convert`: a DeepSeek checkpoint between the Hugging Face layout and DeepSeek's own inference layout
(`deepmoe.io.deepseek_layout`), and between FP8 and bf16/fp32 (docs/design.md#m5-hugging-face-checkpoints).

Streamed tensor by tensor (each is read, converted and written before the next), so the memory needed is
about the largest tensor. The dtype conversions are DeepSeek's:

- to bf16/fp32: every FP8 weight is dequantised with its `_scale_inv` (DeepSeek's `fp8_cast_bf16.py`), the
  scales and config.json's `quantization_config` are dropped, the other floating tensors are cast; the
  router's `e_score_correction_bias` and V3.2's `indexer.weights_proj` keep their dtype (float32 in V3);
- to fp8: the linear weights DeepSeek-V3 publishes in FP8 (attention q/kv/o projections, dense, shared and
  routed experts' gate/up/down projections; not the embedding, head, norms, router or MTP `eh_proj`) are
  quantised in 128x128 blocks (`quantize_fp8`), each with its `_scale_inv`, and the config gets DeepSeek's
  `quantization_config`; the other floating tensors become bf16 (the router bias stays as it is);
- none: the tensors are copied as stored, so HF -> deepseek -> HF gives the same names and the same bytes.

DeepSeek-V4's FP4 routed experts (`deepmoe.io.fp4`, docs/design.md#fp4-experts-and-deepseeks-v4-layout):
`fp4_experts=True` (`--fp4-experts`, with `--to deepseek`) writes the routed experts' weights as FP4; FP4 weights
read from a DeepSeek directory stay FP4 in another DeepSeek directory with no `--dtype`, and are otherwise
dequantised (to `--dtype`, or bf16), their scales dropped: deepmoe's HF layout holds no FP4.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deepmoe.io.checkpoint import (
    CONFIG_NAME,
    TOKENIZER_FILES,
    SafetensorsCheckpoint,
    checkpoint_dir,
    checkpoint_output,
    copy_tokenizer_files,
    parse_size,
    read_json,
    write_shards,
)
from deepmoe.io.deepseek_layout import (
    HF_CONFIG_NAME,
    MTP_NAME,
    SHARD,
    DeepSeekCheckpoint,
    is_deepseek_dir,
    write_deepseek,
)
from deepmoe.io.files import atomic_directory, claim_directory, refuse_overlap, visible_entries, write_json
from deepmoe.io.fp4 import PACKED_DTYPES, dequantize_fp4
from deepmoe.io.fp8_blocks import FP8_DTYPES, SCALE_SUFFIX, dequantize_fp8, quantize_fp8
from deepmoe.io.safetensors_stream import DTYPES, PendingTensor

CONVERT_RECORD = "convert.json"
LAYOUTS = ("hf", "deepseek")
FP8 = "fp8"
DTYPE_NAMES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": FP8}
QUANTISED = re.compile(
    r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight"
)
"""The HF weights DeepSeek-V3 stores in FP8."""
KEEP_DTYPE = ("e_score_correction_bias", "indexer.weights_proj.weight")
logger = logging.getLogger(__name__)


class _HFSource:
    """A HF checkpoint directory with the interface of `DeepSeekCheckpoint` (torch dtypes, `hf_config`)."""

    def __init__(self, directory: Path):
        self.ckpt = SafetensorsCheckpoint(directory)
        self.hf_config = read_json(directory / CONFIG_NAME, CONFIG_NAME)
        self.names, self.shape, self.get, self.close = self.ckpt.names, self.ckpt.shape, self.ckpt.get, self.ckpt.close

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.ckpt.dtype(name)]


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    *lead, m, n = shape
    return (*lead, -(-m // block[0]), -(-n // block[1]))


def plan(
    source: _HFSource | DeepSeekCheckpoint, dtype: torch.dtype | str | None, keep_fp4: bool = False
) -> tuple[dict[str, PendingTensor], dict[str, Any], tuple[int, int]]:
    """(HF name -> pending tensor in the target dtype, the HF config for it, the FP8 block size). FP4 weights stay
    packed with `keep_fp4` and no `dtype`, else are dequantised."""
    config = dict(source.hf_config)
    quant = config.get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size", (128, 128)))
    names = source.names() if isinstance(source, _HFSource) else sorted(source.names(), key=_natural)
    present = set(names)
    out: dict[str, PendingTensor] = {}

    def stored(name: str) -> PendingTensor:
        return PendingTensor(source.dtype(name), source.shape(name), lambda: source.get(name))

    def cast(name: str, to: torch.dtype) -> PendingTensor:
        return PendingTensor(to, source.shape(name), lambda: source.get(name).to(to))

    cache: dict[str, tuple[Tensor, Tensor]] = {}

    def quantised(name: str, part: int) -> Callable[[], Tensor]:
        def make() -> Tensor:
            if name not in cache:
                cache.clear()  # one weight at a time: its q is written right before its scale
                cache[name] = quantize_fp8(source.get(name), block)
            return cache[name][part]

        return make

    fp4_kept = keep_fp4 and dtype is None
    for name in names:
        dt, scale = source.dtype(name), name + SCALE_SUFFIX
        is_fp8 = dt in FP8_DTYPES and scale in present
        weight = name.removesuffix(SCALE_SUFFIX)
        if name.endswith(SCALE_SUFFIX) and weight in present:
            if fp4_kept if source.dtype(weight) in PACKED_DTYPES else dtype is None or dtype == FP8:
                out[name] = stored(name)
        elif dt in PACKED_DTYPES and scale in present and not fp4_kept:
            to = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
            make = lambda n=name, s=scale, to=to: dequantize_fp4(source.get(n), source.get(s), dtype=to)  # noqa: E731
            out[name] = PendingTensor(to, (*source.shape(name)[:-1], 2 * source.shape(name)[-1]), make)
        elif dtype is None or (dtype == FP8 and is_fp8) or not dt.is_floating_point or name.endswith(KEEP_DTYPE):
            out[name] = stored(name)
        elif dtype == FP8 and QUANTISED.fullmatch(name) and len(source.shape(name)) == 2:
            out[name] = PendingTensor(torch.float8_e4m3fn, source.shape(name), quantised(name, 0))
            out[scale] = PendingTensor(torch.float32, _scale_shape(source.shape(name), block), quantised(name, 1))
        elif is_fp8:
            to = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
            make = lambda n=name, s=scale, to=to: dequantize_fp8(source.get(n), source.get(s), block, to)  # noqa: E731
            out[name] = PendingTensor(to, source.shape(name), make)
        else:
            out[name] = cast(name, dtype if isinstance(dtype, torch.dtype) else torch.bfloat16)
    if dtype == FP8:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": list(block)}  # fmt: skip
        config["torch_dtype"] = config["dtype"] = "bfloat16"
    elif dtype is not None:
        config.pop("quantization_config", None)
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    return out, config, block  # type: ignore[return-value]


def _own_output(directory: Path) -> bool:
    """An earlier `deepmoe convert` output (HF or DeepSeek layout), which may be replaced."""
    names = visible_entries(directory)
    own = {CONVERT_RECORD, CONFIG_NAME, HF_CONFIG_NAME, MTP_NAME}
    deepseek = all(n in own or SHARD.fullmatch(n) or TOKENIZER_FILES.fullmatch(n) for n in names)
    return CONVERT_RECORD in names and (deepseek or checkpoint_output(CONVERT_RECORD)(directory))


def convert_checkpoint(
    source: str | os.PathLike, out: str | os.PathLike, to: str, dtype: torch.dtype | str | None = None,
    model_parallel: int = 1, max_shard_size: int | str = "5GB", fp4_experts: bool = False,
) -> Path:  # fmt: skip
    """Write the checkpoint `source` (HF directory or run directory, or a DeepSeek-layout directory) to `out`
    in the layout `to` ("hf" or "deepseek", the latter in `model_parallel` rank shards), its tensors in `dtype`
    (torch.bfloat16, torch.float32, "fp8", or None: as stored); `fp4_experts`: the routed experts as FP4 (`--to
    deepseek` only). Returns the absolute `out`.

    `out` is refused (before anything is written) when it overlaps the source or is a non-empty directory
    other than an earlier conversion; an earlier conversion there is replaced atomically.
    """
    if to not in LAYOUTS:
        raise ValueError(f"--to {to!r}: must be one of {', '.join(LAYOUTS)}")
    if model_parallel < 1 or (model_parallel != 1 and to != "deepseek"):
        raise ValueError(f"--model-parallel {model_parallel}: must be >= 1, and only --to deepseek has shards")
    if fp4_experts and to != "deepseek":
        raise ValueError("--fp4-experts: only --to deepseek stores FP4 experts (deepmoe's HF layout holds none)")
    step = checkpoint_dir(source)
    deepseek = is_deepseek_dir(step)
    if not deepseek and not (step / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{step}: is neither a checkpoint (no {CONFIG_NAME}) nor a DeepSeek-layout directory")
    refuse_overlap(out, [step], "the source checkpoint")
    with claim_directory(out, f"converted checkpoint ({CONVERT_RECORD})", _own_output) as target:
        reader = DeepSeekCheckpoint(step) if deepseek else _HFSource(step)
        try:
            tensors, config, block = plan(reader, dtype, keep_fp4=to == "deepseek")
            logger.info("converting %s (%s) to %s (%s)", step, "deepseek" if deepseek else "hf", target, to)
            with atomic_directory(target) as tmp:
                if to == "hf":
                    write_shards(tensors.items(), tmp, parse_size(max_shard_size))
                    write_json(tmp / CONFIG_NAME, config)
                else:
                    write_deepseek(tensors, config, tmp, model_parallel, block, fp4_experts=fp4_experts)
                copy_tokenizer_files(step, tmp)
                record = {
                    "source": str(step.resolve()),
                    "from": "deepseek" if deepseek else "hf",
                    "to": to,
                    "dtype": dtype if not isinstance(dtype, torch.dtype) else str(dtype).removeprefix("torch."),
                    "model_parallel": model_parallel if to == "deepseek" else None,
                    "fp4_experts": fp4_experts,
                }
                write_json(tmp / CONVERT_RECORD, record)
        finally:
            reader.close()
    return target
