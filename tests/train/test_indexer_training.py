"""Training DSA's lightning indexer as DeepSeek-V3.2 did: its KL to the main attention against the formula (the
attention probabilities recomputed head by head here), the dense warm-up (attention dense, only the indexers train),
sparse training (the indexers trained by their KL alone, the model by the LM loss alone; checked with autograd.grad
on each term), the KL falling on a fixed batch, and `deepmoe train --sparse-attention dsa` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

import configs
from corpora import StandInCorpus
from deepmoe.cli import main
from deepmoe.config import DeepSeekConfig
from deepmoe.model.attention import MultiHeadLatentAttention
from deepmoe.model.decoder import DeepSeekForCausalLM
from deepmoe.model.rope import apply_rotary
from deepmoe.train import TrainConfig, train
from deepmoe.train import trainer as trainer_module
from deepmoe.train.config import build_model_config, build_optimizer
from deepmoe.train.step import optimizer_step
from reference import randomise_parameters

pytestmark = [pytest.mark.cpu_only, pytest.mark.usefixtures("one_thread")]


def v32_config(**overrides) -> DeepSeekConfig:
    """tests/configs.py's v32_config with one MTP module and an indexer of 4 heads."""
    return configs.v32_config(**{"index_n_heads": 4, "num_nextn_predict_layers": 1, **overrides})


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _split(model: DeepSeekForCausalLM) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(the indexers' parameters, all the others)."""
    indexer = model.indexer_parameters()
    held = {id(p) for p in indexer}
    return indexer, [p for p in model.parameters() if id(p) not in held]


# ---- the KL against its formula ----------------------------------------------------------------


def _reference_kl(attn: MultiHeadLatentAttention, x: torch.Tensor, positions: torch.Tensor, warmup: bool) -> float:
    """(1/(B·S)) Σ_t KL(p_t ‖ softmax(I_t)) over S_t: every s <= t (warm-up) or the top-k of I_t; p_t = (1/n) Σ_h
    softmax_s(q_{t,h}·k_{s,h} · scale) over S_t, one query, head and key at a time, in float64."""
    bsz, seqlen, _ = x.shape
    n, d_n, d_r = attn.n_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
    with torch.no_grad():
        c_q = attn.q_a_layernorm(attn.q_a_proj(x))
        q = attn.q_b_proj(c_q).view(bsz, seqlen, n, d_n + d_r)
        cos, sin = attn.rotary(positions)
        q = torch.cat((q[..., :d_n], apply_rotary(q[..., d_n:], cos, sin, attn.rope_interleave)), -1).double()
        c_kv, k_r = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, d_r], -1)
        k_r = apply_rotary(k_r.unsqueeze(2), cos, sin, attn.rope_interleave)  # [B, S, 1, d_r]
        k_n = attn.kv_b_proj(attn.kv_a_layernorm(c_kv)).view(bsz, seqlen, n, -1)[..., :d_n]
        k = torch.cat((k_n, k_r.expand(-1, -1, n, -1)), -1).double()
        index = attn.indexer.scores(x, c_q, attn.indexer.keys(x, cos, sin), cos, sin).double()  # I [B, S, S]
    total = 0.0
    for b in range(bsz):
        for t in range(seqlen):
            row = index[b, t, : t + 1].tolist()
            keys = range(t + 1)
            if not warmup:
                keys = sorted(range(t + 1), key=lambda s: -row[s])[: attn.indexer.index_topk]
            p = {s: 0.0 for s in keys}
            for h in range(n):
                logits = {s: float(q[b, t, h] @ k[b, s, h]) * attn.softmax_scale for s in keys}
                top = max(logits.values())
                norm = sum(math.exp(v - top) for v in logits.values())
                for s in keys:
                    p[s] += math.exp(logits[s] - top) / norm / n
            top = max(row[s] for s in keys)
            log_norm = top + math.log(sum(math.exp(row[s] - top) for s in keys))
            total += sum(p[s] * (math.log(p[s]) - (row[s] - log_norm)) for s in keys if p[s] > 0)
    return total / (bsz * seqlen)


@pytest.mark.parametrize("warmup", [True, False], ids=["dense-warmup", "sparse"])
def test_indexer_kl_equals_the_formula(warmup):
    config = v32_config(index_topk=3)
    attn = MultiHeadLatentAttention(config, 0).train()
    randomise_parameters(attn, 1, bias_std=None)
    attn.indexer_warmup = warmup
    x, positions = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2)), torch.arange(9)
    out = attn(x, positions)
    kl = attn.take_indexer_loss()
    assert kl is not None and attn.indexer_loss is None
    assert kl.item() > 1e-3  # far from 0: the check means something
    assert kl.item() == pytest.approx(_reference_kl(attn, x, positions, warmup), rel=1e-4)
    # the warm-up attends densely: as a selection of every key (k = the sequence) does
    attn.indexer_warmup, attn.indexer.index_topk = False, 9 if warmup else 3
    torch.testing.assert_close(out, attn(x, positions), rtol=0, atol=0)
    attn.eval()
    attn(x, positions)
    assert attn.take_indexer_loss() is None  # eval mode: no KL


