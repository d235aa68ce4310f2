"""What a run starts from: its corpus (tokenized with the checkpoint's tokenizer when there is one) and, with
`init_from`, a saved model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from deepmoe import data
from deepmoe.config import DeepSeekConfig
from deepmoe.io.checkpoint import checkpoint_dir, load_config, read_json
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.train import checkpoint as ckpt
from deepmoe.train.config import TrainConfig, add_indexer


def data_sources(config: TrainConfig) -> list[tuple[str, float]]:
    """`config.data` as (path, weight) pairs: one path, or `PATH:WEIGHT` entries of a mixture."""
    specs = config.data if isinstance(config.data, list) else [config.data]
    return [data.parse_source(spec) for spec in specs]


def load_corpus(config: TrainConfig, corpus: Any, step_dir: Path | None = None) -> Any:
    """`corpus`, or the run's data: prepared directories (`deepmoe data prepare`; several mixed by weight) read
    memory-mapped, or text tokenized with the tokenizer saved in the resumed checkpoint `step_dir`, else
    `init_from`'s, else one trained on the corpus (deterministic: a resumed run gets the same). Prepared data
    made with another tokenizer than the checkpoint's is refused."""
    if corpus is not None:
        return corpus
    if step_dir is not None and (step_dir / ckpt.TOKENIZER_NAME).is_file():
        source: Path | None = step_dir
    elif config.init_from is not None:
        source = Path(config.init_from)
    else:
        source = None
    tokenizer = None
    if source is not None:
        tokenizer = data.load_tokenizer(source, needed_for="init_from (the tokenizer its model was trained with)")
    sources = data_sources(config) if config.data is not None else []
    for path, _ in sources:
        if not os.path.exists(path):
            raise ValueError(f"data path {path!r} does not exist")
    prepared = [data.is_prepared(path) for path, _ in sources]
    if any(prepared):
        if not all(prepared):
            text = next(path for (path, _), p in zip(sources, prepared, strict=True) if not p)
            raise ValueError(f"data {text!r} is not prepared data: a mixture reads prepared directories only "
                             f"(deepmoe data prepare {text} --out DIR)")  # fmt: skip
        return data.PreparedCorpus(sources, tokenizer, str(source))
    if len(sources) > 1:
        raise ValueError("a mixture (--data PATH:WEIGHT) reads prepared directories only: prepare each source with "
                         "deepmoe data prepare")  # fmt: skip
    text = sources[0][0] if sources else None  # None: the bundled corpus
    if tokenizer is None:
        return data.prepare_corpus(text, vocab_size=config.vocab_size)
    eos = read_json(checkpoint_dir(source) / "config.json", "model config").get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return data.prepare_corpus(text, tokenizer=tokenizer, eot_id=eos)


def training_batches(corpus: Any, config: TrainConfig, rows: slice) -> Any:
    """The run's endless, resumable batches: this rank's `rows` of each global batch."""
    if hasattr(corpus, "batches"):
        return corpus.batches(config.batch_size, config.seq_len, config.seed, rows)
    return data.PackedBatches(corpus.train, config.batch_size, config.seq_len, config.seed, rows=rows)


def heldout_batches(corpus: Any, config: TrainConfig, max_batches: int | None) -> list[Any]:
    """The corpus's first `max_batches` held-out batches (None: all); ValueError when it has no whole sequence."""
    if hasattr(corpus, "heldout_batches"):
        return corpus.heldout_batches(config.batch_size, config.seq_len, max_batches)
    if corpus.heldout.numel() < config.seq_len:
        raise ValueError(
            f"the held-out split has {corpus.heldout.numel()} tokens, fewer than one sequence of "
            f"seq_len={config.seq_len}: use a larger corpus or a smaller --seq-len"
        )
    return data.heldout_batches(corpus.heldout, config.batch_size, config.seq_len, max_batches)


def train_tokens(corpus: Any) -> int:
    return corpus.train_tokens if hasattr(corpus, "train_tokens") else corpus.train.numel()


def unigram_entropy(corpus: Any) -> float:
    """The loss of a model that only knows token frequencies (the report's baseline)."""
    if hasattr(corpus, "unigram_entropy"):
        return corpus.unigram_entropy()
    return float(data.unigram_entropy(corpus.train, corpus.vocab_size))


def initial_model(config: TrainConfig, vocab_size: int) -> DeepSeekForCausalLM:
    """The float32 model saved in `config.init_from`, with the run's MoE training options (γ, FP8 experts),
    checked against the tokenizer's vocabulary."""
    model_config = load_config(config.init_from)
    if model_config.moe is not None:
        changes = {"fp8_experts": config.fp8_experts}
        if config.bias_update_speed is not None:
            changes["bias_update_speed"] = config.bias_update_speed
        model_config = dataclasses.replace(model_config, moe=dataclasses.replace(model_config.moe, **changes))
    elif config.bias_update_speed is not None or config.fp8_experts:
        raise ValueError(f"init_from={config.init_from!r} is a dense model: bias_update_speed and fp8_experts "
                         "apply to MoE layers only")  # fmt: skip
    if vocab_size > model_config.vocab_size:
        raise ValueError(
            f"init_from={config.init_from!r} has vocab_size={model_config.vocab_size}, but its tokenizer has "
            f"{vocab_size} tokens"
        )
    if config.sparse_attention is not None or config.index_topk is not None:  # DSA: V3.2 on a trained V3
        fields = model_config.to_dict()
        add_indexer(fields, config)
        added = not model_config.has_indexer
        model_config = DeepSeekConfig.from_dict(fields)
        if added:  # the checkpoint's weights; the new indexers keep their initialisation
            model = DeepSeekForCausalLM(model_config)
            ckpt.load_model_weights(model, config.init_from, new=lambda name: ".indexer." in name)
            return model
    model = DeepSeekForCausalLM(model_config)
    ckpt.load_model_weights(model, config.init_from)
    return model
