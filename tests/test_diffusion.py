"""Diffusion: DiT's schedule and hybrid loss against direct computations, and the diffusers-based samplers."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from thinking_pixel.diffusion import (
    SAMPLERS,
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    guided_model_fn,
    linear_beta_schedule,
    make_scheduler,
    normal_kl,
    sample,
)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion()


def test_linear_schedule_is_dits():
    betas = linear_beta_schedule(1000)
    assert betas.dtype == torch.float64
    np.testing.assert_array_equal(betas.numpy(), np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    # Fewer steps keep the same total noise: beta scales by 1000 / T.
    np.testing.assert_allclose(linear_beta_schedule(250).numpy(), np.linspace(4e-4, 0.08, 250))
    with pytest.raises(ValueError, match="num_timesteps"):
        linear_beta_schedule(1)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(64, generator=g, dtype=torch.float64) for _ in range(4))
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_discretized_likelihood_matches_bin_integrals():
    mean, log_scale = torch.tensor(0.1, dtype=torch.float64), torch.tensor(math.log(0.3), dtype=torch.float64)
    values = torch.linspace(-1, 1, 256, dtype=torch.float64)  # the 256 pixel levels
    log_p = discretized_gaussian_log_likelihood(values, mean.expand(256), log_scale.expand(256))
    dist = Normal(mean, log_scale.exp())
    # Interior bins: the mass of [x - 1/255, x + 1/255]; the edge bins extend to -inf / +inf.
    interior = (dist.cdf(values[1:-1] + 1 / 255) - dist.cdf(values[1:-1] - 1 / 255)).log()
    torch.testing.assert_close(log_p[1:-1], interior)
    torch.testing.assert_close(log_p[0], dist.cdf(values[0] + 1 / 255).log())
    torch.testing.assert_close(log_p[-1], (1 - dist.cdf(values[-1] - 1 / 255)).log())
    torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_q_sample_matches_diffusers_add_noise(diffusion):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, trained_betas=diffusion.betas.numpy())
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), scheduler.add_noise(x0, noise, t))


def _posterior_by_conditioning(d, x0, xt, t):
    """q(x_{t-1} | x_t, x_0) by Gaussian conditioning, independently of the closed-form coefficients."""
    ab_prev = d.alphas_cumprod_prev[t].item()
    alpha, beta = 1 - d.betas[t].item(), d.betas[t].item()
    # prior x_{t-1} | x_0 ~ N(sqrt(ab_prev) x_0, 1 - ab_prev); likelihood x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta)
    precision = 1 / (1 - ab_prev) + alpha / beta
    mean = (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(alpha) * xt / beta) / precision
    return mean, 1 / precision


@pytest.mark.parametrize("t", [1, 37, 500, 999])
def test_vb_term_matches_direct_kl(diffusion, t):
    g = torch.Generator().manual_seed(t)
    x0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    xt = diffusion.q_sample(x0, torch.full((2,), t), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64))
    eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    v = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    vb = diffusion.vb_terms_bpd(torch.cat([eps, v], 1), x0, xt, torch.full((2,), t))

    true_mean, true_var = _posterior_by_conditioning(diffusion, x0, xt, t)
    ab = diffusion.alphas_cumprod[t].item()
    x0_pred = (xt - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    model_mean, _ = _posterior_by_conditioning(diffusion, x0_pred, xt, t)
    frac = (v + 1) / 2  # the learned range: log var between log(posterior var) and log(beta)
    model_logvar = frac * math.log(diffusion.betas[t].item()) + (1 - frac) * math.log(true_var)
    kl = kl_divergence(Normal(true_mean, math.sqrt(true_var)), Normal(model_mean, (0.5 * model_logvar).exp()))
    expected = kl.mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(vb, expected)


def test_vb_term_at_t0_is_decoder_nll(diffusion):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 256, (2, 3, 4, 4), generator=g).double() / 127.5 - 1
    xt = diffusion.q_sample(x0, torch.zeros(2, dtype=torch.long), torch.randn(2, 3, 4, 4, generator=g).double())
    out = torch.cat([torch.randn(2, 3, 4, 4, generator=g).double() * 0.1, torch.zeros(2, 3, 4, 4).double()], 1)
    vb = diffusion.vb_terms_bpd(out, x0, xt, torch.zeros(2, dtype=torch.long))
    mean, logvar, _ = diffusion.p_mean_variance(out, xt, torch.zeros(2, dtype=torch.long))
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(vb, nll)


def test_hybrid_loss_trains_mean_by_mse_and_variance_by_vb(diffusion):
    g = torch.Generator().manual_seed(4)
    out = torch.randn(3, 6, 4, 4, generator=g, requires_grad=True)
    model = lambda x, t, y: out  # noqa: E731 -- a "model" whose output is a leaf tensor
    x0 = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([0, 400, 999])
    terms = diffusion.training_losses(model, x0, t, {"y": torch.zeros(3, dtype=torch.long)}, noise=noise)
    torch.testing.assert_close(terms["mse"], ((noise - out[:, :3]) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    assert grad_vb[:, :3].abs().max() == 0, "the VLB must not train the eps half (mean is detached)"
    assert grad_vb[:, 3:].abs().max() > 0
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad_mse[:, 3:].abs().max() == 0


@pytest.mark.parametrize("t", [999, 500, 1])
def test_ddpm_step_matches_learned_variance_posterior(diffusion, t):
    scheduler = make_scheduler("ddpm", diffusion, 1000, clip_sample=False)
    g = torch.Generator().manual_seed(t)
    xt = torch.randn(2, 3, 8, 8, generator=g)
    out = torch.cat([torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g) * 2 - 1], 1)
    got = scheduler.step(out, t, xt, generator=torch.Generator().manual_seed(7)).prev_sample
    mean, logvar, _ = diffusion.p_mean_variance(out.double(), xt.double(), torch.full((2,), t))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7)).double()
    torch.testing.assert_close(got.double(), mean + (0.5 * logvar).exp() * noise, rtol=1e-4, atol=1e-4)


def test_ddpm_respacing_is_dits(diffusion):
    scheduler = make_scheduler("ddpm", diffusion, 250)
    expected = np.round(np.linspace(0, 999, 250)).astype(np.int64)[::-1]
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), expected)


def test_ddim_step_matches_formula(diffusion):
    scheduler = make_scheduler("ddim", diffusion, 10, clip_sample=False)
    t, t_prev = int(scheduler.timesteps[3]), int(scheduler.timesteps[4])
    g = torch.Generator().manual_seed(5)
    xt, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    got = scheduler.step(eps, t, xt).prev_sample
    ab, ab_prev = diffusion.alphas_cumprod[t].item(), diffusion.alphas_cumprod[t_prev].item()
    x0 = (xt - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    torch.testing.assert_close(got, math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps, rtol=1e-4, atol=1e-5)
    assert int(scheduler.timesteps[0]) == 999


def test_ddim_with_clipping_rederives_eps_from_the_clipped_x0(diffusion):
    """guided-diffusion's DDIM: after clamping x_0 to [-1, 1], eps is recomputed from it. Keeping the raw eps (the
    diffusers default) makes the update inconsistent and turns strongly guided samples into noise."""
    g = torch.Generator().manual_seed(7)
    x_init = torch.randn(2, 3, 8, 8, generator=g).double()  # the draw sample() makes from the same seed

    def overshooting(x, t, y):  # predicts an x_0 far outside [-1, 1], so clamping is active at every step
        eps = -2.0 * x
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    got = sample(overshooting, torch.zeros(2, dtype=torch.long), (3, 8, 8), diffusion=diffusion, sampler="ddim",
                 num_steps=10, generator=torch.Generator().manual_seed(7))
    ab = diffusion.alphas_cumprod.double()
    timesteps = make_scheduler("ddim", diffusion, 10).timesteps.tolist()
    x = x_init
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        ab_prev = ab[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = ((x - (1 - ab[t]).sqrt() * -2.0 * x) / ab[t].sqrt()).clamp(-1, 1)
        eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    torch.testing.assert_close(got.double(), x, rtol=1e-4, atol=1e-4)


def _toy_model(x, t, y):
    """Deterministic (N, 2C, H, W) output depending on x, t and y."""
    eps = 0.5 * x + 0.01 * y.float()[:, None, None, None] + 1e-4 * t.float()[:, None, None, None]
    return torch.cat([eps, torch.tanh(x)], dim=1)


def test_guidance_mixes_eps_half_only():
    x, t = torch.randn(3, 2, 4, 4), torch.full((3,), 10)
    y = torch.tensor([0, 1, 2])
    out = guided_model_fn(_toy_model, 3.0, null_class=5)(x, t, y)
    cond, uncond = _toy_model(x, t, y), _toy_model(x, t, torch.full_like(y, 5))
    torch.testing.assert_close(out[:, :2], uncond[:, :2] + 3.0 * (cond[:, :2] - uncond[:, :2]))
    torch.testing.assert_close(out[:, 2:], cond[:, 2:])
    assert guided_model_fn(_toy_model, 1.0, null_class=5) is _toy_model


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_shape_and_seed_determinism(sampler):
    labels = torch.tensor([0, 1, 2])
    run = lambda seed: sample(_toy_model, labels, (2, 8, 8), sampler=sampler, num_steps=5, cfg_scale=2.0,  # noqa
                              null_class=3, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 2, 8, 8) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_sampler_errors(diffusion):
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_scheduler("euler", diffusion, 10)
    with pytest.raises(ValueError, match="num_steps"):
        make_scheduler("ddim", diffusion, 0)
    with pytest.raises(ValueError, match="null_class"):
        sample(_toy_model, torch.tensor([0]), (2, 8, 8), cfg_scale=2.0)
    no_sigma = lambda x, t, y: x  # noqa: E731
    with pytest.raises(ValueError, match="2\\*C"):
        sample(no_sigma, torch.tensor([0]), (2, 8, 8), num_steps=2)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_recover_the_data_with_an_oracle_model(diffusion, sampler):
    """For data that is a single image x*, the exact eps is (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t): every
    sampler must land on x*."""
    target = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1

    def oracle(x, t, y):
        ab = diffusion.alphas_cumprod[t].float()[:, None, None, None]
        eps = (x - ab.sqrt() * target) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    out = sample(oracle, torch.zeros(2, dtype=torch.long), (3, 8, 8), diffusion=diffusion, sampler=sampler,
                 num_steps=20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target.expand(2, -1, -1, -1), rtol=0, atol=1e-4)
