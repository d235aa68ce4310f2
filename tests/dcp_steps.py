"""Distributed (DCP) step directories for the tests of `deepmoe.io.distributed` and `deepmoe export`,
written in one process: as one rank (`dcp.save(no_dist=True)`), or as several ranks each holding a
slice of dim 0 of every tensor (the files DCP's HuggingFaceStorageWriter writes, built by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import Tensor

from configs import tiny_model_config
from deepmoe.config import DeepSeekConfig
from deepmoe.io.distributed import DISTRIBUTED_DIR
from deepmoe.io.files import write_json
from deepmoe.io.hf import config_to_hf
from deepmoe.model.decoder import DeepSeekForCausalLM


def perturbed_model(scale: float) -> DeepSeekForCausalLM:
    """A tiny V3-style model with MTP whose weights are moved off their init (norms by 0.1, the rest by
    `scale`), so that every tensor matters in a logits comparison."""
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_model_config(num_nextn_predict_layers=1)).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.add_(torch.randn_like(t) * (0.1 if "norm" in name else scale))
    return model


def write_step(step: Path, config: DeepSeekConfig, state: dict[str, Tensor], ranks: int = 1) -> Path:
    """`step` with config.json and `distributed/` holding {"model": state, "optimizer": ...} (an Adam-like
    `exp_avg` per tensor), saved by `ranks` ranks; returns `step`."""
    step.mkdir(parents=True, exist_ok=True)
    write_json(step / "config.json", config_to_hf(config))
    full = {
        "model": state,
        "optimizer": {"state": {name: {"exp_avg": torch.zeros_like(t)} for name, t in state.items()}},
    }
    directory = step / DISTRIBUTED_DIR
    if ranks == 1:
        writer = dcp.HuggingFaceStorageWriter(str(directory), save_distributed=True)
        dcp.save(full, storage_writer=writer, no_dist=True)
        return step
    flat = {f"model.{n}": t for n, t in state.items()} | {
        f"optimizer.state.{n}.exp_avg": s["exp_avg"] for n, s in full["optimizer"]["state"].items()
    }
    directory.mkdir()
    for rank in range(ranks):
        pieces, offsets = {}, {}
        for key, t in flat.items():
            rows = t.shape[0] if t.dim() else 1
            r0, r1 = rank * rows // ranks, (rank + 1) * rows // ranks
            if t.dim() and r1 > r0:
                pieces[key] = t[r0:r1].contiguous()
                offsets[key] = {"saved_offsets": [r0] + [0] * (t.dim() - 1)}
        metadata = {"format": "pt", "DCP_SHARDING_INFO": json.dumps(offsets)}
        save_file(pieces, str(directory / f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"), metadata)
    return step
