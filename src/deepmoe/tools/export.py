"""`deepmoe export`: a training checkpoint as an ordinary Hugging Face checkpoint
(docs/design.md#m5-hugging-face-checkpoints).

A multi-process run's step (`step-N/distributed/`, DCP files written by every rank) is streamed
tensor by tensor: each full tensor is reassembled from the ranks' files (`DistributedCheckpoint`),
split per expert and written into the output shards before the next is read, so the peak memory is
about the largest tensor, not the model. An ordinary HF step or directory is loaded and re-saved
(the whole state in memory). The output has the source's config and tokenizer files and
`export.json` (source, step, dtype); transformers' `DeepseekV3ForCausalLM.from_pretrained` loads it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from deepmoe.io.checkpoint import (
    CONFIG_NAME,
    check_distributed,
    checkpoint_dir,
    checkpoint_output,
    copy_tokenizer_files,
    load_checkpoint,
    load_config,
    save_checkpoint,
    step_number,
)
from deepmoe.io.distributed import DistributedCheckpoint, is_distributed_checkpoint
from deepmoe.io.files import atomic_directory, claim_directory, refuse_overlap, write_json

EXPORT_RECORD = "export.json"
logger = logging.getLogger(__name__)


def export_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write the checkpoint `source` (a run directory: its newest complete step; a step directory,
    distributed or not; a HF directory) to `out` as a HF checkpoint, floating tensors cast to `dtype`
    (None: as stored; the expert biases stay float32). Returns the absolute `out`.

    `out` is refused (before anything is written) when it overlaps the source or is a non-empty
    directory other than an earlier export; an earlier export there is replaced atomically.
    """
    step = checkpoint_dir(source)
    if not (step / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{step}: is not a checkpoint (no {CONFIG_NAME}) nor a run directory with one")
    refuse_overlap(out, [step], "the source checkpoint")
    config = load_config(step)
    distributed = is_distributed_checkpoint(step)
    with claim_directory(out, f"exported checkpoint ({EXPORT_RECORD})", checkpoint_output(EXPORT_RECORD)) as target:
        tensors: Mapping[str, Tensor]
        if distributed:
            tensors = DistributedCheckpoint(step, dtype)
            check_distributed(tensors, config, step / CONFIG_NAME)
        else:
            config, tensors = load_checkpoint(step, dtype=dtype)
        logger.info("exporting %s (%s) to %s", step, "distributed" if distributed else "safetensors", target)
        with atomic_directory(target) as tmp:
            save_checkpoint(tensors, config, tmp, max_shard_size=max_shard_size)
            copy_tokenizer_files(step, tmp)
            record = {
                "source": str(step.resolve()),
                "step": step_number(step),
                "distributed": distributed,
                "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            }
            write_json(tmp / EXPORT_RECORD, record)
    return target
