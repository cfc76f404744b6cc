"""Group-relative advantages against numpy transcriptions of TRL's formulas: each scale_rewards mode,
reward weights, NaN (None) rewards, groups of equal rewards, and bad shapes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openr1_jax.errors import UserError
from openr1_jax.rl.advantages import Advantages, group_advantages


def trl_reference(rewards_NxF, weights_F, G, scale_rewards):
    """TRL's _generate_and_score_completions advantage block (sum_then_normalize), in float64 numpy."""
    rewards = np.nansum(rewards_NxF * weights_F[None, :], axis=1)
    mean = np.repeat(rewards.reshape(-1, G).mean(axis=1), G)
    advantages = rewards - mean
    if scale_rewards in ("group", "none"):
        std = np.repeat(rewards.reshape(-1, G).std(axis=1, ddof=1), G)
    else:
        std = np.full_like(rewards, rewards.std(ddof=1))
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return advantages, rewards, mean, std


REWARDS = np.array(
    [
        [1.0, 0.5],
        [0.0, 1.0],
        [1.0, np.nan],  # the second function could not score this completion
        [0.0, 0.0],
        [2.0, 1.0],
        [0.5, np.nan],
        [np.nan, np.nan],  # nothing could score it: total 0, as TRL's nansum
        [3.0, 0.25],
    ]
)
WEIGHTS = np.array([1.0, 0.5])


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_matches_trl_for_each_scale_rewards_mode(mode):
    got = group_advantages(REWARDS, WEIGHTS, num_generations=4, scale_rewards=mode)
    adv, rewards, mean, std = trl_reference(REWARDS, WEIGHTS, 4, mode)
    np.testing.assert_allclose(got.advantages_N, adv, rtol=1e-6)
    np.testing.assert_allclose(got.rewards_N, rewards, rtol=1e-6)
    np.testing.assert_allclose(got.group_mean_N, mean, rtol=1e-6)
    np.testing.assert_allclose(got.group_std_N, std, rtol=1e-6)
    for field in ("advantages_N", "rewards_N", "group_mean_N", "group_std_N"):
        assert getattr(got, field).dtype == np.float32 and getattr(got, field).shape == (8,)


def test_group_normalisation_by_hand():
    """One function, G = 4: rewards 1, 2, 3, 4 have mean 2.5 and unbiased std sqrt(5/3)."""
    got = group_advantages([[1.0], [2.0], [3.0], [4.0]], [1.0], 4)
    std = np.sqrt(5 / 3)
    np.testing.assert_allclose(got.advantages_N, (np.arange(1, 5) - 2.5) / (std + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(got.group_std_N, std, rtol=1e-6)
    assert abs(got.advantages_N.sum()) < 1e-6


def test_nan_rewards_are_skipped_with_their_weight():
    got = group_advantages(REWARDS, WEIGHTS, 4, "none")
    np.testing.assert_allclose(got.rewards_N, [1.25, 0.5, 1.0, 0.0, 2.5, 0.5, 0.0, 3.125])
    assert np.isfinite(got.advantages_N).all()
    none_as_nan = group_advantages([[1.0, None], [None, None]], [2.0, 3.0], 2)
    np.testing.assert_allclose(none_as_nan.rewards_N, [2.0, 0.0])


def test_scale_rewards_accepts_trls_booleans():
    for flag, mode in ((True, "group"), (False, "none")):
        a, b = group_advantages(REWARDS, WEIGHTS, 4, flag), group_advantages(REWARDS, WEIGHTS, 4, mode)
        np.testing.assert_array_equal(a.advantages_N, b.advantages_N)


def test_batch_mode_uses_group_mean_and_batch_std():
    got = group_advantages([[0.0], [1.0], [10.0], [11.0]], [1.0], 2, "batch")
    std = np.std([0.0, 1.0, 10.0, 11.0], ddof=1)
    np.testing.assert_allclose(got.advantages_N, np.array([-0.5, 0.5, -0.5, 0.5]) / (std + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(got.group_mean_N, [0.5, 0.5, 10.5, 10.5])
    assert not got.std_zero_N.any()


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_groups_of_equal_rewards_get_exactly_zero_advantage(mode):
    rewards = [[0.1], [0.1], [0.1], [0.7], [0.3], [0.9]]  # 0.1 * 3 / 3 != 0.1 in floats
    got = group_advantages(rewards, [1.0], 3, mode)
    assert (got.advantages_N[:3] == 0.0).all()
    assert (got.group_mean_N[:3] == np.float32(0.1)).all()
    if mode == "batch":
        assert not got.std_zero_N.any()
    else:
        np.testing.assert_array_equal(got.std_zero_N, [True] * 3 + [False] * 3)
        assert (got.group_std_N[:3] == 0.0).all()


def test_all_equal_batch_and_single_generation_groups_give_zero_not_nan():
    assert (group_advantages(np.ones((4, 2)), [1.0, 1.0], 2, "batch").advantages_N == 0.0).all()
    single = group_advantages([[1.0], [5.0]], [1.0], 1)  # TRL's eval path: std 0 for a group of one
    assert (single.advantages_N == 0.0).all() and single.std_zero_N.all()


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(2, 5),
    st.sampled_from(["group", "batch", "none"]),
    st.data(),
)
def test_groups_are_centred_and_shift_invariant(num_prompts, G, mode, data):
    values = st.floats(-100, 100, allow_nan=False, width=32)
    rewards = np.array(data.draw(st.lists(values, min_size=num_prompts * G, max_size=num_prompts * G)))[:, None]
    got = group_advantages(rewards, [1.0], G, mode)
    scale = max(1.0, np.abs(rewards).max())
    np.testing.assert_allclose(got.advantages_N.reshape(-1, G).sum(1), 0.0, atol=1e-3 * scale * G)
    shifted = group_advantages(rewards + 7.0, [1.0], G, mode)
    np.testing.assert_allclose(shifted.advantages_N, got.advantages_N, atol=1e-3 * scale)


@pytest.mark.parametrize(
    ("rewards", "weights", "G", "mode", "match"),
    [
        ([1.0, 2.0], [1.0], 2, "group", "table"),
        ([[1.0, 2.0]] * 4, [1.0], 2, "group", "reward_weights"),
        ([[1.0]] * 6, [1.0], 4, "group", "num_generations=4"),
        ([[1.0]] * 4, [1.0], 0, "group", "positive integer"),
        ([[1.0]] * 4, [1.0], 2.0, "group", "positive integer"),
        ([[1.0]] * 4, [1.0], 2, "std", "scale_rewards"),
        (np.zeros((0, 1)), [1.0], 2, "group", "empty"),
        ([[1.0], [np.inf]], [1.0], 2, "group", "infinite"),
        ([[1.0], ["a"]], [1.0], 2, "group", "numbers"),
        ([[1.0], [2.0]], [np.nan], 2, "group", "finite"),
    ],
)
def test_bad_input_is_a_user_error(rewards, weights, G, mode, match):
    with pytest.raises(UserError, match=match):
        group_advantages(rewards, weights, G, mode)


def test_result_type():
    assert isinstance(group_advantages([[1.0], [0.0]], [1.0], 2), Advantages)
