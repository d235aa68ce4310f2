"""Assembly of Experts with FP8 parents (S4): block-scaled e4m3 parents as DeepSeek-V3/R1 are published,
dequantised while merging (checked against transformers' FP8 dequantisation, or a plain loop where it is
missing), written bf16 or requantised to FP8 (checked against DeepSeek's rule written out here), the δ
threshold on dequantised values, and parents quantised differently refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from configs import tiny_model_config
from deepmoe.cli import main
from deepmoe.io import save_checkpoint
from deepmoe.model import from_pretrained
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.tools.merge import merge_checkpoints
from reference import dequantize_fp8_blocks, quantize_fp8_blocks

# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = pytest.mark.cpu_only

BLOCK = (16, 12)  # partial edge blocks: 24-row kv_a_proj_with_mqa, 32-wide hidden (32 = 2·12 + 8)
QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """transformers' FP8 dequantisation where installed, else a plain per-block loop."""
    try:
        from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    except ImportError:
        return dequantize_fp8_blocks(q, scale, block)
    return _dequantize_fp8_weight(q, scale, list(block), torch.float32)


def is_quantised(name: str, t: torch.Tensor) -> bool:
    """The linear weights of attention, MLPs and experts (not norms, embeddings, lm_head, the router)."""
    return t.dim() == 2 and name.endswith(("proj.weight", "proj_with_mqa.weight"))


