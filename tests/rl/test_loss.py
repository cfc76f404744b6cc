"""The GRPO loss against a numpy transcription of TRL's GRPOTrainer._compute_loss: values, gradients
(central finite differences in float64), the k3 KL, the on-policy gradient, clip metrics, and exact
accumulation over micro-batches."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openr1_jax.errors import UserError
from openr1_jax.rl.loss import LossConfig, LossNormalizer, grpo_loss, kl_k3, token_logps

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")
PAD = -3.0

# Hand-made batch: 4 completions of lengths 6, 4, 1 and 0 (a fully masked row still counts as a row).
LOGPS = np.array(
    [
        [-1.2, -0.3, -2.1, -0.8, -1.7, -0.5],
        [-0.9, -1.4, -0.2, -2.6, PAD, PAD],
        [-0.4, PAD, PAD, PAD, PAD, PAD],
        [PAD, PAD, PAD, PAD, PAD, PAD],
    ]
)
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.float64)
# logp - logp_old, picked away from the clip edges log(0.8), log(1.2), log(1.28) and log(delta = 1.5).
LOG_RATIO = np.array(
    [
        [0.3, -0.35, 0.08, -0.7, 0.6, -0.1],
        [0.3, 0.6, 0.3, 0.08, 0.5, 0.5],
        [-0.35, 0.5, 0.5, 0.5, 0.5, 0.5],
        [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
    ]
)
OLD = LOGPS - LOG_RATIO
REF = LOGPS + np.array(
    [
        [0.2, -0.1, 0.05, 0.3, -0.25, 0.1],
        [-0.3, 0.15, 0.4, -0.05, 0.0, 0.0],
        [0.35, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ]
)
ADV = np.array([-0.9, 1.3, -0.6, 0.4])
MAX_LEN = 8


def trl_reference(logps, old, ref, adv, mask, *, loss_type, level, eps_low, eps_high, delta, beta, max_len,
                  num_items=None, grad_accum=1, num_processes=1):  # fmt: skip
    """TRL's per-micro-batch loss, line by line in numpy (old = the rollout's log-probs; pass logps for mu=1)."""
    log_ratio = logps - old
    if level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / np.clip(mask.sum(-1), 1.0, None))[:, None]
    coef_1 = np.exp(log_importance_weights)
    coef_2 = np.clip(coef_1, 1 - eps_low, 1 + eps_high)
    if delta is not None:
        coef_1 = np.minimum(coef_1, delta)
    per_token_loss = -np.minimum(coef_1 * adv[:, None], coef_2 * adv[:, None])
    if beta != 0.0:
        per_token_kl = np.exp(ref - logps) - (ref - logps) - 1
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / np.clip(mask.sum(-1), 1.0, None)).mean() / grad_accum
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / max(mask.sum(), 1.0) / grad_accum
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.shape[0] * max_len) / grad_accum
    return (per_token_loss * mask).sum() / (num_items / num_processes)


def trl_clip_counts(logps, old, adv, mask, *, level, eps_low, eps_high, delta):
    """TRL's is_low/high/region_clipped, summed the way its masked_batch_mean weighs them."""
    log_ratio = logps - old
    if level == "token":
        coef_1, weight = np.exp(log_ratio), mask
    else:
        coef_1 = np.exp(((log_ratio * mask).sum(-1) / np.clip(mask.sum(-1), 1.0, None))[:, None])
        weight = np.ones_like(coef_1)
    if delta is not None:
        coef_1 = np.minimum(coef_1, delta)
    low = (coef_1 < 1 - eps_low) & (adv[:, None] < 0)
    high = (coef_1 > 1 + eps_high) & (adv[:, None] > 0)
    return (low * weight).sum(), (high * weight).sum(), ((low | high) * weight).sum()


def finite_difference_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def _norm(mask=MASK, num_items=None):
    return LossNormalizer.from_mask(mask, num_items)


def _ours(logps, old, ref, adv, mask, cfg, norm):
    def f(lp):
        return grpo_loss(lp, None if old is None else jnp.asarray(old, jnp.float32),
                         None if ref is None else jnp.asarray(ref, jnp.float32),
                         jnp.asarray(adv, jnp.float32), jnp.asarray(mask, jnp.float32), cfg, norm)  # fmt: skip

    (loss, stats), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logps, jnp.float32))
    return float(loss), np.asarray(grad, np.float64), {k: float(v) for k, v in stats.items()}


