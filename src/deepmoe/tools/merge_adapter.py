"""Merge a LoRA adapter into its base checkpoint (docs/design.md#lora-adapters): W ← W + (α/r)·B A for every
adapted weight, written as an ordinary checkpoint (config.json + safetensors, HF's names) that transformers and
`deepmoe.from_pretrained` load without the adapter."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deepmoe.io.adapter import read_adapter
from deepmoe.io.checkpoint import checkpoint_dir, checkpoint_output, copy_tokenizer_files, save_checkpoint
from deepmoe.io.files import atomic_directory, claim_directory, refuse_overlap, write_json
from deepmoe.model import DeepSeekForCausalLM
from deepmoe.model.lora import load_adapter, merge_lora

MERGE_ADAPTER_RECORD = "merge_adapter.json"


def merge_adapter(
    base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> dict[str, Any]:
    """Write `out` = the checkpoint `base` with the adapter directory `adapter` merged in, plus the base's
    tokenizer files and `merge_adapter.json` (what was merged). Returns that record.

    `out` must be new, empty, or an earlier output of this function (`claim_directory`), and may not be or hold
    `base` or `adapter`; it is written atomically. The merge is computed in float32 and stored in the base's
    dtypes (`deepmoe.model.lora.merge_lora`)."""
    base_dir = checkpoint_dir(base)
    refuse_overlap(out, [base_dir, adapter], "an input")
    loaded = read_adapter(adapter)  # its errors before any work
    record = {
        "base": str(base_dir),
        "adapter": str(Path(adapter)),
        "rank": loaded.rank,
        "alpha": loaded.alpha,
        "targets": list(loaded.targets),
        "tensors": len(loaded.tensors),
    }
    claim = claim_directory(out, f"merged checkpoint ({MERGE_ADAPTER_RECORD})", checkpoint_output(MERGE_ADAPTER_RECORD))
    with claim as target:
        model = DeepSeekForCausalLM.from_pretrained(base_dir)
        merge_lora(load_adapter(model, loaded))
        with atomic_directory(target) as tmp:
            save_checkpoint(model, model.config, tmp, max_shard_size=max_shard_size)
            copy_tokenizer_files(base_dir, tmp)
            write_json(tmp / MERGE_ADAPTER_RECORD, record)
    return {**record, "out": str(target)}
