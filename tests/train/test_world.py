"""The small world's short run (issue 12): moa_train trains MoA briefly on the world's prior, and on
held-out scenes the routers send the background to the prior and the subjects to the personal
expert (the failure the tiny-model proof showed for some seeds was a constant router).

The prior is the one shipped in the repository (moa_world/assets/prior)."""

import pytest

from moa_testing.world import SHORT_STEPS, held_out_router, short_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """MoA weights of the short run (run and data seed 0) and the world's models (one thread: conftest)."""
    return short_run(tmp_path_factory.mktemp("world_moa"), seed=0)


def test_routers_learn_the_subject_on_held_out_scenes(trained):
    # world 2's shipped prior, runs of seeds 0-3 (fuser 128 wide): r0 background 0.746-0.753 (sd
    # 0.003), subject 0.228-0.249 (sd 0.009), background - subject 0.503-0.521 (sd 0.008); the floors
    # sit about 15 sd below the worst run (a constant router, the failure, leaves them within 0.2)
    router = held_out_router(trained)
    assert router["prior_background"] > BACKGROUND_FLOOR
    assert router["prior_subject"] < router["prior_background"] - SEPARATION


BACKGROUND_FLOOR = 0.7
SEPARATION = 0.4
assert SHORT_STEPS <= 200  # a few minutes on 2 cores
