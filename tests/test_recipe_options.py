"""Training and sampling options of the shapes recipe: Min-SNR-gamma weighting, cosine lr, guidance interval."""

import json
from pathlib import Path

import pytest
import torch

from thinking_pixel.diffusion import GaussianDiffusion, guided_model_fn, sample
from thinking_pixel.train import _lr
from thinking_pixel.train_config import OptimisationConfig, TrainConfig

FIXTURES = Path(__file__).parent / "fixtures" / "flat_train_config"


def _toy_model(x, t, y):
    eps = 0.5 * x + 0.01 * y.float()[:, None, None, None] + 1e-4 * t.float()[:, None, None, None]
    return torch.cat([eps, torch.tanh(x)], dim=1)


def test_min_snr_weights_the_eps_loss_only():
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 6, 4, 4, generator=g)
    x0, noise = torch.rand(3, 3, 4, 4, generator=g) * 2 - 1, torch.randn(3, 3, 4, 4, generator=g)
    t = torch.tensor([0, 300, 999])
    kwargs = dict(model_kwargs={"y": torch.zeros(3, dtype=torch.long)}, noise=noise)
    plain = diffusion.training_losses(lambda x, t, y: out, x0, t, **kwargs)
    weighted = diffusion.training_losses(lambda x, t, y: out, x0, t, min_snr_gamma=5.0, **kwargs)
    snr = (diffusion.alphas_cumprod / (1 - diffusion.alphas_cumprod))[t].float()
    torch.testing.assert_close(weighted["mse"], plain["mse"])
    torch.testing.assert_close(weighted["loss"], plain["mse"] * snr.clamp(max=5.0) / snr + plain["vb"])
    assert snr[0] > 5 and snr[2] < 5  # t = 0 is down-weighted, t = 999 keeps weight 1


def test_cosine_lr_warms_up_then_decays_to_zero():
    cfg = OptimisationConfig(lr=1e-3, warmup_steps=10, max_steps=110, lr_schedule="cosine")
    assert _lr(cfg, 0) == pytest.approx(1e-4) and _lr(cfg, 10) == pytest.approx(1e-3)
    assert _lr(cfg, 60) == pytest.approx(5e-4) and _lr(cfg, 110) == pytest.approx(0.0, abs=1e-12)
    assert _lr(OptimisationConfig(lr_schedule="constant", warmup_steps=0), 5000) == OptimisationConfig().lr
    with pytest.raises(ValueError, match="lr_schedule"):
        OptimisationConfig(lr_schedule="linear")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        OptimisationConfig(min_snr_gamma=-1.0)


def test_guidance_interval_guides_only_inside():
    x, y = torch.randn(2, 2, 4, 4), torch.tensor([0, 1])
    fn = guided_model_fn(_toy_model, 3.0, null_class=5, interval=(0, 500))
    for step, guided in ((400, True), (501, False)):
        t = torch.full((2,), step)
        cond, uncond = _toy_model(x, t, y), _toy_model(x, t, torch.full_like(y, 5))
        want = uncond[:, :2] + 3.0 * (cond[:, :2] - uncond[:, :2]) if guided else cond[:, :2]
        torch.testing.assert_close(fn(x, t, y)[:, :2], want)
    with pytest.raises(ValueError, match="cfg_interval"):
        sample(_toy_model, y, (2, 4, 4), cfg_scale=2.0, null_class=5, cfg_interval=(600, 100), num_steps=2)


def test_sampling_outside_the_guidance_interval_runs_the_conditional_pass_only():
    y = torch.tensor([0, 1])
    batches = []

    def counting(x, t, labels):
        batches.append(len(x))
        return _toy_model(x, t, labels)

    common = dict(cfg_scale=3.0, null_class=5, num_steps=10, sampler="ddim")
    skipped = sample(counting, y, (2, 4, 4), cfg_interval=(0, 300), generator=torch.Generator().manual_seed(0),
                     **common)
    guided_steps = sum(n == 4 for n in batches)
    assert 0 < guided_steps < len(batches) and set(batches) == {2, 4}
    # the same samples as guiding through guided_model_fn's own interval (two passes at every step)
    reference = sample(guided_model_fn(_toy_model, 3.0, 5, interval=(0, 300)), y, (2, 4, 4), cfg_scale=1.0,
                       num_steps=10, sampler="ddim", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(skipped, reference)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_v_and_x0_prediction_models_return_eps(tmp_path, prediction):
    from thinking_pixel.models import DiT, dit_config

    torch.manual_seed(0)
    model = DiT(dit_config("DiT-N/4", depth=1, hidden_size=32, num_heads=2, prediction=prediction)).eval()
    diffusion = GaussianDiffusion()
    x0, eps = torch.rand(3, 3, 16, 16) * 2 - 1, torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 500, 999])
    x_t = diffusion.q_sample(x0, t, eps)
    a, s = diffusion.sqrt_alphas_cumprod[t].float(), diffusion.sqrt_one_minus_alphas_cumprod[t].float()
    v = a.view(-1, 1, 1, 1) * eps - s.view(-1, 1, 1, 1) * x0  # the exact v of (x_0, eps)
    target = v if prediction == "v" else x0
    out = model.as_eps(torch.cat([target, torch.zeros_like(target)], 1), x_t, t)
    # x0 -> eps divides by sqrt(1 - a), 0.01 at t = 0: fp32 rounding of x_t grows by as much there
    torch.testing.assert_close(out[:, :3], eps, atol=1e-4 if prediction == "v" else 2e-3, rtol=1e-4)
    assert set(model.state_dict()) == set(DiT(dit_config("DiT-N/4", depth=1, hidden_size=32, num_heads=2)).state_dict())
    loaded = DiT.from_pretrained(model.save_pretrained(tmp_path / prediction))  # built on the meta device
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    torch.testing.assert_close(loaded(x, t[:2], y), model(x, t[:2], y))
    with pytest.raises(ValueError, match="prediction"):
        dit_config("DiT-N/4", prediction="x")


def test_runs_saved_before_the_options_resume_only_with_their_old_behaviour(tmp_path):
    from thinking_pixel.train import _check_resumable

    # the flat train_config.json layout, as a run saved before the three options existed wrote it
    flat = json.loads((FIXTURES / "dit_no_recursion.json").read_text())
    old = TrainConfig.from_dict({k: v for k, v in flat.items() if k not in ("prediction", "lr_schedule",
                                                                            "min_snr_gamma")})
    now = dict(output_dir="runs/plain", recursion=False, preset="DiT-S/2")
    with pytest.raises(ValueError, match="prediction"):
        _check_resumable(old, TrainConfig.from_flat(**now), tmp_path)
    _check_resumable(old, TrainConfig.from_flat(**now, prediction="eps", lr_schedule="constant", min_snr_gamma=0),
                     tmp_path)
