"""`deepmoe inspect`: KV-cache sizes against the formula and against a real cache."""

from __future__ import annotations

import json

import pytest
import torch

from configs import tiny_preset
from deepmoe.cli import main
from deepmoe.model import DeepSeekForCausalLM, KVCache
from deepmoe.presets import get_preset
from deepmoe.tools.inspect import kv_cache_bytes_per_token

# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = pytest.mark.cpu_only


def test_v3_mla_cache_is_the_published_70kb_per_token():
    sizes = kv_cache_bytes_per_token(get_preset("deepseek-v3"))
    assert sizes["model"] == (512 + 64) * 61 * 2 == 70272
    assert sizes["mha"] == 128 * (128 + 64 + 128) * 61 * 2


@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2", "tiny-deepseek-moe"])
def test_formula_matches_the_bytes_a_real_cache_holds(preset):
    config = tiny_preset(preset, num_nextn_predict_layers=0)
    model = DeepSeekForCausalLM(config).to(torch.bfloat16).eval()
    cache = KVCache()
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (1, 7)), past_key_values=cache)
    assert cache.nbytes_per_token() == kv_cache_bytes_per_token(config)["model"]


def test_inspect_json(capsys):
    assert main(["inspect", "deepseek-v2-lite", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"total_params", "active_params", "kv_cache_bytes_per_token"} <= set(info)
    assert info["kv_cache_bytes_per_token"] == (512 + 64) * 27 * 2


def test_inspect_unknown_model_is_one_line_error(capsys):
    assert main(["inspect", "no-such-model"]) == 1
    assert "neither a preset" in capsys.readouterr().err
