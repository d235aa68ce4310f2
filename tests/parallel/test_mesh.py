"""`ParallelLayout.check`: a layout that cannot run is refused before any process group or mesh exists, with a
`LayoutError` naming the offending value; a layout that can run passes. In-process, no ranks launched."""

from __future__ import annotations

import pytest

from configs import tiny_model_config
from deepmoe.parallel import LayoutError, ParallelLayout

# cpu_only: CPU device meshes over gloo
pytestmark = pytest.mark.cpu_only


def pyramid(counts: list[int], **overrides):
    """A Pyramid-MoE tiny model: one dense layer, then MoE layers with `counts` experts; MTP keeps moe's 4."""
    return tiny_model_config(num_hidden_layers=1 + len(counts), moe_experts_per_layer=[0, *counts], **overrides)


@pytest.mark.parametrize(
    ("layout", "config", "batch_size"),
    [
        (ParallelLayout(4), None, None),
        (ParallelLayout(4, 2, "fsdp"), tiny_model_config(), 8),
        (ParallelLayout(8, 4, "replicate"), tiny_model_config(), 8),
        (ParallelLayout(6, 3), tiny_model_config(moe={"n_routed_experts": 6}), 12),
        (ParallelLayout(8, 4), pyramid([4, 8, 12]), 16),
        (ParallelLayout(4, 1), pyramid([6, 10]), 4),  # no expert parallelism: any N_r
        (ParallelLayout(1), tiny_model_config(), 3),
    ],
    ids=["defaults", "E=2 of 4", "E=4 of 8, replicate", "E=3 of 6", "pyramid, E=4", "pyramid, E=1", "one rank"],
)
def test_valid_layouts_pass(layout, config, batch_size):
    """E divides W and every layer's N_r, the batch splits over W: no error."""
    layout.check(config, batch_size)


@pytest.mark.parametrize(
    ("layout", "config", "batch_size", "named"),
    [
        (ParallelLayout(4, 3), None, None, r"expert_parallel=3 must divide the 4 ranks"),
        (ParallelLayout(6, 4), tiny_model_config(), 12, r"expert_parallel=4 must divide the 6 ranks"),
        (
            ParallelLayout(8, 8),
            tiny_model_config(),
            8,
            r"expert_parallel=8 must divide the 4 routed experts of layer 1",
        ),
        (
            ParallelLayout(8, 4),
            pyramid([4, 6]),
            8,
            r"expert_parallel=4 must divide the 6 routed experts of layer 2",
        ),
        (
            ParallelLayout(8, 8),
            pyramid([8, 16], num_nextn_predict_layers=1),
            8,
            r"expert_parallel=8 must divide the 4 routed experts of layer 3",  # the MTP module keeps moe's N_r
        ),
        (ParallelLayout(4), tiny_model_config(), 6, r"batch_size=6 .* divisible by the 4 ranks"),
        (ParallelLayout(4, 2), tiny_model_config(), 2, r"batch_size=2 .* divisible by the 4 ranks"),
        (ParallelLayout(4, 1, "ddp"), None, None, r"data_parallel='ddp' is not one of fsdp, replicate"),
        (ParallelLayout(4, 0), None, None, r"expert_parallel \(0\) must be at least 1"),
        (ParallelLayout(0), None, None, r"world size \(0\)"),
    ],
    ids=[
        "E does not divide W",
        "E does not divide W, with a model",
        "E does not divide N_r",
        "E does not divide a pyramid layer's N_r",
        "E does not divide the MTP module's N_r",
        "batch not divisible by W",
        "batch below W",
        "unknown data_parallel",
        "E=0",
        "W=0",
    ],
)
def test_invalid_layouts_name_the_value(layout, config, batch_size, named):
    """Each impossible layout raises LayoutError (a ValueError) whose message names the value at fault."""
    with pytest.raises(LayoutError, match=named) as caught:
        layout.check(config, batch_size)
    assert isinstance(caught.value, ValueError)


def test_build_mesh_checks_the_layout_first():
    """build_mesh refuses an impossible layout before touching torch.distributed (no process group here)."""
    with pytest.raises(LayoutError, match=r"expert_parallel=3 must divide the 4 ranks"):
        ParallelLayout(4, 3).build_mesh("cpu")
