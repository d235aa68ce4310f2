"""Assembly of Experts (S4): W = Σ λ_k W_k per tensor class, the δ threshold, streaming shards,
mismatch errors, the dry run and the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from configs import tiny_model_config
from deepmoe.cli import main
from deepmoe.config import DeepSeekConfig
from deepmoe.io import load_checkpoint, save_checkpoint
from deepmoe.io.checkpoint import INDEX_NAME
from deepmoe.model import from_pretrained
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.generate import generate
from deepmoe.tools.merge import merge_checkpoints, tensor_class

# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = pytest.mark.cpu_only


def tiny_config(**overrides) -> DeepSeekConfig:
    """`tiny_model_config` with its MTP module."""
    return tiny_model_config(**{"num_nextn_predict_layers": 1, **overrides})


def save_random(path: Path, seed: int, config: DeepSeekConfig | None = None) -> Path:
    torch.manual_seed(seed)
    model = DeepSeekForCausalLM(config or tiny_config())
    with torch.no_grad():  # a non-zero, different selection bias and norms per parent
        for name, t in model.state_dict().items():
            if name.endswith(("e_score_correction_bias", "norm.weight")):
                t.normal_(1.0, 0.1)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parents")
    return save_random(root / "a", 0), save_random(root / "b", 1)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[1]


def test_tensor_classes():
    assert tensor_class("model.layers.1.mlp.experts.3.up_proj.weight") == "routed_experts"
    assert tensor_class("model.layers.1.mlp.shared_experts.down_proj.weight") == "shared_experts"
    assert tensor_class("model.layers.1.mlp.gate.weight") == "router"
    assert tensor_class("model.layers.1.mlp.gate.e_score_correction_bias") == "router"
    assert tensor_class("model.layers.1.self_attn.kv_a_layernorm.weight") == "attention"
    assert tensor_class("model.layers.0.mlp.gate_proj.weight") == "dense_mlp"
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
    ):
        assert tensor_class(name) == "embeddings_norms"
    assert tensor_class("model.layers.2.eh_proj.weight") == "other"


def test_weights_one_zero_reproduce_parent_one_bit_for_bit(parents, tmp_path):
    a, b = parents
    report = merge_checkpoints([a, b], [1.0, 0.0], tmp_path / "out", max_shard_size="20KB")
    assert len(report.files) > 1 and (tmp_path / "out" / INDEX_NAME).is_file()  # sharded
    merged, original = weights(tmp_path / "out"), weights(a)
    assert merged.keys() == original.keys()
    for name in original:
        assert torch.equal(merged[name], original[name]), name
    assert (tmp_path / "out" / "config.json").read_bytes() == (a / "config.json").read_bytes()
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "out" / "merge.json").read_text())["weights"]["routed_experts"] == [1.0, 0.0]


def test_half_half_is_the_tensor_average(parents, tmp_path):
    a, b = parents
    merge_checkpoints([a, b], [0.5, 0.5], tmp_path / "out")
    wa, wb, merged = weights(a), weights(b), weights(tmp_path / "out")
    for name in wa:
        assert torch.equal(merged[name], 0.5 * wa[name] + 0.5 * wb[name]), name


def test_expert_weights_apply_to_routed_experts_only(parents, tmp_path):
    a, b = parents
    merge_checkpoints([a, b], [1.0, 0.0], tmp_path / "out", class_weights={"routed_experts": [0.0, 1.0]})
    wa, wb, merged = weights(a), weights(b), weights(tmp_path / "out")
    for name in wa:
        source = wb if ".mlp.experts." in name else wa
        assert torch.equal(merged[name], source[name]), name


def test_threshold_keeps_the_base_tensor_exactly(parents, tmp_path):
    """B2 = A with the routed experts replaced by B's and the attention nudged by 1e-4 (relative):
    with δ = 0.01 the attention (and all else) stays A's bit for bit, the experts are merged."""
    a, b = parents
    config, wa = load_checkpoint(a)
    wb = weights(b)
    nudged = {n: t + 1e-4 * t if ".self_attn." in n else (wb[n] if ".mlp.experts." in n else t) for n, t in wa.items()}
    save_checkpoint(nudged, config, tmp_path / "b2")
    report = merge_checkpoints([a, tmp_path / "b2"], [0.25, 0.75], tmp_path / "out", threshold=0.01)
    merged = weights(tmp_path / "out")
    for name in wa:
        if ".mlp.experts." in name:
            torch.testing.assert_close(merged[name], 0.25 * wa[name] + 0.75 * wb[name], rtol=0, atol=1e-7)
        else:
            assert torch.equal(merged[name], wa[name]), name
    attention = report.classes["attention"]
    assert attention.kept == attention.tensors
    assert max(attention.differences[0]) == pytest.approx(1e-4, rel=1e-3)
    assert report.classes["routed_experts"].kept == 0
    # without δ the nudged attention is averaged in
    merge_checkpoints([a, tmp_path / "b2"], [0.25, 0.75], tmp_path / "plain")
    attn = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(weights(tmp_path / "plain")[attn], wa[attn])