SCENARIOS = {
    # name: (off-policy, beta, epsilon_high, delta)
    "on_policy": (False, 0.0, None, None),
    "off_policy_kl_asym": (True, 0.04, 0.28, None),
    "off_policy_delta": (True, 0.0, 0.28, 1.5),
}


@pytest.mark.parametrize(("loss_type", "level", "scenario"), itertools.product(LOSS_TYPES, LEVELS, SCENARIOS))
def test_loss_and_gradient_match_trl_formulas(loss_type, level, scenario):
    off_policy, beta, eps_high, delta = SCENARIOS[scenario]
    cfg = LossConfig(loss_type, level, epsilon=0.2, epsilon_high=eps_high, delta=delta, beta=beta,
                     max_completion_length=MAX_LEN)  # fmt: skip
    num_items = MASK.sum() + 3.0  # as if a truncated row had been masked out after counting (TRL's order)
    loss, grad, stats = _ours(LOGPS, OLD if off_policy else None, REF, ADV, MASK, cfg, _norm(num_items=num_items))

    kw = dict(loss_type=loss_type, level=level, eps_low=0.2, eps_high=cfg.eps_high, delta=delta, beta=beta,
              max_len=MAX_LEN, num_items=num_items)  # fmt: skip
    if off_policy:
        want = trl_reference(LOGPS, OLD, REF, ADV, MASK, **kw)
        want_grad = finite_difference_grad(lambda lp: trl_reference(lp, OLD, REF, ADV, MASK, **kw), LOGPS)
    else:  # old = stop_gradient(logps): held at the base point while logps moves
        want = trl_reference(LOGPS, LOGPS, REF, ADV, MASK, **kw)
        want_grad = finite_difference_grad(lambda lp: trl_reference(lp, LOGPS, REF, ADV, MASK, **kw), LOGPS)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert np.all(grad[MASK == 0] == 0.0)

    low, high, region = trl_clip_counts(LOGPS, OLD if off_policy else LOGPS, ADV, MASK, level=level, eps_low=0.2,
                                        eps_high=cfg.eps_high, delta=delta)  # fmt: skip
    assert (stats["low_clip"], stats["high_clip"], stats["region_clip"]) == (low, high, region)
    assert stats["clip_total"] == (MASK.sum() if level == "token" else MASK.shape[0])
    assert stats["tokens"] == MASK.sum() and stats["sequences"] == MASK.shape[0]


def test_clip_counts_by_hand():
    """The hand-made batch clips: token level, rows 0 and 2 (A < 0) fall below 0.8 at three tokens and row 1
    (A > 0) rises above 1.28 at three; sequence level, row 1's mean log-ratio 0.32 is high, row 2's -0.35 low."""
    for level, want in (("token", (3, 3, 6, 11)), ("sequence", (1, 1, 2, 4))):
        cfg = LossConfig("dapo", level, epsilon_high=0.28)
        _, _, stats = _ours(LOGPS, OLD, None, ADV, MASK, cfg, _norm())
        assert (stats["low_clip"], stats["high_clip"], stats["region_clip"], stats["clip_total"]) == want
    # A zero advantage is never counted as clipped (strict inequalities): row 0's two low tokens drop out.
    _, _, stats = _ours(LOGPS, OLD, None, ADV * [0, 1, 1, 1], MASK, LossConfig("dapo", epsilon_high=0.28), _norm())
    assert (stats["low_clip"], stats["high_clip"]) == (1, 3)


def test_kl_k3_is_exp_r_minus_r_minus_1():
    rng = np.random.default_rng(0)
    logps, ref = -rng.uniform(0.01, 4.0, (3, 7)), -rng.uniform(0.01, 4.0, (3, 7))
    r = ref - logps
    got = np.asarray(kl_k3(jnp.asarray(logps, jnp.float32), jnp.asarray(ref, jnp.float32)))
    np.testing.assert_allclose(got, np.exp(r) - r - 1, rtol=1e-5, atol=1e-6)
    assert (got >= 0).all()
    assert float(kl_k3(jnp.float32(-1.3), jnp.float32(-1.3))) == 0.0


