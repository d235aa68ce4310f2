"""The model under DistributedDataParallel and FSDP2, over 2 gloo processes.

Every rank holds a V3-like tiny model (MTP module, selection bias, noaux_tc) and trains on its shard of a global
batch; it also computes the single-process reference itself: the full model run shard by shard with the mean of
the shards' losses, whose gradient is the one data parallelism must produce.

- DDP over an expert-parallel model: each rank keeps its own experts (DDP neither broadcasts rank 0's nor
  averages different experts' gradients) and one step equals the expert-parallel step without DDP
  (`sync_gradients`) and the reference.
- DDP (find_unused_parameters=False) trains 2 steps without labels, although the MTP module only runs with them.
- FSDP2 over the decoder layers, built on the meta device: to_empty + reset_parameters + the reference's weights
  gives the reference's loss and gradients.
- update_expert_bias(process_group=...) makes every rank take the step of the global load.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

WORLD, BATCH, SEQ, VOCAB = 2, 2, 8, 64


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-3))


def tiny_model():
    from configs import tiny_model_config
    from deepmoe.model.decoder import DeepSeekForCausalLM

    moe = {"n_routed_experts": 8, "bias_update_speed": 0.01, "seq_aux_loss_alpha": 0.01}
    config = tiny_model_config(
        vocab_size=VOCAB, intermediate_size=64, q_lora_rank=None, moe=moe, num_nextn_predict_layers=1
    )
    torch.manual_seed(0)
    return DeepSeekForCausalLM(config).train()


def reference(full, ids):
    """The full model's SGD step on the mean of the shards' losses; returns (model, per-shard outputs, loads)."""
    ref = copy.deepcopy(full)
    outs = [ref(ids[r * BATCH : (r + 1) * BATCH], labels=ids[r * BATCH : (r + 1) * BATCH]) for r in range(WORLD)]
    (sum(o.loss for o in outs) / WORLD).backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    sgd(ref)
    loads = {i: sum(o.routing_stats[i].tokens_per_expert for o in outs) for i in outs[0].routing_stats}
    for i, layer in ref.moe_layers().items():
        layer.update_bias(loads[i])
    return ref, outs, grads


@torch.no_grad()
def sgd(model, lr: float = 0.5) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.sub_(lr * p.grad)
            p.grad = None


def biases(model) -> dict[int, torch.Tensor]:
    return {i: layer.gate.e_score_correction_bias for i, layer in model.moe_layers().items()}


def ddp_expert_parallel(rank: int) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from deepmoe import parallel

    full = tiny_model()
    ids = torch.randint(0, VOCAB, (WORLD * BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mine = ids[rank * BATCH : (rank + 1) * BATCH]
    ref, _, _ = reference(full, ids)

    plain = copy.deepcopy(full)  # expert parallelism without DDP: the project's own gradient sync
    plain.enable_expert_parallel()
    plain(mine, labels=mine).loss.backward()
    parallel.sync_gradients(plain)
    sgd(plain)

    model = copy.deepcopy(full)
    model.enable_expert_parallel()
    ddp = DDP(model)
    out = ddp(mine, labels=mine)
    out.loss.backward()
    parallel.scale_expert_gradients(model)
    sgd(model)
    model.update_expert_bias(out.routing_stats, process_group=dist.group.WORLD)

    errors, n_local = {}, 8 // WORLD
    ref_params, plain_params = dict(ref.named_parameters()), dict(plain.named_parameters())
    for name, p in model.named_parameters():
        expected = ref_params[name]
        if ".experts." in name:
            expected = expected[rank * n_local : (rank + 1) * n_local]
        errors[f"{name} vs reference"] = relative_error(p, expected)
        errors[f"{name} vs no DDP"] = relative_error(p, plain_params[name])
    ignored = getattr(model, "_ddp_params_and_buffers_to_ignore", [])
    return {
        "errors": errors,
        "ignored": sorted(ignored),
        "expert_names": sorted(n for n, _ in model.named_parameters() if ".experts." in n),
        "bias_equal": all(torch.equal(b, biases(ref)[i]) for i, b in biases(model).items()),
        "bias_moved": any(bool(b.abs().sum() > 0) for b in biases(model).values()),
    }


def ddp_without_labels(rank: int) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = tiny_model()
    ddp = DDP(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps, error = 0, None
    try:
        for step in range(2):
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(10 * step + rank))
            out = ddp(ids)  # no labels: the MTP module does not run
            loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    except RuntimeError as err:
        error = str(err)[:300]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everywhere = flat.clone()
    dist.all_reduce(everywhere)
    initial = tiny_model().model.mtp.parameters()
    mtp_unchanged = all(torch.equal(p, q) for p, q in zip(model.model.mtp.parameters(), initial, strict=True))
    return {
        "steps": steps,
        "error": error,
        "replicas_equal": bool(torch.allclose(everywhere, WORLD * flat, rtol=0, atol=1e-6)),
        "mtp_unchanged": mtp_unchanged,
    }


def fsdp2_meta(rank: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from deepmoe.model.decoder import DeepSeekForCausalLM

    full = tiny_model()
    ids = torch.randint(0, VOCAB, (WORLD * BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    mine = ids[rank * BATCH : (rank + 1) * BATCH]
    ref, ref_outs, ref_grads = reference(full, ids)

    with torch.device("meta"):
        model = DeepSeekForCausalLM(full.config)
    for block in [*model.model.layers, *model.model.mtp]:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    model.reset_parameters()
    set_model_state_dict(model, full.state_dict(), options=StateDictOptions(full_state_dict=True))
    model.train()
    out = model(mine, labels=mine)
    out.loss.backward()
    errors = {"loss": relative_error(out.loss.detach(), ref_outs[rank].loss.detach())}
    for name, p in model.named_parameters():
        errors[f"{name} grad"] = relative_error(p.grad.full_tensor(), ref_grads[name])
    model.update_expert_bias(out.routing_stats, process_group=dist.group.WORLD)
    bias_types = {type(b).__name__ for b in biases(model).values()}
    return {
        "errors": errors,
        "bias_equal": all(torch.equal(b, biases(ref)[i]) for i, b in biases(model).items()),
        "bias_types": sorted(bias_types),
    }


def worker(out: str) -> None:
    from deepmoe.parallel import init_from_env
    from distributed import write_result

    torch.set_num_threads(1)
    rank, world = init_from_env("cpu")
    assert world == WORLD
    result = {case.__name__: case(rank) for case in (ddp_expert_parallel, ddp_without_labels, fsdp2_meta)}
    write_result(out, rank, result)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from distributed import launch

    return launch(WORLD, __file__, [], tmp_path_factory.mktemp("ddp"), timeout=300)


def test_ddp_keeps_each_ranks_experts(ranks):
    """DDP(model) after enable_expert_parallel: the experts are marked for DDP to ignore; after one step each
    rank's experts are its own slice of the reference's, and every weight equals the run without DDP."""
    for rank, result in enumerate(ranks):
        r = result["ddp_expert_parallel"]
        assert r["ignored"] == r["expert_names"] and len(r["ignored"]) == 4  # 2 tensors × (layer 1, MTP block)
        bad = {k: v for k, v in r["errors"].items() if not v < 1e-5}
        assert not bad, f"rank {rank}: {bad}"


def test_update_bias_with_the_process_group_uses_the_global_load(ranks):
    for result in ranks:
        for case in ("ddp_expert_parallel", "fsdp2_meta"):
            assert result[case]["bias_equal"], case
        assert result["ddp_expert_parallel"]["bias_moved"]


def test_ddp_trains_without_labels(ranks):
    """find_unused_parameters=False, two steps without labels (the MTP module idle): no error, replicas equal,
    and the MTP weights unchanged (their gradient is 0)."""
    for result in ranks:
        r = result["ddp_without_labels"]
        assert r["error"] is None and r["steps"] == 2
        assert r["replicas_equal"] and r["mtp_unchanged"]


def test_fsdp2_built_on_meta_matches_the_reference(ranks):
    """fully_shard on each decoder layer and MTP module of a meta-built model, to_empty + reset_parameters +
    the full state dict: the reference's loss and (mean over ranks) gradients; the expert bias is a plain
    replicated buffer."""
    for rank, result in enumerate(ranks):
        r = result["fsdp2_meta"]
        bad = {k: v for k, v in r["errors"].items() if not v < 1e-5}
        assert not bad, f"rank {rank}: {bad}"
        assert r["bias_types"] == ["Tensor"]


if __name__ == "__main__":
    worker(sys.argv[1])
