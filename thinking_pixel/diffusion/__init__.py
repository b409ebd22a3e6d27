"""Diffusion: DiT's Gaussian diffusion (schedule, hybrid loss) and samplers built on diffusers."""

from .gaussian import (
    GaussianDiffusion,
    discretized_gaussian_log_likelihood,
    linear_beta_schedule,
    mean_flat,
    normal_kl,
)
from .flow import RectifiedFlow
from .samplers import SAMPLERS, guided_model_fn, make_scheduler, sample

__all__ = [
    "GaussianDiffusion",
    "RectifiedFlow",
    "SAMPLERS",
    "discretized_gaussian_log_likelihood",
    "guided_model_fn",
    "linear_beta_schedule",
    "make_scheduler",
    "mean_flat",
    "normal_kl",
    "sample",
]