@pytest.mark.parametrize("level", LEVELS)
def test_kl_term_is_beta_times_normalised_k3(level):
    """With zero advantages only beta * KL is left: value beta * mean KL, gradient beta * (1 - exp(r))."""
    beta = 0.1
    cfg = LossConfig("bnpo", level, beta=beta)
    loss, grad, stats = _ours(LOGPS, OLD, REF, np.zeros(4), MASK, cfg, _norm())
    r = REF - LOGPS
    kl = (np.exp(r) - r - 1) * MASK
    np.testing.assert_allclose(loss, beta * kl.sum() / MASK.sum(), rtol=1e-5)
    np.testing.assert_allclose(stats["kl"], kl.sum(), rtol=1e-5)
    np.testing.assert_allclose(grad, beta * (1 - np.exp(r)) * MASK / MASK.sum(), rtol=1e-4, atol=1e-7)


def _plain_policy_gradient_weights(loss_type, mask, num_items):
    """c_it such that the on-policy loss is -sum_it A_i m_it c_it (value) and its gradient -A_i m_it c_it."""
    B = mask.shape[0]
    lengths = np.clip(mask.sum(-1, keepdims=True), 1.0, None)
    return {
        "grpo": mask / (lengths * B),
        "bnpo": mask / mask.sum(),
        "dr_grpo": mask / (B * MAX_LEN),
        "dapo": mask / num_items,
    }[loss_type]


@pytest.mark.parametrize(("loss_type", "level"), itertools.product(LOSS_TYPES, LEVELS))
def test_on_policy_ratio_is_one_and_gradient_is_plain_policy_gradient(loss_type, level):
    """mu = 1 (no old log-probs): w = 1, nothing clipped, and the gradient is -A_i * dlogp_it, normalised —
    at sequence level too, since d exp(mean_t log w)/dlogp_it = 1/|o_i| is undone by the |o_i| tokens."""
    cfg = LossConfig(loss_type, level, epsilon=0.2, epsilon_high=0.28, max_completion_length=MAX_LEN)
    num_items = MASK.sum() + 5
    loss, grad, stats = _ours(LOGPS, None, None, ADV, MASK, cfg, _norm(num_items=num_items))
    c = _plain_policy_gradient_weights(loss_type, MASK, num_items)
    np.testing.assert_allclose(grad, -ADV[:, None] * c, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(loss, -(ADV[:, None] * c).sum(), rtol=1e-5, atol=1e-8)
    assert stats["region_clip"] == 0.0
    # Same numbers as passing the rollout's own log-probs as the old ones.
    loss_old, grad_old, _ = _ours(LOGPS, LOGPS, None, ADV, MASK, cfg, _norm(num_items=num_items))
    np.testing.assert_allclose((loss_old, *grad_old.ravel()), (loss, *grad.ravel()), rtol=1e-6, atol=1e-9)


def _big_batch():
    """Six rows with different lengths, so micro-batches carry unequal token counts."""
    rng = np.random.default_rng(3)
    logps = -rng.uniform(0.1, 3.0, (6, 5))
    old = logps - rng.uniform(-0.6, 0.6, (6, 5))
    ref = logps + rng.uniform(-0.4, 0.4, (6, 5))
    mask = (np.arange(5)[None, :] < np.array([5, 2, 4, 1, 3, 0])[:, None]).astype(np.float64)
    adv = rng.normal(size=6)
    return logps, old, ref, adv, mask


@pytest.mark.parametrize(("loss_type", "level"), itertools.product(LOSS_TYPES, LEVELS))
def test_micro_batches_sum_to_the_whole_step(loss_type, level):
    logps, old, ref, adv, mask = _big_batch()
    cfg = LossConfig(loss_type, level, epsilon_high=0.28, delta=2.0, beta=0.05, max_completion_length=5)
    norm = _norm(mask, num_items=mask.sum() + 2)
    loss, grad, stats = _ours(logps, old, ref, adv, mask, cfg, norm)
    for splits in ((0, 2, 4, 6), (0, 1, 6), (0, 5, 6)):
        parts = [
            _ours(logps[a:b], old[a:b], ref[a:b], adv[a:b], mask[a:b], cfg, norm) for a, b in itertools.pairwise(splits)
        ]
        np.testing.assert_allclose(sum(p[0] for p in parts), loss, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), grad, rtol=1e-5, atol=1e-8)
        for key in stats:
            np.testing.assert_allclose(sum(p[2][key] for p in parts), stats[key], rtol=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_accumulation_against_trl_per_micro_batch_normalisation(loss_type):
    """TRL's sum over 3 equal micro-batches (each divided by gradient_accumulation_steps, dapo by the shared
    num_items_in_batch) equals our step loss for grpo, dr_grpo and dapo; bnpo only with one micro-batch."""
    logps, old, ref, adv, mask = _big_batch()
    cfg = LossConfig(loss_type, "token", epsilon_high=0.28, beta=0.05, max_completion_length=5)
    num_items = mask.sum()
    ours, _, _ = _ours(logps, old, ref, adv, mask, cfg, _norm(mask))
    kw = dict(loss_type=loss_type, level="token", eps_low=0.2, eps_high=0.28, delta=None, beta=0.05, max_len=5,
              num_items=num_items)  # fmt: skip
    one_micro_batch = trl_reference(logps, old, ref, adv, mask, **kw)
    three = sum(
        trl_reference(logps[a:b], old[a:b], ref[a:b], adv[a:b], mask[a:b], grad_accum=3, **kw)
        for a, b in ((0, 2), (2, 4), (4, 6))
    )
    np.testing.assert_allclose(ours, one_micro_batch, rtol=1e-5)
    if loss_type == "bnpo":  # TRL: token mean of each micro-batch; ours: token mean of the step
        assert abs(three - ours) > 1e-3
    else:
        np.testing.assert_allclose(ours, three, rtol=1e-5)


def test_jit_with_traced_normalizer_matches_eager():
    logps, old, ref, adv, mask = _big_batch()
    cfg = LossConfig("dapo", "sequence", beta=0.02)
    norm = LossNormalizer(jnp.float32(6.0), jnp.float32(mask.sum()), jnp.float32(mask.sum() + 1))
    args = [jnp.asarray(x, jnp.float32) for x in (logps, old, ref, adv, mask)]
    jitted = jax.jit(grpo_loss, static_argnames=("cfg",))
    np.testing.assert_allclose(jitted(*args, cfg=cfg, norm=norm)[0], grpo_loss(*args, cfg, norm)[0], rtol=1e-6)
    on_policy = LossConfig("grpo")
    np.testing.assert_allclose(
        jitted(args[0], None, None, *args[3:], cfg=on_policy, norm=norm)[0],
        grpo_loss(args[0], None, None, *args[3:], on_policy, norm)[0],
        rtol=1e-6,
    )


def test_token_logps_and_entropy_under_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 7)) * 3
    targets = rng.integers(0, 7, (2, 3))
    logps, entropy = token_logps(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), temperature=0.7)
    z = np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float64) / 0.7
    logp_all = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    np.testing.assert_allclose(logps, np.take_along_axis(logp_all, targets[..., None], -1)[..., 0], rtol=1e-5)
    np.testing.assert_allclose(entropy, -(np.exp(logp_all) * logp_all).sum(-1), rtol=1e-5, atol=1e-6)
    assert logps.dtype == entropy.dtype == jnp.float32


