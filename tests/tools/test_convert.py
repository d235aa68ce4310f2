"""`deepmoe convert`: HF <-> DeepSeek's inference layout (1 and 2 rank shards, MTP kept) bit-exact both ways,
FP8 <-> bf16 as DeepSeek's fp8_cast_bf16 / weight_quant do, and the HF output read by deepmoe and transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dcp_steps import perturbed_model
from deepmoe.cli import main
from deepmoe.io.checkpoint import load_checkpoint, save_checkpoint
from deepmoe.io.files import OutputDirectoryError
from deepmoe.io.fp8_blocks import dequantize_fp8
from deepmoe.tools.convert import CONVERT_RECORD, convert_checkpoint
from reference import transformers_logits

# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.cpu_only]


@pytest.fixture(scope="module")
def model():
    return perturbed_model(0.05)


@pytest.fixture
def hf(model, tmp_path):
    path = save_checkpoint(model, None, tmp_path / "hf")
    (path / "tokenizer.json").write_text('{"model": {}}')
    return path


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def _same_bytes(a, b):
    return a.keys() == b.keys() and all(
        a[n].dtype == b[n].dtype
        and a[n].shape == b[n].shape
        and torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8))
        for n in a
    )


@pytest.mark.parametrize("mp", [1, 2])
def test_hf_to_deepseek_to_hf_is_bit_exact(hf, tmp_path, mp):
    ds = convert_checkpoint(hf, tmp_path / "ds", "deepseek", model_parallel=mp)
    shards = [f"model{r}-mp{mp}.safetensors" for r in range(mp)]
    assert sorted(p.name for p in ds.iterdir()) == sorted(
        [*shards, "mtp.safetensors", "config.json", "hf_config.json", "tokenizer.json", CONVERT_RECORD]
    )
    source = _tensors(hf)
    ranks = [load_file(str(ds / s)) for s in shards]
    half = lambda t, dim, r: t.narrow(dim, r * t.shape[dim] // mp, t.shape[dim] // mp)  # noqa: E731
    for r, state in enumerate(ranks):
        assert torch.equal(state["embed.weight"], half(source["model.embed_tokens.weight"], 0, r))
        assert torch.equal(state["head.weight"], half(source["lm_head.weight"], 0, r))
        assert torch.equal(
            state["layers.0.attn.wo.weight"], half(source["model.layers.0.self_attn.o_proj.weight"], 1, r)
        )
        assert torch.equal(state["layers.0.ffn.w1.weight"], half(source["model.layers.0.mlp.gate_proj.weight"], 0, r))
        w2 = source["model.layers.1.mlp.shared_experts.down_proj.weight"]
        assert torch.equal(state["layers.1.ffn.shared_experts.w2.weight"], half(w2, 1, r))
        assert torch.equal(state["layers.1.ffn.gate.bias"], source["model.layers.1.mlp.gate.e_score_correction_bias"])
        assert torch.equal(
            state["layers.0.attn.wkv_a.weight"], source["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
        )
        # 4 experts: on rank e // (4 / mp), nowhere else
        held = {e for e in range(4) if f"layers.1.ffn.experts.{e}.w3.weight" in state}
        assert held == {e for e in range(4) if e // (4 // mp) == r}
        assert not any(n.startswith("layers.2.") or n.startswith("model.") for n in state)
    mtp = load_file(str(ds / "mtp.safetensors"))
    assert mtp.keys() == {n for n in source if n.startswith("model.layers.2.")} and mtp
    args = json.loads((ds / "config.json").read_text())
    assert args["dim"] == 32 and args["n_layers"] == 2 and args["n_routed_experts"] == 4 and args["dtype"] == "bf16"
    assert json.loads((ds / "hf_config.json").read_text()) == json.loads((hf / "config.json").read_text())

    back = convert_checkpoint(ds, tmp_path / "back", "hf")
    assert _same_bytes(_tensors(back), source)
    assert (back / "config.json").read_text() == (hf / "config.json").read_text()
    assert (back / "tokenizer.json").read_text() == '{"model": {}}'


def test_hf_output_loads_in_deepmoe_and_transformers_with_the_same_logits(model, hf, tmp_path):
    ds = convert_checkpoint(hf, tmp_path / "ds", "deepseek", model_parallel=2)
    out = convert_checkpoint(ds, tmp_path / "out", "hf")
    config, state = load_checkpoint(out)
    assert config == model.config and all(torch.equal(state[n], t) for n, t in model.state_dict().items())
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    got = transformers_logits(out, ids)
    with torch.no_grad():
        want = model(ids).logits.double()
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_fp8_quantise_dequantise_and_round_trip(model, hf, tmp_path):
    fp8 = convert_checkpoint(hf, tmp_path / "fp8", "hf", "fp8")
    config = json.loads((fp8 / "config.json").read_text())
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}  # fmt: skip
    t = _tensors(fp8)
    quantised = {n.removesuffix("_scale_inv") for n in t if n.endswith("_scale_inv")}
    for n in ("model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.shared_experts.gate_proj.weight",
              "model.layers.2.self_attn.o_proj.weight"):  # fmt: skip
        assert n in quantised and t[n].dtype == torch.float8_e4m3fn and t[n + "_scale_inv"].shape == (1, 1)
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.2.eh_proj.weight"):  # fmt: skip
        assert n not in quantised and t[n].dtype == torch.bfloat16
    assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    _, state = load_checkpoint(fp8, dtype=torch.float32)  # deepmoe dequantises it: close to the source
    reference = model.state_dict()
    w = reference["model.layers.0.self_attn.q_a_proj.weight"]
    assert float((state["model.layers.0.self_attn.q_a_proj.weight"] - w).norm() / w.norm()) < 0.05

    ds = convert_checkpoint(fp8, tmp_path / "ds", "deepseek")  # scales travel as `.scale`
    assert "layers.0.attn.wq_a.scale" in load_file(str(ds / "model0-mp1.safetensors"))
    assert json.loads((ds / "config.json").read_text())["dtype"] == "fp8"
    assert _same_bytes(_tensors(convert_checkpoint(ds, tmp_path / "back", "hf")), t)

    bf16 = convert_checkpoint(fp8, tmp_path / "bf16", "hf", torch.bfloat16)  # DeepSeek's fp8_cast_bf16
    b = _tensors(bf16)
    assert not any(n.endswith("_scale_inv") for n in b)
    assert "quantization_config" not in json.loads((bf16 / "config.json").read_text())
    for n in quantised:
        assert torch.equal(b[n], dequantize_fp8(t[n], t[n + "_scale_inv"], (128, 128), torch.bfloat16))


def test_refusals(hf, tmp_path):
    with pytest.raises(ValueError, match="cannot be split"):  # a rank's slice of a 32-row FP8 weight is no block
        fp8 = convert_checkpoint(hf, tmp_path / "fp8", "hf", "fp8")
        convert_checkpoint(fp8, tmp_path / "ds", "deepseek", model_parallel=2)
    with pytest.raises(ValueError, match="routed experts"):
        convert_checkpoint(hf, tmp_path / "ds3", "deepseek", model_parallel=3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirectoryError):
        convert_checkpoint(hf, foreign, "hf")
    with pytest.raises(OutputDirectoryError):
        convert_checkpoint(hf, hf / "sub", "hf")


def test_cli_converts_and_replaces_its_own_output(hf, tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["convert", str(hf), "--out", str(out), "--to", "deepseek", "--model-parallel", "2"]) == 0
    assert main(["convert", str(hf), "--out", str(out), "--to", "deepseek", "--dtype", "bf16"]) == 0
    assert sorted(p.name for p in out.glob("model*")) == ["model0-mp1.safetensors"]
    assert "converted" in capsys.readouterr().out
