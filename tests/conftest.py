"""Hypothesis runs derandomized: every CI run tries the same examples, so a red build is reproducible
(set HYPOTHESIS_PROFILE=explore locally to draw fresh examples)."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
