import os

import pytest
from hypothesis import HealthCheck, settings

# CI has 2 cores: keep property tests modest and free of wall-clock deadlines
settings.register_profile(
    "aecore", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "aecore"))


@pytest.fixture
def tmp_dir(tmp_path):
    return tmp_path