def test_loss_config_defaults_are_trls():
    cfg = LossConfig()
    assert (cfg.loss_type, cfg.importance_sampling_level, cfg.epsilon, cfg.eps_high, cfg.delta, cfg.beta) == (
        "dapo", "token", 0.2, 0.2, None, 0.0)  # fmt: skip
    assert cfg.max_completion_length == 256
    assert LossConfig(epsilon_high=0.28).eps_high == 0.28
    hash(cfg)  # usable as a static jit argument


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loss_type": "ppo"},
        {"importance_sampling_level": "seq"},
        {"epsilon": -0.1},
        {"epsilon_high": -0.1},
        {"delta": 0.9},
        {"beta": -0.01},
        {"max_completion_length": 0},
    ],
)
def test_bad_config_is_a_user_error(kwargs):
    with pytest.raises(UserError):
        LossConfig(**kwargs)


def test_bad_inputs_are_user_errors():
    lp, m = jnp.zeros((2, 3)), jnp.ones((2, 3))
    norm = _norm(np.ones((2, 3)))
    with pytest.raises(UserError, match="reference"):
        grpo_loss(lp, None, None, jnp.zeros(2), m, LossConfig(beta=0.1), norm)
    with pytest.raises(UserError, match="advantages"):
        grpo_loss(lp, None, None, jnp.zeros(3), m, LossConfig(), norm)
    with pytest.raises(UserError, match="mask"):
        grpo_loss(lp, None, None, jnp.zeros(2), jnp.ones((2, 4)), LossConfig(), norm)
    with pytest.raises(UserError, match="old_logps"):
        grpo_loss(lp, jnp.zeros((2, 4)), None, jnp.zeros(2), m, LossConfig(), norm)
    with pytest.raises(UserError, match="temperature"):
        token_logps(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2), jnp.int32), temperature=0.0)
