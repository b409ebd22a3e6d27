"""Gaussian diffusion as trained by DiT: eps-prediction with a learned-range variance.

The math follows facebookresearch/DiT (diffusion/gaussian_diffusion.py, itself from
openai/improved-diffusion): a linear beta schedule over 1000 steps, and the "hybrid" loss

    loss = MSE(eps, eps_pred) + L_vb(variance; mean detached)

where L_vb is the variational bound term (KL between the true posterior q(x_{t-1} | x_t, x_0) and
the model's p(x_{t-1} | x_t) at t > 0, the discretized decoder NLL at t = 0), in bits per dimension.
The eps half trains the mean through the MSE only; the variance half (v in [-1, 1] after the
model's linear head, unconstrained in practice) trains through the VLB only.

Schedule arrays are kept in float64 and cast when indexed, as DiT does, because
1 / sqrt(alpha_bar) for t near 999 loses precision in float32.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "GaussianDiffusion",
    "linear_beta_schedule",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
]


def linear_beta_schedule(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear schedule, scaled so that any ``num_timesteps`` spans the same total noise as 1000 steps."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    scale = 1000.0 / num_timesteps
    # numpy's linspace, as DiT: bit-identical betas (torch.linspace rounds differently in the last ulp).
    return torch.from_numpy(np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data ``x`` in [-1, 1], quantised to 256 bins, under N(means, exp(log_scales)^2).

    Each pixel value owns the bin [x - 1/255, x + 1/255]; the two edge bins extend to -inf / +inf.
    Uses the exact normal CDF (DiT uses a tanh approximation of it; the two differ by < 1e-3).
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = torch.special.ndtr(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    )


def _extract(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] for a batch of timesteps, cast to ``like``'s dtype and broadcastable to it: (N,) -> (N, 1, 1, 1)."""
    out = arr.to(t.device)[t].to(like.dtype)
    return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))


class GaussianDiffusion:
    """The forward process, the model's reverse-process parameters and DiT's training loss.

    ``model(x_t, t, y) -> (N, 2C, H, W)``: channels [0, C) predict eps, [C, 2C) the variance interpolation
    value v (log variance = (v+1)/2 * log(beta_t) + (1-(v+1)/2) * log(posterior variance_t)).
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        betas = linear_beta_schedule(num_timesteps, beta_start, beta_end)  # (T,) float64
        self.num_timesteps = num_timesteps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0: clip its log to the t = 1 value so the learned range stays finite.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    # ----------------------------------------------------------------------------------------------
    # forward process
    # ----------------------------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x_start + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, log_variance

    # ----------------------------------------------------------------------------------------------
    # reverse process
    # ----------------------------------------------------------------------------------------------
    def predict_xstart_from_eps(self, x_t, t, eps):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False):
        """Mean, log variance and predicted x_0 of p(x_{t-1} | x_t) from a (N, 2C, H, W) model output."""
        C = x_t.shape[1]
        if model_output.shape[1] != 2 * C:
            raise ValueError(
                f"model_output must have 2*C = {2 * C} channels (eps and variance, learn_sigma=True), "
                f"got {model_output.shape[1]}"
            )
        eps, var_values = model_output[:, :C], model_output[:, C:]
        min_log = _extract(self.posterior_log_variance_clipped, t, x_t)
        max_log = _extract(torch.log(self.betas), t, x_t)
        frac = (var_values + 1) / 2  # the model predicts v in [-1, 1]
        log_variance = frac * max_log + (1 - frac) * min_log

        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return mean, log_variance, pred_xstart

    # ----------------------------------------------------------------------------------------------
    # training loss
    # ----------------------------------------------------------------------------------------------
    def vb_terms_bpd(self, model_output, x_start, x_t, t) -> torch.Tensor:
        """Per-sample variational bound term in bits/dim: KL at t > 0, decoder NLL at t == 0. -> (N,)."""
        true_mean, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        mean, log_variance, _ = self.p_mean_variance(model_output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def sample_timesteps(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform timesteps in [0, T): (N,) int64."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def training_losses(self, model, x_start, t, model_kwargs: dict | None = None,
                        noise=None, min_snr_gamma: float | None = None) -> dict[str, torch.Tensor]:
        """DiT's hybrid loss per sample: {"loss", "mse", "vb"}, each (N,).

        ``min_snr_gamma``: Min-SNR-gamma weighting (Hang et al. 2023) of the eps MSE in the loss,
        min(SNR_t, gamma) / SNR_t: the low-noise steps, where eps is easy and the image nearly known, stop
        dominating the gradient. ``mse`` is reported unweighted.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, t, **(model_kwargs or {})).float()  # (N, 2C, H, W)
        C = x_start.shape[1]
        if model_output.shape[1] != 2 * C:
            raise ValueError(
                f"the model must predict eps and variance (2*C = {2 * C} channels, learn_sigma=True), "
                f"got {model_output.shape[1]} channels"
            )
        eps = model_output[:, :C]
        # The VLB trains only the variance: the mean comes from a detached eps.
        frozen_output = torch.cat([eps.detach(), model_output[:, C:]], dim=1)
        vb = self.vb_terms_bpd(frozen_output, x_start.float(), x_t.float(), t)
        mse = mean_flat((noise.float() - eps) ** 2)
        weighted = mse
        if min_snr_gamma is not None:
            snr = _extract(self.alphas_cumprod / (1.0 - self.alphas_cumprod), t, mse).reshape(-1)  # (N,)
            weighted = mse * snr.clamp(max=min_snr_gamma) / snr
        return {"loss": weighted + vb, "mse": mse, "vb": vb}
