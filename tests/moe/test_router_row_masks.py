"""Per-row expert masks (per-request steering): a row's mask routes that row exactly as the same global mask
routes it alone, leaves the other rows as unmasked, and is checked as `set_expert_mask` checks a mask."""

from __future__ import annotations

import pytest
import torch

from configs import tiny_moe, tiny_v3_moe
from deepmoe import MoE
from strategies import random_bias

ROWS = [({"disabled": [0, 3]}), ({}), ({"forced": [5]}), ({"disabled": [1], "forced": [2]})]


@pytest.mark.parametrize("make", [tiny_moe, tiny_v3_moe], ids=["greedy", "noaux_tc"])
def test_a_row_mask_equals_the_global_mask_on_that_row_alone(make):
    torch.manual_seed(0)
    layer = MoE(make()).eval()
    if layer.gate.e_score_correction_bias is not None:
        random_bias(layer, 0)
    x = torch.randn(len(ROWS), 5, 8)
    mask = layer.gate.row_mask([(row.get("disabled"), row.get("forced")) for row in ROWS])
    batched = layer(x, expert_mask=mask)
    for i, row in enumerate(ROWS):
        layer.gate.set_expert_mask(**row)
        alone = layer(x[i : i + 1])
        layer.gate.clear_expert_mask()
        assert torch.equal(batched.routing.topk_idx.view(len(ROWS), 5, -1)[i], alone.routing.topk_idx.view(5, -1))
        torch.testing.assert_close(batched.hidden_states[i], alone.hidden_states[0])


def test_row_masks_combine_with_the_global_mask():
    torch.manual_seed(0)
    layer = MoE(tiny_moe()).eval()
    x = torch.randn(2, 4, 8)
    layer.gate.set_expert_mask(disabled=[7])
    mask = layer.gate.row_mask([([0], None), (None, None)])
    chosen = layer(x, expert_mask=mask).routing.topk_idx.view(2, 4, -1)
    assert not (chosen[0] == 0).any() and not (chosen == 7).any()


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([([9], None)], "row 0 disabled experts .* out of range"),
        ([(None, [1, 2, 3])], "row 0: 3 forced experts exceed"),
        ([(None, None), ([1], [1])], "row 1: experts \\[1\\] are both disabled and forced"),
        ([(list(range(7)), None)], "row 0: disabling 7 .* fewer than num_experts_per_tok=2"),
    ],
)
def test_bad_row_masks_are_refused(rows, message):
    layer = MoE(tiny_moe())
    with pytest.raises(ValueError, match=message):
        layer.gate.row_mask(rows)


def test_a_row_mask_of_the_wrong_shape_is_refused():
    layer = MoE(tiny_moe())
    mask = layer.gate.row_mask([(None, None)])
    with pytest.raises(ValueError, match="expert_mask.disabled must be a bool tensor \\[2, 8\\]"):
        layer(torch.randn(2, 3, 8), expert_mask=mask)
