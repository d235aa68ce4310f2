"""`parallelize` (expert parallelism + FSDP2 or replication, on a `ParallelLayout` mesh) over 4 gloo processes.

Every rank holds a V3-like tiny model (8 routed experts, MTP module, selection bias, noaux_tc) and trains on its
share of a global batch; it also computes the single-process reference itself: the full model run share by share
with the mean of the shares' losses, whose gradient is the one every layout must produce. All cases run in one
launch (the same 4 processes, one mesh per case) to keep the suite fast.

- E in {1, 2, 4} x fsdp / replicate (and activation checkpointing): every gradient (`full_tensor`) is the
  reference's, `clip_grad_norm_` returns the reference's norm and clips like it, one SGD step gives the
  reference's weights, and each rank holds its share of the weights only.
- bf16 mixed precision (E=1; E=2 is an expected failure, a library bug): the loss is near the fp32 one;
  gradients and weights stay float32 DTensors.
- No labels (the MTP module idle) under FSDP2 + expert parallelism: two AdamW steps on the LM loss, the reference's
  weights, MTP weights untouched.
- A meta-device build parallelized, materialised and loaded from the full state dict: the reference's loss and
  gradients.
- update_expert_bias(process_group=...) makes every rank take the step of the global load.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

# cpu_only: gloo process groups in subprocesses
pytestmark = [pytest.mark.slow, pytest.mark.cpu_only]

WORLD, BATCH, SEQ, VOCAB, EXPERTS = 4, 2, 8, 64, 8
LR = 0.5
BF16_EXPERT_PARALLEL = (1, 2)
MATCH_CASES = {
    "E=1 fsdp": (1, "fsdp", False),
    "E=2 fsdp": (2, "fsdp", False),
    "E=4 fsdp": (4, "fsdp", False),
    "E=2 replicate": (2, "replicate", False),
    "E=4 replicate": (4, "replicate", False),
    "E=2 fsdp, activation checkpointing": (2, "fsdp", True),
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (floor 1e-3: float32 precision of nearly cancelling sums)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-3))


def tiny_model():
    from configs import tiny_model_config
    from deepmoe.model.decoder import DeepSeekForCausalLM

    moe = {"n_routed_experts": EXPERTS, "bias_update_speed": 0.01, "seq_aux_loss_alpha": 0.01}
    config = tiny_model_config(
        vocab_size=VOCAB, intermediate_size=64, q_lora_rank=None, moe=moe, num_nextn_predict_layers=1
    )
    torch.manual_seed(0)
    return DeepSeekForCausalLM(config).train()


def global_batch(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (WORLD * BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def share(ids: torch.Tensor, rank: int) -> torch.Tensor:
    return ids[rank * BATCH : (rank + 1) * BATCH]


def biases(model) -> dict[int, torch.Tensor]:
    return {i: layer.gate.e_score_correction_bias for i, layer in model.moe_layers().items()}


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def reference(full_model, ids):
    """The full model on each rank's share, the mean loss backward, clipping to half the norm, one SGD step and
    the bias step of the summed load. Returns what the cases compare against."""
    ref = copy.deepcopy(full_model)
    outs = [ref(share(ids, r), labels=share(ids, r)) for r in range(WORLD)]
    (sum(o.loss for o in outs) / WORLD).backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]))
    max_norm = norm / 2  # the step is clipped: a wrong clip factor shows in the weights
    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    torch.optim.SGD(ref.parameters(), lr=LR).step()
    loads = {i: sum(o.routing_stats[i].tokens_per_expert for o in outs) for i in outs[0].routing_stats}
    ref.update_expert_bias(loads)
    return {
        "losses": [o.loss.detach() for o in outs],
        "grads": grads,
        "norm": norm,
        "max_norm": max_norm,
        "weights": {n: p.detach().clone() for n, p in ref.named_parameters()},
        "biases": {i: b.clone() for i, b in biases(ref).items()},
    }


def held(model) -> dict:
    """Numel this rank holds (its local shards) and the model's full numel, split into experts and the rest, and
    the most padding FSDP2 may add (dim 0 rounded up to a multiple of the W shards: < W rows per tensor)."""
    from torch.distributed.tensor import DTensor

    counts = {"local": 0, "total": 0, "expert_local": 0, "expert_total": 0, "padding_bound": 0}
    for name, p in model.named_parameters():
        local = p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        counts["local"] += local
        counts["total"] += p.numel()
        counts["padding_bound"] += (WORLD - 1) * (p.numel() // p.shape[0])
        if ".experts." in name:
            counts["expert_local"] += local
            counts["expert_total"] += p.numel()
    return counts


def parallel_model(model, expert_parallel: int, data_parallel: str, **options):
    from deepmoe import parallel

    mesh = parallel.ParallelLayout(WORLD, expert_parallel, data_parallel).build_mesh("cpu")
    return parallel.parallelize(model, mesh, data_parallel=data_parallel, **options), mesh


def matches_reference(rank: int, ref: dict, full_model, ids, case: str) -> dict:
    """One case of MATCH_CASES: gradients, clip norm, the clipped SGD step and the bias step vs the reference."""
    from torch.distributed.tensor import DTensor

    from deepmoe.parallel import clip_grad_norm_

    expert_parallel, data_parallel, checkpointing = MATCH_CASES[case]
    model, mesh = parallel_model(
        copy.deepcopy(full_model), expert_parallel, data_parallel, activation_checkpointing=checkpointing
    )
    out = model(share(ids, rank), labels=share(ids, rank))
    out.loss.backward()
    errors = {"loss": relative_error(out.loss, ref["losses"][rank])}
    for name, p in model.named_parameters():
        errors[f"{name} grad"] = relative_error(full(p.grad), ref["grads"][name])
    norm = clip_grad_norm_(model.parameters(), ref["max_norm"])
    torch.optim.SGD(model.parameters(), lr=LR).step()
    for name, p in model.named_parameters():
        errors[f"{name} after the step"] = relative_error(full(p), ref["weights"][name])
    model.update_expert_bias(out.routing_stats, process_group=mesh.dp.get_group())
    return {
        "errors": errors,
        "norm": norm,
        "all_dtensors": all(isinstance(p, DTensor) and isinstance(p.grad, DTensor) for p in model.parameters()),
        "held": held(model),
        "bias_equal": all(torch.equal(b, ref["biases"][i]) for i, b in biases(model).items()),
    }


def bf16(rank: int, ref: dict, full_model, ids, expert_parallel: int) -> dict:
    """FSDP2 with bf16 compute: loss and gradients vs the fp32 reference, the dtypes of weights and gradients
    (an error is reported, not raised, so that the other cases still run)."""
    model, _ = parallel_model(copy.deepcopy(full_model), expert_parallel, "fsdp", bf16=True)
    try:
        out = model(share(ids, rank), labels=share(ids, rank))
    except (ValueError, RuntimeError) as err:
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    grad_error = relative_error(
        torch.cat([full(g).reshape(-1) for g in grads]), torch.cat([g.reshape(-1) for g in ref["grads"].values()])
    )
    return {
        "error": None,
        "loss_error": relative_error(out.loss, ref["losses"][rank]),
        "grad_error": grad_error,
        "grad_types": sorted({f"{type(g).__name__} {g.dtype}" for g in grads}),
        "weight_types": sorted({f"{type(p).__name__} {p.dtype}" for p in model.parameters()}),
    }


def lm_loss(out, ids):
    import torch.nn.functional as F

    return F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()) + out.aux_loss


def without_labels(rank: int, full_model) -> dict:
    """E=2, FSDP2, two AdamW steps on the LM loss of a forward without labels (the MTP module does not run) vs
    the reference's two steps on the mean of the shares' losses."""
    adamw = dict(lr=1e-2, eps=1e-3)  # eps well above float32 noise in the gradients: the step is comparable
    ref = copy.deepcopy(full_model)
    ref_optimizer = torch.optim.AdamW(ref.parameters(), **adamw)
    model, _ = parallel_model(copy.deepcopy(full_model), 2, "fsdp")
    optimizer = torch.optim.AdamW(model.parameters(), **adamw)
    steps, error, mtp_grads = 0, None, None
    for step in range(2):
        ids = global_batch(10 + step)
        (sum(lm_loss(ref(share(ids, r)), share(ids, r)) for r in range(WORLD)) / WORLD).backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        try:
            lm_loss(model(share(ids, rank)), share(ids, rank)).backward()
            mtp_grads = sorted(
                {
                    "none" if p.grad is None else "zero" if not full(p.grad).any() else "nonzero"
                    for name, p in model.named_parameters()
                    if name.startswith("model.mtp.")
                }
            )
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
        except RuntimeError as err:
            error = str(err)[:500]
            break
    errors = {}
    if error is None:
        ref_weights = dict(ref.named_parameters())
        errors = {name: relative_error(full(p), ref_weights[name]) for name, p in model.named_parameters()}
    initial = dict(full_model.named_parameters())
    mtp = [(name, p) for name, p in model.named_parameters() if name.startswith("model.mtp.")]
    return {
        "steps": steps,
        "error": error,
        "errors": errors,
        "mtp_tensors": len(mtp),
        "mtp_grads": mtp_grads,
        "mtp_unchanged": all(torch.equal(full(p), initial[name]) for name, p in mtp),
    }


def meta_build(rank: int, ref: dict, full_model, ids) -> dict:
    """Built on the meta device, parallelized (E=2, FSDP2), to_empty + reset_parameters + the full state dict:
    the reference's loss and gradients; the expert bias stays a plain buffer."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from deepmoe.model.decoder import DeepSeekForCausalLM

    with torch.device("meta"):
        model = DeepSeekForCausalLM(full_model.config)
    model, _ = parallel_model(model, 2, "fsdp")
    model.to_empty(device="cpu")
    model.reset_parameters()
    set_model_state_dict(model, full_model.state_dict(), options=StateDictOptions(full_state_dict=True))
    model.train()
    out = model(share(ids, rank), labels=share(ids, rank))
    out.loss.backward()
    errors = {"loss": relative_error(out.loss, ref["losses"][rank])}
    for name, p in model.named_parameters():
        errors[f"{name} grad"] = relative_error(full(p.grad), ref["grads"][name])
    unchanged = {i: b.clone() for i, b in biases(full_model).items()}
    model.update_expert_bias(out.routing_stats, process_group=dist.group.WORLD)
    return {
        "errors": errors,
        "bias_types": sorted({type(b).__name__ for b in biases(model).values()}),
        "bias_equal": all(torch.equal(b, ref["biases"][i]) for i, b in biases(model).items()),
        "bias_moved": any(not torch.equal(b, unchanged[i]) for i, b in biases(model).items()),
    }