# ---- what each loss trains -----------------------------------------------------------------------


def _grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True))


def test_the_indexers_learn_from_their_kl_alone_and_the_model_from_the_lm_loss_alone():
    """Sparse training: the LM (and MTP, aux) loss never reaches an indexer, the KL never reaches the model."""
    model = DeepSeekForCausalLM(v32_config()).train()
    randomise_parameters(model, 0, bias_std=None)
    indexer, main_params = _split(model)
    ids = _ids(2, 12)
    out = model(ids, labels=ids)
    assert out.indexer_loss is not None and out.indexer_loss.item() > 1e-3
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.mtp_loss + out.indexer_loss)
    for term in (out.lm_loss, out.mtp_loss, out.aux_loss):
        assert not term.requires_grad or all(g is None for g in _grads(term, indexer))
    assert all(g is None for g in _grads(out.indexer_loss, main_params))
    # every indexer (both main layers and the MTP block) and each of its tensors learns from the KL
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(out.indexer_loss, indexer))
    assert len(model.indexed_attention()) == 3
    assert any(g is not None and g.abs().sum() > 0 for g in _grads(out.lm_loss, main_params))


def test_the_dense_warmup_trains_only_the_indexers():
    """Warm-up: dense attention (the LM loss cannot reach an indexer even through the selection), and one step of
    the trainer's recipe (all but the indexers frozen, the step on the KL) changes the indexers and nothing else."""
    model = DeepSeekForCausalLM(v32_config()).train()
    randomise_parameters(model, 0, bias_std=None)
    indexer, main_params = _split(model)
    model.set_indexer_warmup(True)
    ids = _ids(2, 12)
    out = model(ids, labels=ids)
    assert all(g is None for g in _grads(out.lm_loss, indexer))
    assert all(g is None for g in _grads(out.indexer_loss, main_params))
    dense = DeepSeekForCausalLM(v32_config(index_topk=12)).train()  # k = the sequence: every key selected
    dense.load_state_dict(model.state_dict())
    torch.testing.assert_close(out.logits, dense(ids, labels=ids).logits, rtol=0, atol=0)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in main_params:
        p.requires_grad_(False)
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    optimizer_step(model, optimizer, [ids], max_norm=1.0, loss=lambda o: o.indexer_loss)
    held = {id(p) for p in indexer}
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (id(p) in held), name


