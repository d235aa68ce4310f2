"""Hypothesis runs derandomized: every CI run tries the same examples, so a red build is reproducible
(set HYPOTHESIS_PROFILE=explore locally to draw fresh examples). `one_thread`: for test modules of tiny
models (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is several times faster than two fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