def test_three_parents_and_bfloat16(tmp_path):
    config = tiny_config(num_nextn_predict_layers=0)
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = DeepSeekForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(tmp_path / str(seed))
        paths.append(tmp_path / str(seed))
    merge_checkpoints(paths, [0.5, 0.25, 0.25], tmp_path / "out")
    ws = [weights(p) for p in paths]
    merged = weights(tmp_path / "out")
    for name, t in merged.items():
        want = (0.5 * ws[0][name].float() + 0.25 * ws[1][name].float() + 0.25 * ws[2][name].float()).to(t.dtype)
        assert t.dtype == ws[0][name].dtype and torch.equal(t, want), name


def test_merged_model_loads_and_generates(parents, tmp_path):
    a, b = parents
    merge_checkpoints([a, b], [0.6, 0.4], tmp_path / "out", class_weights={"routed_experts": [0.2, 0.8]})
    model = from_pretrained(tmp_path / "out")
    tokens = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5)
    assert tokens.shape == (1, 8)


def test_mismatched_parents_are_refused(parents, tmp_path):
    a, b = parents
    other = save_random(tmp_path / "other", 2, tiny_config(moe={"n_routed_experts": 8}))
    with pytest.raises(ValueError, match=r"another architecture.*moe\.n_routed_experts=8, the base has 4"):
        merge_checkpoints([a, other], [0.5, 0.5], tmp_path / "out")

    tensors = weights_on_disk(b)
    lacking = copy_with(b, tmp_path / "lacking", {n: t for n, t in tensors.items() if n != "lm_head.weight"})
    with pytest.raises(ValueError, match=r"lacks tensor 'lm_head\.weight'"):
        merge_checkpoints([a, lacking], [0.5, 0.5], tmp_path / "out")
    reshaped = {**tensors, "model.norm.weight": torch.ones(2, 16)}
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \[2, 16\], the base \[32\]"):
        merge_checkpoints([a, copy_with(b, tmp_path / "reshaped", reshaped)], [0.5, 0.5], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def weights_on_disk(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def copy_with(source: Path, target: Path, tensors: dict[str, torch.Tensor]) -> Path:
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weights=[1.0]), r"--weights has 1 value\(s\) for 2 parents"),
        (dict(weights=[1.0, float("nan")]), r"λ=nan is not a finite number"),
        (dict(weights=[1.0, 0.0], class_weights={"experts": [1.0, 0.0]}), r"unknown tensor class 'experts'"),
        (dict(weights=[1.0, 0.0], threshold=-1.0), r"threshold δ=-1.0 is invalid"),
    ],
)
def test_bad_options_are_refused(parents, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        merge_checkpoints(list(parents), out=tmp_path / "out", **kwargs)


def test_dry_run_prints_each_class_and_writes_nothing(parents, tmp_path, capsys):
    a, b = parents
    code = main(["merge", str(a), str(b), "--weights", "0.5", "0.5", "--expert-weights", "0", "1",
                 "--threshold", "0.5", "--dry-run"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    for name in ("routed_experts", "shared_experts", "router", "attention", "dense_mlp", "embeddings_norms"):
        assert name in out
    assert "mean d_2" in out and "kept" in out
    assert not any(tmp_path.iterdir())


def test_cli_merges_and_reports_errors(parents, tmp_path, capsys):
    a, b = parents
    out = tmp_path / "child"
    assert main(["merge", str(a), str(b), "--weights", "1", "0", "--class-weights", "attention", "0", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    merged, wb = weights(out), weights(b)
    assert torch.equal(merged["model.layers.1.self_attn.o_proj.weight"], wb["model.layers.1.self_attn.o_proj.weight"])
    capsys.readouterr()
    assert main(["merge", str(a), str(b), "--weights", "1", "--out", str(tmp_path / "x")]) == 1
    assert "deepmoe merge: error: --weights has 1 value(s) for 2 parents" in capsys.readouterr().err
    assert main(["merge", str(a), str(tmp_path / "missing"), "--weights", "1", "0", "--out", str(tmp_path / "x")]) == 1
    assert "deepmoe merge: error:" in capsys.readouterr().err
    assert main(["merge", str(a), str(b), "--weights", "1", "0"]) == 1
    assert "--out DIR is required" in capsys.readouterr().err