def worker(out: str) -> None:
    """One rank: the reference once, then every case; results to out/rank{r}.json."""
    from deepmoe.parallel import init_from_env
    from distributed import write_result

    torch.set_num_threads(1)
    rank, world = init_from_env("cpu")
    assert world == WORLD
    full_model = tiny_model()
    ids = global_batch(1)
    ref = reference(full_model, ids)
    result = {case: matches_reference(rank, ref, full_model, ids, case) for case in MATCH_CASES}
    for e in BF16_EXPERT_PARALLEL:
        result[f"bf16 E={e}"] = bf16(rank, ref, full_model, ids, e)
    result["without labels"] = without_labels(rank, full_model)
    result["meta"] = meta_build(rank, ref, full_model, ids)
    result["reference norm"] = ref["norm"]
    write_result(out, rank, result)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from distributed import launch

    return launch(WORLD, __file__, [], tmp_path_factory.mktemp("parallelize"), timeout=300)


def bad(errors: dict, tolerance: float = 1e-5) -> dict:
    return {k: v for k, v in errors.items() if not v < tolerance}


@pytest.mark.parametrize("case", list(MATCH_CASES))
def test_gradients_and_step_match_the_reference(ranks, case):
    """Loss, every gradient (gathered) and every weight after the clipped SGD step within 1e-5 of the reference:
    FSDP2's / replicate's reduction with the experts' divide factor W gives the gradient of the mean loss."""
    for rank, result in enumerate(ranks):
        r = result[case]
        assert r["all_dtensors"], f"rank {rank}: a parameter or gradient is not a DTensor"
        assert not bad(r["errors"]), f"rank {rank}, {case}: {bad(r['errors'])}"


