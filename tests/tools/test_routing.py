"""collect_routing against counting the router's own outputs token by token."""

from __future__ import annotations

import pytest
import torch

from configs import tiny_preset
from deepmoe import DeepSeekForCausalLM
from deepmoe.tools.routing import collect_routing

# cpu_only: a checkpoint tool: files on disk, CPU loading, the CLI
pytestmark = pytest.mark.cpu_only


def test_sums_match_a_token_by_token_count():
    config = tiny_preset(num_hidden_layers=3, vocab_size=50)
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(config).eval()
    batches = [torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (1, 5))]
    got = collect_routing(model, batches, vocab=True)
    assert sorted(got) == [1, 2]
    for idx, layer in model.moe_layers().items():
        if idx >= config.num_hidden_layers:
            continue
        n = layer.config.n_routed_experts
        counts, coact, gate = torch.zeros(n, dtype=torch.long), torch.zeros(n, n, dtype=torch.long), torch.zeros(n)
        vocab = torch.zeros(50, n, dtype=torch.long)
        seen = []
        handle = layer.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.routing))
        for batch in batches:
            model(batch)
            routing = seen.pop()
            for t, (experts, weights) in enumerate(
                zip(routing.topk_idx.tolist(), routing.topk_weight.tolist(), strict=True)
            ):
                for e, w in zip(experts, weights, strict=True):
                    counts[e] += 1
                    gate[e] += w
                    vocab[batch.reshape(-1)[t], e] += 1
                    for f in experts:
                        coact[e, f] += 1
        handle.remove()
        r = got[idx]
        assert r.tokens == 19
        assert torch.equal(r.counts, counts) and torch.equal(r.coactivation, coact)
        assert torch.equal(r.token_expert, vocab)
        assert torch.allclose(r.gate_sum.float(), gate, rtol=1e-5)
        assert torch.allclose(r.distribution.sum(), torch.tensor(1.0, dtype=torch.float64))