def save_fp8(path: Path, seed: int, block: tuple[int, int] = BLOCK, edit=None) -> Path:
    """A tiny V3 checkpoint as DeepSeek publishes it: linear weights e4m3 + `_scale_inv`, the rest bf16 (the
    selection bias float32), quantization_config in config.json; `edit(files)` changes the tensors first."""
    config = tiny_model_config()
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(config)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("e_score_correction_bias", "norm.weight")):
                t.normal_(1.0, 0.1)
    save_checkpoint(model.state_dict(), config, path)  # DeepSeek's per-expert names
    files = {}
    for name, t in load_file(str(path / "model.safetensors")).items():
        if is_quantised(name, t):
            files[name], files[name + "_scale_inv"] = quantize_fp8_blocks(t, block)
        else:
            files[name] = t if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
    if edit is not None:
        edit(files)
    save_file(files, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((path / "config.json").read_text())
    raw.update(torch_dtype="bfloat16", dtype="bfloat16", quantization_config={**QUANTIZATION,
               "weight_block_size": list(block)})  # fmt: skip
    (path / "config.json").write_text(json.dumps(raw))
    return path


def dequantised(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file in float32, FP8 ones dequantised with the reference."""
    files = load_file(str(path / "model.safetensors"))
    block = tuple(json.loads((path / "config.json").read_text())["quantization_config"]["weight_block_size"])
    out = {}
    for name, t in files.items():
        if name.endswith("_scale_inv"):
            continue
        out[name] = dequantize_reference(t, files[name + "_scale_inv"], block) if t.dtype.itemsize == 1 else t.float()
    return out


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp8")
    return save_fp8(root / "a", 0), save_fp8(root / "b", 1)


def test_partial_edge_blocks_are_exercised(parents):
    files = load_file(str(parents[0] / "model.safetensors"))
    shapes = {tuple(files[n[: -len("_scale_inv")]].shape) for n in files if n.endswith("_scale_inv")}
    assert any(m % BLOCK[0] for m, _ in shapes) and any(n % BLOCK[1] for _, n in shapes)


def test_bf16_child_is_the_average_of_the_dequantised_parents(parents, tmp_path):
    a, b = parents
    report = merge_checkpoints([a, b], [0.5, 0.5], tmp_path / "out")  # default for FP8 parents: bf16
    assert report.dtype == "bf16"
    da, db = dequantised(a), dequantised(b)
    child = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(child) == set(da)  # no scales
    for name, t in child.items():
        want = 0.5 * da[name] + 0.5 * db[name]
        if name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32 and torch.equal(t, want), name
        else:
            assert t.dtype == torch.bfloat16 and torch.equal(t, want.to(torch.bfloat16)), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    fp32 = merge_checkpoints([a, b], [0.5, 0.5], tmp_path / "fp32", dtype="fp32")
    assert fp32.dtype == "fp32"
    child = load_file(str(tmp_path / "fp32" / "model.safetensors"))
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    assert child[name].dtype == torch.float32 and torch.equal(child[name], 0.5 * da[name] + 0.5 * db[name])
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["torch_dtype"] == "float32"


def test_fp8_child_is_requantised_in_the_parents_format_and_loads(parents, tmp_path):
    a, b = parents
    assert main(["merge", str(a), str(b), "--weights", "0.5", "0.5", "--dtype", "fp8", "--max-shard-size", "20KB",
                 "--out", str(tmp_path / "fp8")]) == 0  # fmt: skip
    merge_checkpoints([a, b], [0.5, 0.5], tmp_path / "bf16")
    child_dir = tmp_path / "fp8"
    assert json.loads((child_dir / "config.json").read_text())["quantization_config"] == QUANTIZATION
    index = json.loads((child_dir / "model.safetensors.index.json").read_text())["weight_map"]
    child = {}
    for file in sorted(set(index.values())):  # sharded: a weight and its scale stay in one shard
        child.update(load_file(str(child_dir / file)))
    assert all(index[n] == index[n + "_scale_inv"] for n in index if n + "_scale_inv" in index)
    parent = load_file(str(a / "model.safetensors"))
    assert child.keys() == parent.keys()
    for name, t in parent.items():
        assert child[name].dtype == t.dtype and child[name].shape == t.shape, name
    da, db = dequantised(a), dequantised(b)
    for name in (n for n in parent if n.endswith("_scale_inv")):
        weight = name[: -len("_scale_inv")]
        q, scale = quantize_fp8_blocks(0.5 * da[weight] + 0.5 * db[weight], BLOCK)
        assert torch.equal(child[name], scale) and torch.equal(child[weight].float(), q.float()), weight
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        logits8 = from_pretrained(child_dir, dtype=torch.float32)(ids).logits
        logits16 = from_pretrained(tmp_path / "bf16", dtype=torch.float32)(ids).logits
    error = (logits8 - logits16).abs().max() / logits16.abs().max()
    assert 0 < error < 0.05  # e4m3 keeps 3 mantissa bits: a relative error of a few percent at most


def test_threshold_works_on_dequantised_values(parents, tmp_path):
    """B2 = A with the attention stored at twice the scale and half the e4m3 value (other bytes, the same
    dequantised weights) and B's experts: δ keeps A's attention bit for bit and merges the experts."""
    a, b = parents
    fa, fb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))

    def edit(files):
        files.clear()
        for name, t in fa.items():
            files[name] = fb[name] if ".mlp.experts." in name else t
            if ".self_attn." in name and name + "_scale_inv" in fa:
                files[name] = (t.float() / 2).to(torch.float8_e4m3fn)
                files[name + "_scale_inv"] = 2 * fa[name + "_scale_inv"]

    b2 = save_fp8(tmp_path / "b2", 0, edit=edit)
    raw = load_file(str(b2 / "model.safetensors"))["model.layers.0.self_attn.o_proj.weight"].float()
    assert (raw - fa["model.layers.0.self_attn.o_proj.weight"].float()).norm() > 0.3 * raw.norm()  # other bytes
    report = merge_checkpoints([a, b2], [0.25, 0.75], tmp_path / "out", threshold=0.01, dtype="fp8")
    attention = report.classes["attention"]
    assert attention.kept == attention.tensors and max(attention.differences[0]) < 1e-3
    assert report.classes["routed_experts"].kept == 0
    child = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, t in fa.items():
        if ".self_attn." in name:
            assert torch.equal(child[name].view(torch.uint8), t.view(torch.uint8)), name
    da, db = dequantised(a), dequantised(b)
    expert = "model.layers.1.mlp.experts.0.gate_proj.weight"
    q, scale = quantize_fp8_blocks(0.25 * da[expert] + 0.75 * db[expert], BLOCK)
    assert torch.equal(child[expert + "_scale_inv"], scale) and torch.equal(child[expert].float(), q.float())


def _drop_scale(files):
    del files["model.layers.0.self_attn.o_proj.weight_scale_inv"]


def _dequantise_one(files):
    name = "model.layers.1.mlp.shared_experts.up_proj.weight"
    files[name] = dequantize_reference(files[name], files.pop(name + "_scale_inv"), BLOCK).to(torch.bfloat16)


@pytest.mark.parametrize(
    "how, message",
    [
        (dict(edit=_dequantise_one), r"quantised differently: tensor 'model\.layers\.1\.mlp\.shared_experts\.up_proj"
                                     r"\.weight' is (BF16|F8_E4M3) in .* but (F8_E4M3|BF16) in the base"),
        (dict(block=(16, 16)), r"quantised differently: FP8 tensor '.*' is in 16x1[26] blocks in .* "
                               r"but 16x1[26] in the base"),
        (dict(edit=_drop_scale), r"FP8 tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' has no "
                                 r"'model\.layers\.0\.self_attn\.o_proj\.weight_scale_inv'"),
    ],
)  # fmt: skip
def test_parents_quantised_differently_are_refused(parents, tmp_path, how, message):
    other = save_fp8(tmp_path / "other", 1, **how)
    with pytest.raises(ValueError, match=message):
        merge_checkpoints([parents[0], other], [0.5, 0.5], tmp_path / "out")
    with pytest.raises(ValueError, match=message):  # either way round
        merge_checkpoints([other, parents[0]], [0.5, 0.5], tmp_path / "out", dtype="fp8")
    assert not (tmp_path / "out").exists()


def test_fp8_output_needs_fp8_parents(tmp_path, capsys):
    config = tiny_model_config()
    for seed in (0, 1):
        torch.manual_seed(seed)
        DeepSeekForCausalLM(config).save_pretrained(tmp_path / str(seed))
    with pytest.raises(ValueError, match="dtype fp8 requantises the tensors the parents store in FP8"):
        merge_checkpoints([tmp_path / "0", tmp_path / "1"], [0.5, 0.5], tmp_path / "out", dtype="fp8")
    with pytest.raises(ValueError, match="dtype 'int8' is not one of bf16, fp32, fp8"):
        merge_checkpoints([tmp_path / "0", tmp_path / "1"], [0.5, 0.5], tmp_path / "out", dtype="int8")
    assert main(["merge", str(tmp_path / "0"), str(tmp_path / "1"), "--weights", "0.5", "0.5", "--dtype", "bf16",
                 "--out", str(tmp_path / "bf16")]) == 0  # fmt: skip
    child = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert child["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert child["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