@pytest.mark.parametrize("case", list(MATCH_CASES))
def test_clip_norm_is_the_reference_norm(ranks, case):
    """clip_grad_norm_ over DTensors on several meshes returns the global norm, the same on every rank."""
    for rank, result in enumerate(ranks):
        expected = result["reference norm"]
        assert result[case]["norm"] == pytest.approx(expected, rel=1e-5), f"rank {rank}"


@pytest.mark.parametrize("case", list(MATCH_CASES))
def test_each_rank_holds_its_share(ranks, case):
    """fsdp: the ranks' local numels add up to the model's (up to FSDP2's padding) and each holds about 1/W;
    replicate: each rank holds the dense weights whole and 1/E of the experts."""
    expert_parallel, data_parallel, _ = MATCH_CASES[case]
    counts = [result[case]["held"] for result in ranks]
    total = counts[0]["total"]
    if data_parallel == "fsdp":
        summed = sum(c["local"] for c in counts)
        assert total <= summed <= total + counts[0]["padding_bound"], (summed, total)
        for rank, c in enumerate(counts):
            assert abs(c["local"] / total - 1 / WORLD) < 0.02, f"rank {rank}: {c['local']} of {total}"
    else:
        dense = total - counts[0]["expert_total"]
        for rank, c in enumerate(counts):
            assert c["local"] == dense + counts[0]["expert_total"] // expert_parallel, f"rank {rank}: {c}"


