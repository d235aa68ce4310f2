"""Hypothesis runs derandomized: every CI run tries the same examples, so a red build is reproducible
(set HYPOTHESIS_PROFILE=explore locally to draw fresh examples). `one_thread`: for test modules of tiny
models (`pytestmark = pytest.mark.usefixtures("one_thread")`).

The device switch: `pytest --device cuda` runs the whole session under `torch.set_default_device("cuda")`,
so tests that build tensors and models without naming a device run on the GPU; tests marked `cpu_only`
(process groups over gloo, CLI subprocesses, files and memory maps, CPU kernels) are skipped there. The
default, `--device cpu`, changes nothing."""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="run the tests under torch.set_default_device(DEVICE); cuda skips the tests marked cpu_only",
    )


def pytest_configure(config):
    if config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            "--device cuda: no CUDA device is available (torch.cuda.is_available() is False); "
            "run without --device to test on the CPU"
        )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") == "cpu":
        return
    skip = pytest.mark.skip(reason="cpu_only: CPU-specific, skipped under --device cuda")
    for item in items:
        if item.get_closest_marker("cpu_only") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _default_device(request):
    """Session-wide (so module-scoped fixtures build their models on it too); nothing at all for cpu."""
    device = request.config.getoption("--device")
    if device == "cpu":
        yield
        return
    previous = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(previous)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is several times faster than two fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
