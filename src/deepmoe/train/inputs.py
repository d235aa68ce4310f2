"""What a run starts from: its corpus (tokenized with the checkpoint's tokenizer when there is one) and, with
`init_from`, a saved model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from deepmoe import data
from deepmoe.io.checkpoint import checkpoint_dir, load_config, read_json
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.train import checkpoint as ckpt
from deepmoe.train.config import TrainConfig


def load_corpus(config: TrainConfig, corpus: Any, step_dir: Path | None = None) -> Any:
    """`corpus`, or the run's corpus tokenized with the tokenizer saved in the resumed checkpoint `step_dir`,
    else `init_from`'s, else one trained on the corpus (deterministic: a resumed run gets the same)."""
    if corpus is not None:
        return corpus
    if step_dir is not None and (step_dir / ckpt.TOKENIZER_NAME).is_file():
        source = step_dir
    elif config.init_from is not None:
        source = Path(config.init_from)
    else:
        return data.prepare_corpus(config.data, vocab_size=config.vocab_size)
    tokenizer = data.load_tokenizer(source, needed_for="init_from (the tokenizer its model was trained with)")
    eos = read_json(checkpoint_dir(source) / "config.json", "model config").get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    return data.prepare_corpus(config.data, tokenizer=tokenizer, eot_id=eos)


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
    model = DeepSeekForCausalLM(model_config)
    ckpt.load_model_weights(model, config.init_from)
    return model