def test_update_bias_with_the_process_group_uses_the_global_load(ranks):
    """update_expert_bias(stats, process_group) sums the ranks' loads: every rank takes the reference's step
    (the same bias everywhere), and the step moved the bias."""
    for rank, result in enumerate(ranks):
        for case in (*MATCH_CASES, "meta"):
            assert result[case]["bias_equal"], f"rank {rank}, {case}"
        assert result["meta"]["bias_moved"]


@pytest.mark.parametrize(
    "expert_parallel",
    [1, 2],
    ids=lambda e: f"E={e}",
)  # fmt: skip
def test_bf16_mixed_precision(ranks, expert_parallel):
    """bf16=True: bf16 compute gives a loss within 2e-2 of the fp32 reference and gradients within 5e-2; the
    weights and their gradients stay float32 DTensors (fp32 reduction and optimizer state)."""
    for rank, result in enumerate(ranks):
        r = result[f"bf16 E={expert_parallel}"]
        assert r["error"] is None, f"rank {rank}: {r['error']}"
        assert r["loss_error"] < 2e-2 and r["grad_error"] < 5e-2, f"rank {rank}: {r}"
        assert r["grad_types"] == ["DTensor torch.float32"]
        assert r["weight_types"] == ["DTensor torch.float32"]


def test_fsdp2_trains_without_labels(ranks):
    """No labels: the MTP unit never runs forward, yet two steps complete (no hang, no error), equal the
    reference's AdamW steps, and leave the MTP weights as they were (no gradient, so no weight decay either)."""
    for rank, result in enumerate(ranks):
        r = result["without labels"]
        assert r["error"] is None and r["steps"] == 2, f"rank {rank}: {r['error']}"
        assert not bad(r["errors"]), f"rank {rank}: {bad(r['errors'])}"
        assert r["mtp_grads"] == ["none"] and r["mtp_tensors"] > 0 and r["mtp_unchanged"]


def test_meta_build_matches_the_reference(ranks):
    """A meta-device model parallelized then materialised (to_empty + reset_parameters + the full state dict):
    the reference's loss and gradients; the expert bias is a plain replicated buffer."""
    for rank, result in enumerate(ranks):
        r = result["meta"]
        assert not bad(r["errors"]), f"rank {rank}: {bad(r['errors'])}"
        assert r["bias_types"] == ["Tensor"]


if __name__ == "__main__":
    worker(sys.argv[1])
