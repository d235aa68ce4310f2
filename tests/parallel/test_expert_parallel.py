"""D1: the expert-parallel MoE layer over 2 and 4 gloo processes equals the single-process layer.

Semantics checked: on rank r, the layer with its experts sharded computes what the full layer computes on
rank r's tokens (routing, capacity and balance losses per rank's batch, n_devices = D). The single-process
reference runs the full layer on every rank's shard and sums the losses; its gradients are then those of
the expert-parallel run summed over the ranks (replicated weights) or sliced (each rank's experts). The
experts are DTensors sharded over the ranks: a rank's gradient (`to_local`) is its slice of the reference's,
and `full_tensor` gathers the whole reference gradient.

Each rank computes the reference itself (it holds the full weights and all tokens) and reports errors.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

# cpu_only: gloo process groups in subprocesses
pytestmark = pytest.mark.cpu_only

CASES = {
    "greedy": dict(scoring_func="softmax", aux_loss_alpha=0.01, device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02),
    "device-limited M=1": dict(topk_method="group_limited_greedy", topk_group=1, comm_aux_loss_alpha=0.02),
    "device-limited M=2, dropping": dict(
        topk_method="group_limited_greedy", topk_group=2, capacity_factor=0.6, capacity_scope="device",
        no_drop_fraction=0.5, comm_aux_loss_alpha=0.02,
    ),
    "V3 noaux_tc, dropping per expert": dict(
        scoring_func="sigmoid", topk_method="noaux_tc", topk_group=1, use_expert_bias=True, norm_topk_prob=True,
        routed_scaling_factor=2.5, capacity_factor=0.8, drop_policy="position", seq_aux_loss_alpha=0.01,
    ),
    "every token to rank 0 (others receive nothing)": dict(disable_other_ranks=True),
}  # fmt: skip
BATCH, SEQ, HIDDEN, EXPERTS = 2, 6, 16, 16


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (floor 1e-3: float32 precision of nearly cancelling sums)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-3))


def run_case(name: str, rank: int, world: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    from deepmoe import MoE, MoEConfig
    from deepmoe.parallel import apply_expert_parallel

    options = dict(CASES[name])
    only_rank_0 = options.pop("disable_other_ranks", False)
    if options.get("topk_method", "greedy") != "greedy":
        options["n_group"] = world
    config = MoEConfig(
        hidden_size=HIDDEN, moe_intermediate_size=8, n_routed_experts=EXPERTS, n_shared_experts=1,
        num_experts_per_tok=3, n_devices=world, **options,
    )  # fmt: skip
    torch.manual_seed(0)
    full = MoE(config).train()
    if only_rank_0:
        full.gate.set_expert_mask(disabled=range(EXPERTS // world, EXPERTS))
    if config.use_expert_bias:
        full.gate.e_score_correction_bias.copy_(torch.randn(EXPERTS) * 0.1)
    x = torch.randn(world * BATCH, SEQ, HIDDEN)
    upstream = torch.randn_like(x)
    shards = [slice(s * BATCH, (s + 1) * BATCH) for s in range(world)]

    ref = copy.deepcopy(full)
    ref_x = x.clone().requires_grad_()
    ref_out = [ref(ref_x[s]) for s in shards]
    sum((o.hidden_states * upstream[s]).sum() + o.aux_loss for o, s in zip(ref_out, shards, strict=True)).backward()

    ep = copy.deepcopy(full)
    apply_expert_parallel(ep)
    mine = x[shards[rank]].clone().requires_grad_()
    out = ep(mine)
    ((out.hidden_states * upstream[shards[rank]]).sum() + out.aux_loss).backward()

    errors = {
        "output": relative_error(out.hidden_states, ref_out[rank].hidden_states),
        "aux_loss": relative_error(out.aux_loss, ref_out[rank].aux_loss),
        "input grad": relative_error(mine.grad, ref_x.grad[shards[rank]]),
    }
    n_local, layouts = EXPERTS // world, {}
    for pname, p in ep.named_parameters():
        ref_grad = dict(ref.named_parameters())[pname].grad
        if pname.startswith("experts."):
            # this rank's slice (the local shard), and the whole [N_r, ...] gradient gathered over the ranks
            layouts[pname] = isinstance(p, DTensor) and isinstance(p.grad, DTensor) and p.placements == (Shard(0),)
            layouts[pname] = layouts[pname] and p.to_local().shape[0] == n_local and p.shape == ref_grad.shape
            if not layouts[pname]:
                continue
            errors[f"{pname} grad"] = relative_error(p.grad.to_local(), ref_grad[rank * n_local : (rank + 1) * n_local])
            errors[f"{pname} full grad"] = relative_error(p.grad.full_tensor(), ref_grad)
        else:
            grad = p.grad.clone()
            dist.all_reduce(grad)
            errors[f"{pname} grad"] = relative_error(grad, ref_grad)

    routing = out.routing
    kept = routing.kept if routing.kept is not None else torch.ones_like(routing.topk_idx, dtype=torch.bool)
    ranks_of_token = [set((routing.topk_idx[t][kept[t]] // n_local).tolist()) for t in range(len(kept))]
    traffic = ep.dispatcher.traffic
    return {
        "errors": errors,
        "expert_layouts": layouts,
        "rows_sent": traffic.rows_sent,
        "rows_received": traffic.rows_received,
        "remote_pairs": sum(len(r - {rank}) for r in ranks_of_token),
        "max_ranks_per_token": max(len(r) for r in ranks_of_token),
        "max_devices_per_token": ep.config.max_devices_per_token,
        "dropped": int((~kept).sum()),
        "forward_bytes": traffic.forward_bytes,
        "backward_bytes": traffic.backward_bytes,
    }


def worker(out: str) -> None:
    """One rank: every case, errors against the single-process reference, written to out/rank{r}.json."""
    from deepmoe.parallel import init_from_env
    from distributed import write_result

    torch.set_num_threads(1)
    rank, world = init_from_env("cpu")
    write_result(out, rank, {name: run_case(name, rank, world) for name in CASES})
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda d: f"{d} ranks")
def results(request, tmp_path_factory):
    from distributed import launch

    world = request.param
    return world, launch(world, __file__, [], tmp_path_factory.mktemp(f"ep{world}"))


@pytest.mark.parametrize("case", list(CASES))
def test_matches_single_process_layer(results, case):
    """Output, aux loss, input gradient and every weight gradient within 1e-5 of the single-process layer."""
    world, ranks = results
    for rank, result in enumerate(ranks):
        bad = {k: v for k, v in result[case]["errors"].items() if not v < 1e-5}
        assert not bad, f"rank {rank} of {world}, {case}: {bad}"


def test_experts_are_dtensors_sharded_over_the_ranks(results):
    """apply_expert_parallel keeps each expert tensor (gate_up_proj, down_proj) as a DTensor Shard(0) of the
    whole [N_r, ...] shape, this rank holding N_r/D experts, and its gradient a DTensor too."""
    world, ranks = results
    for rank, result in enumerate(ranks):
        layouts = result["greedy"]["expert_layouts"]
        assert sorted(layouts) == ["experts.down_proj", "experts.gate_up_proj"], f"rank {rank} of {world}"
        assert all(layouts.values()), f"rank {rank} of {world}: {layouts}"


@pytest.mark.parametrize("case", list(CASES))
def test_one_row_per_token_and_rank(results, case):
    """Each token is sent once to each other rank holding one of its kept experts, never once per expert;
    every row sent is received."""
    world, ranks = results
    for result in ranks:
        assert result[case]["rows_sent"] == result[case]["remote_pairs"]
    assert sum(r[case]["rows_sent"] for r in ranks) == sum(r[case]["rows_received"] for r in ranks)
    if "dropping" in case:
        assert sum(r[case]["dropped"] for r in ranks) > 0


def test_device_limited_routing_bounds_ranks(results):
    """R3 with n_group = D: a token reaches at most M = topk_group ranks (and B3's M is that bound)."""
    world, ranks = results
    for case, m in (("device-limited M=1", 1), ("device-limited M=2, dropping", 2)):
        for result in ranks:
            assert result[case]["max_devices_per_token"] == m
            assert result[case]["max_ranks_per_token"] <= m


def test_bytes_counted(results):
    """Forward: hidden rows + K gate weights (4 B each) + K int32 ids per row sent, counts, and the result rows
    returned; backward: the gradients of both exchanges."""
    world, ranks = results
    k = 3
    for result in ranks:
        r = result["greedy"]
        dispatch = r["rows_sent"] * ((HIDDEN + k) * 4 + k * 4) + (world - 1) * 8
        assert r["forward_bytes"] == dispatch + r["rows_received"] * HIDDEN * 4
        assert r["backward_bytes"] == r["rows_received"] * (HIDDEN + k) * 4 + r["rows_sent"] * HIDDEN * 4


if __name__ == "__main__":
    worker(sys.argv[1])
