"""Model FLOPs utilisation of a run (MFU): model FLOPs per trained token (`deepmoe.model.parameters.
training_flops_per_token`) × tokens/s over the peak FLOPs of the devices. The peak is `--peak-tflops`, or the
dense bf16 peak of a known GPU (spec-sheet figures, without sparsity); none on a CPU unless given."""

from __future__ import annotations

import torch

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                    "L4": 121.0}  # fmt: skip
"""Dense bf16 tensor-core peak (TFLOP/s) per GPU, by a name that occurs in `torch.cuda.get_device_name()`."""


def device_peak_tflops(device: torch.device, given: float | None = None) -> float | None:
    """`given`, else the known peak of a CUDA device (the first table name in its name), else None."""
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def model_flops_utilisation(tokens_per_s: float, flops_per_token: float, peak_tflops: float, devices: int) -> float:
    """Achieved model FLOP/s (every device's tokens) over the peak of all `devices`: a fraction in [0, 1]."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12 * devices)
