"""Adapter directories (deepmoe.io.adapter) in PEFT's LoRA format: key names, layouts (checked against PEFT's own
formula for a 3-D parameter, written out here), config fields, the round trip through from_pretrained, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from configs import tiny_model_config
from deepmoe import DeepSeekForCausalLM
from deepmoe.io.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, read_adapter
from deepmoe.model.lora import LoRAConfig, apply_lora, load_adapter, lora_state_dict, save_adapter
from reference import randomise_parameters, transformers_model

# cpu_only: files on disk
pytestmark = pytest.mark.cpu_only


def _adapted(targets=("experts", "attention"), seed=0, **overrides):
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(tiny_model_config(**overrides)).eval()
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.2)
    return model


def test_files_are_peft_lora_with_its_key_names_and_layout(tmp_path):
    model = _adapted()
    save_adapter(model, tmp_path / "a", base_model_name_or_path="base-dir")
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (2, 4.0, "base-dir")
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["target_modules"] == ["kv_a_proj_with_mqa", "o_proj", "q_a_proj", "q_b_proj"]
    assert config["lora_dropout"] == 0.0 and config["bias"] == "none" and not config["use_dora"]
    with safe_open(str(tmp_path / "a" / ADAPTER_WEIGHTS), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    p = "base_model.model.model.layers."
    assert f"{p}0.self_attn.q_a_proj.lora_A.weight" in stored and f"{p}1.self_attn.o_proj.lora_B.weight" in stored
    # PEFT nests one ParamWrapper per targeted parameter: gate_up_proj (registered first) inside, down_proj outside
    experts = model.model.layers[1].mlp.experts
    n, r, hidden, inter = 4, 2, 32, 16
    gate_up_a = stored[f"{p}1.mlp.experts.base_layer.lora_A.weight"]
    gate_up_b = stored[f"{p}1.mlp.experts.base_layer.lora_B.weight"]
    down_a, down_b = stored[f"{p}1.mlp.experts.lora_A.weight"], stored[f"{p}1.mlp.experts.lora_B.weight"]
    assert gate_up_a.shape == (n * r, hidden) and gate_up_b.shape == (2 * inter, r * n)
    assert down_a.shape == (n * r, inter) and down_b.shape == (hidden, r * n)
    # PEFT's ParamWrapper.get_delta_weight for [experts, out, in] parameters, as it writes it
    for a, b, proj in ((gate_up_a, gate_up_b, "gate_up_proj"), (down_a, down_b, "down_proj")):
        peft_delta = torch.einsum("o r e, e r i -> e o i", b.reshape(b.shape[0], -1, n), a.reshape(n, -1, a.shape[-1]))
        torch.testing.assert_close(peft_delta * 2.0, experts.delta_weight(proj).detach())
    assert len(stored) == 2 * 2 + 2 * (4 + 4)  # experts of layer 1, four attention projections in each layer


def test_from_pretrained_with_adapter_equals_the_adapted_model(tmp_path):
    model = _adapted()
    ids = torch.randint(0, 64, (2, 6))
    base = DeepSeekForCausalLM(model.config)
    base.load_state_dict({k: v for k, v in model.state_dict().items() if "lora" not in k})
    base.save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "adapter")
    loaded = DeepSeekForCausalLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    with pytest.raises(ValueError, match="has LoRA adapters"):
        loaded.save_pretrained(tmp_path / "again")


def test_adapter_for_another_model_is_one_clear_error(tmp_path):
    save_adapter(_adapted(), tmp_path / "a")
    other = DeepSeekForCausalLM(tiny_model_config(moe={"n_routed_experts": 8})).eval()
    with pytest.raises(AdapterError, match="made for another base model.*moe"):
        load_adapter(other, tmp_path / "a")
    assert not any(p.requires_grad is False for p in other.parameters())  # left as it was
    # the same check from the shapes alone, for an adapter without deepmoe's record (as PEFT writes them)
    loaded = read_adapter(tmp_path / "a")
    loaded.base = {}
    with pytest.raises(AdapterError, match=r"does not fit this model: .*experts.*has shape"):
        load_adapter(other, loaded)
    assert getattr(other, "lora_config", None) is None and not any("lora" in n for n, _ in other.named_parameters())


def test_bad_adapter_directories(tmp_path):
    with pytest.raises(AdapterError, match="adapter directory not found"):
        read_adapter(tmp_path / "missing")
    save_adapter(_adapted(targets=("experts",)), tmp_path / "a")
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora=True is not supported"):
        read_adapter(tmp_path / "a")
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        read_adapter(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("mine")
    with pytest.raises(AdapterError, match="not an adapter directory"):
        save_adapter(_adapted(targets=("experts",)), tmp_path / "b")


@pytest.mark.parametrize("targets", [("experts",), ("experts", "attention")])
def test_peft_reads_the_adapter_as_deepmoe_does(tmp_path, targets):
    """Where PEFT (>= 0.17, target_parameters) is installed: PeftModel on transformers' model of the base gives
    deepmoe's logits with the adapter. PEFT is not a dependency: skipped without it."""
    peft = pytest.importorskip("peft", minversion="0.17")
    model = DeepSeekForCausalLM(tiny_model_config()).eval()
    randomise_parameters(model, seed=0)
    model.save_pretrained(tmp_path / "base")
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3)
    save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    wrapped = peft.PeftModel.from_pretrained(transformers_model(tmp_path / "base"), str(tmp_path / "adapter"))
    with torch.no_grad():
        want = model(ids).logits.double()
        got = wrapped(ids).logits.double()
    assert float((got - want).norm() / want.norm()) < 1e-5