def test_the_warmup_kl_falls_on_a_fixed_batch():
    """A few warm-up steps of the library loop (`optimizer_step` on the KL, the indexers' parameters only)."""
    model = DeepSeekForCausalLM(v32_config()).train()
    randomise_parameters(model, 0, bias_std=None)
    model.set_indexer_warmup(True)
    indexer, main_params = _split(model)
    for p in main_params:
        p.requires_grad_(False)
    optimizer = build_optimizer(indexer, lr=1e-2, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    ids = _ids(4, 16, seed=3)
    losses = [
        optimizer_step(model, optimizer, [ids], max_norm=1.0, loss=lambda o: o.indexer_loss).losses[0] for _ in range(8)
    ]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


# ---- the options and the run ---------------------------------------------------------------------


def _options(out, **overrides) -> TrainConfig:
    options = dict(preset="tiny-v3", layers=2, hidden_size=32, seq_len=16, batch_size=2, steps=2, warmup_steps=1,
                   eval_every=0, save_every=0, keep_last=0, progress=False, out=str(out), sparse_attention="dsa",
                   index_topk=8, indexer_warmup=2)  # fmt: skip
    return TrainConfig(**{**options, **overrides})


def _corpus() -> StandInCorpus:
    g = torch.Generator().manual_seed(0)
    return StandInCorpus(torch.randint(0, 64, (4000,), generator=g), torch.randint(0, 64, (200,), generator=g))


def test_dsa_turns_an_mla_preset_into_deepseek_v32(tmp_path):
    config = build_model_config(_options(tmp_path), 64)
    assert (config.model_type, config.index_topk, config.index_head_dim, config.index_n_heads) == (
        "deepseek_v32", 8, 32, 2
    )  # fmt: skip
    assert (
        build_model_config(_options(tmp_path, preset="tiny-v32", sparse_attention=None, index_topk=5), 64).index_topk
        == 5
    )  # noqa: E501
    assert not build_model_config(_options(tmp_path, sparse_attention=None, index_topk=None), 64).has_indexer


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "tiny-deepseek-moe", "--sparse-attention", "dsa", "--index-topk", "8"],
         "--sparse-attention='dsa' is invalid: preset 'tiny-deepseek-moe' uses multi-head attention"),
        (["--preset", "tiny-v2", "--sparse-attention", "dsa", "--index-topk", "8"],
         "--sparse-attention='dsa' is invalid: preset 'tiny-v2' has no query compression"),
        (["--preset", "tiny-v3", "--sparse-attention", "dsa"], "--index-topk is needed with --sparse-attention"),
        (["--preset", "tiny-v3", "--index-topk", "8"], "add one with --sparse-attention='dsa'"),
        (["--preset", "tiny-v3", "--indexer-warmup", "2"], "--indexer-warmup=2 is invalid: the model has no"),
        (["--preset", "tiny-v32", "--index-topk", "16"], "--index-topk=16 is invalid: must be below seq_len=16"),
        (["--preset", "tiny-v32", "--sparse-attention", "dsa", "--seq-len", "8"],
         "preset 'tiny-v32''s index_topk=8 is not below --seq-len=8"),
    ],
)  # fmt: skip
def test_bad_dsa_options_are_one_error_naming_the_flag(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(trainer_module, "load_corpus", lambda config, corpus, *rest: _corpus())
    common = ["train", "--layers", "2", "--hidden", "32", "--seq-len", "16", "--batch-size", "2", "--steps", "1",
              "--out", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    assert main(common + argv) == 1
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err


def test_deepmoe_train_warms_up_the_indexers_then_trains_sparse(tmp_path, monkeypatch):
    """`--indexer-warmup 3 --steps 6`: steps 1-3 train the indexers alone (the other weights and the routing
    bias stay those the run started with), steps 4-6 everything; the checkpoint is a deepseek_v32 model."""
    monkeypatch.setattr(trainer_module, "load_corpus", lambda config, corpus, *rest: _corpus())
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny-v3", "--sparse-attention", "dsa", "--index-topk", "8", "--indexer-warmup",
            "3", "--steps", "6", "--layers", "2", "--hidden", "32", "--seq-len", "16", "--batch-size", "2",
            "--warmup-steps", "1", "--eval-every", "0", "--save-every", "3", "--keep-last", "0",
            "--final-eval-batches", "1", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["indexer_loss"] > 0 for r in records)
    assert all(r["loss"] == pytest.approx(r["indexer_loss"]) for r in records[:3])  # the warm-up trains the KL
    assert all(r["loss"] > r["lm_loss"] for r in records[3:])  # then LM + aux + MTP + KL
    saved = json.loads((out / "step-3" / "config.json").read_text())
    assert (saved["model_type"], saved["index_topk"]) == ("deepseek_v32", 8)

    torch.manual_seed(0)  # the run's seed: its initial weights
    config = build_model_config(_options(out, layers=2, hidden_size=32), 64, 0)
    initial = DeepSeekForCausalLM(config).state_dict()
    for step, warm in (("step-3", True), ("step-6", False)):
        tensors = DeepSeekForCausalLM.from_pretrained(out / step).state_dict()
        changed = {name for name, value in initial.items() if not torch.equal(tensors[name], value)}
        assert any(".indexer." in name for name in changed), step
        assert all(".indexer." in name for name in changed) == warm, sorted(changed)


def test_init_from_a_dense_checkpoint_adds_indexers_to_its_weights(tmp_path):
    """V3.2's own recipe: a trained V3-style model gets new indexers; the warm-up leaves its weights as they were."""
    dense = train(_options(tmp_path / "dense", sparse_attention=None, index_topk=None, indexer_warmup=0, steps=1),
                  _corpus())  # fmt: skip
    options = dict(init_from=str(dense.checkpoint), seq_len=16, batch_size=2, steps=1, warmup_steps=1, eval_every=0,
                   save_every=0, progress=False, final_eval_batches=1, sparse_attention="dsa", index_topk=8,
                   indexer_warmup=1)  # fmt: skip
    result = train(TrainConfig(**options, out=str(tmp_path / "dsa")), _corpus())
    before = DeepSeekForCausalLM.from_pretrained(dense.checkpoint).state_dict()
    after = DeepSeekForCausalLM.from_pretrained(result.checkpoint)
    assert after.config.model_type == "deepseek_v32" and after.config.index_topk == 8
    new = {name for name in after.state_dict() if name not in before}
    assert new and all(".indexer." in name for name in new)
    assert all(torch.equal(value, before[name]) for name, value in after.state_dict().items() if name in before)
