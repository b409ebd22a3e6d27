"""DiT: scalable diffusion models with transformers (Peebles & Xie, facebookresearch/DiT), in plain PyTorch.

A faithful re-implementation of the reference model: adaLN-Zero blocks, fixed 2D sin-cos position
embeddings, a sinusoidal timestep embedder, a label embedder with a null class for classifier-free
guidance, learned sigma and DiT's weight initialisation. Parameter names follow the reference
(``x_embedder.proj``, ``blocks.{i}.attn.qkv``, ``blocks.{i}.mlp.fc1``, ...), so its state dicts line up.
Attention (thinking_pixel.models.attention) runs ``tp_kernels.joint_attention`` (the CPU extension's kernel on fp32
CPU tensors, torch's ``scaled_dot_product_attention`` elsewhere); there is no timm dependency.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange

from .._presets import DIT_CONFIGS
from .._checks import is_int, is_number
from .attention import Attention
from .pretrained import PretrainedMixin, config_from_dict

__all__ = [
    "DIT_CONFIGS",
    "DiT",
    "DiTBlock",
    "DiTConfig",
    "FinalLayer",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "TimestepEmbedder",
    "dit_config",
    "get_2d_sincos_pos_embed",
    "modulate",
]


PREDICTIONS = ("eps", "v", "x0")


@functools.cache
def _eps_coefficients(prediction: str, device: torch.device) -> torch.Tensor:
    """(2, 1000): (c_out, c_x) with eps = c_out·out + c_x·x_t for a network predicting ``prediction`` ("v" or
    "x0"), from alpha_bar of DiT's linear schedule (GaussianDiffusion's), on ``device``. Not model buffers: models
    are built on the meta device when loaded, and these are not saved.

    v = sqrt(a)·eps - sqrt(1-a)·x_0  ->  eps = sqrt(a)·v + sqrt(1-a)·x_t;
    x_0                              ->  eps = (x_t - sqrt(a)·x_0) / sqrt(1-a)."""
    alphas_cumprod = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), dim=0)
    a, s = alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt()
    coefficients = torch.stack([a, s]) if prediction == "v" else torch.stack([-a / s, 1.0 / s])
    return coefficients.float().to(device)


@dataclass
class DiTConfig:
    """The constructor arguments of DiT, with its defaults (DiT-XL/2 on 256px ImageNet latents)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    # Two details where diffusers' DiTTransformer2DModel differs from the reference (dit_convert.dit_from_diffusers sets them):
    timestep_freq_shift: float = 0.0  # sinusoid frequencies exp(-ln(1e4) i / (128 - shift)); diffusers: 1
    mlp_norm_eps: float = 1e-6  # eps of the LayerNorm before the MLP; diffusers: its config's norm_eps (1e-5)
    # What the network's first C output channels are: "eps" (DiT), "v" = sqrt(a)·eps - sqrt(1-a)·x_0 (a the
    # alpha_bar of DiT's schedule) or "x0" (the clean sample). forward() always returns eps: a v- or x0-network's
    # output is converted in the model.
    prediction: str = "eps"
    # Channels of an image the model is conditioned on (e.g. the current frame of a planner), concatenated to the
    # noisy input before the patch embedding; 0 for none. Outputs keep in_channels (x 2 with learned sigma).
    cond_channels: int = 0

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"DiTConfig.{name} must be an int >= 1, got {value!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiTConfig.input_size ({self.input_size}) must be divisible by "
                             f"patch_size ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if self.hidden_size % 4:
            raise ValueError(f"DiTConfig.hidden_size must be divisible by 4 for the 2D sin-cos position "
                             f"embedding, got {self.hidden_size}")
        if not is_int(self.cond_channels) or self.cond_channels < 0:
            raise ValueError(f"DiTConfig.cond_channels must be an int >= 0, got {self.cond_channels!r}")
        if not is_number(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be a number > 0, got {self.mlp_ratio!r}")
        if not is_number(self.class_dropout_prob) or not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"DiTConfig.class_dropout_prob must be a number in [0, 1), got {self.class_dropout_prob!r}")
        if not isinstance(self.learn_sigma, bool):
            raise ValueError(f"DiTConfig.learn_sigma must be a bool, got {self.learn_sigma!r}")
        if not is_number(self.timestep_freq_shift) or not 0 <= self.timestep_freq_shift < 128:
            raise ValueError(f"DiTConfig.timestep_freq_shift must be a number in [0, 128), "
                             f"got {self.timestep_freq_shift!r}")
        if not is_number(self.mlp_norm_eps) or not self.mlp_norm_eps > 0:
            raise ValueError(f"DiTConfig.mlp_norm_eps must be a number > 0, got {self.mlp_norm_eps!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"DiTConfig.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        return config_from_dict(cls, d)


def dit_config(name: str, **overrides) -> DiTConfig:
    """The DiTConfig of registry preset ``name`` (e.g. "DiT-XL/2", "DiT-T/2") with ``overrides`` applied."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; expected one of {sorted(DIT_CONFIGS)}")
    return DiTConfig(**{**DIT_CONFIGS[name], **overrides})


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps, Class Labels and Patches        #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vector representations."""

    def __init__(self, hidden_size, frequency_embedding_size=256, freq_shift=0.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000, freq_shift=0.0):
        """Sinusoidal embeddings (N, dim) of N (possibly fractional) timesteps t (N,).
        freq_shift: frequencies exp(-ln(max_period) i / (dim / 2 - freq_shift)) (diffusers' downscale_freq_shift)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device)
            / (half - freq_shift)
        )
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)  # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; drops labels to the null class (index num_classes) for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace dropped labels by the null class: at random with dropout_prob, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


class PatchEmbed(nn.Module):
    """(N, C, H, W) images -> (N, T, D) patch tokens, T = (H / p) * (W / p), in row-major order."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return rearrange(self.proj(x), "n d h w -> n (h w) d")  # (N, T, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Mlp(nn.Module):
    """The transformer MLP as DiT uses timm's: fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, mlp_norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, **attn_kwargs):
        """x (N, T, D) tokens, c (N, D) conditioning; attn_kwargs go to the attention (a RecursiveAttention's)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), **attn_kwargs)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN modulation, then a linear map of each token to its patch's pixels."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x)  # (N, T, p * p * C_out)


class DiT(PretrainedMixin, nn.Module):
    """Diffusion model with a Transformer backbone.

    forward(x (N, C, H, W), t (N,), y (N,)) -> (N, C_out, H, W), C_out = 2C with learned sigma
    (channels [:C] are the noise prediction, [C:] the variance interpolation values).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        if not isinstance(config, DiTConfig):
            raise TypeError(f"config must be a DiTConfig, got {type(config).__name__}")
        self.config = config
        self.learn_sigma = config.learn_sigma
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads

        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels + config.cond_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size, freq_shift=config.timestep_freq_shift)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        # Will use fixed sin-cos embedding:
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size), requires_grad=False)

        self.blocks = nn.ModuleList([
            DiTBlock(config.hidden_size, config.num_heads, mlp_ratio=config.mlp_ratio, mlp_norm_eps=config.mlp_norm_eps)
            for _ in range(config.depth)
        ])
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # Initialize transformer layers:
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Initialize (and freeze) pos_embed by sin-cos embedding:
        grid_size = self.config.input_size // self.config.patch_size
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size, device=self.pos_embed.device)
        with torch.no_grad():
            self.pos_embed.copy_(pos_embed.unsqueeze(0))

        # Initialize patch_embed like nn.Linear (instead of nn.Conv2d):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        # Initialize label embedding table:
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

        # Initialize timestep embedding MLP:
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # Zero-out adaLN modulation layers in DiT blocks:
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero-out output layers:
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """x (N, T, p * p * C) -> imgs (N, C, H, W)."""
        h = self.config.input_size // self.patch_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, p=self.patch_size, q=self.patch_size)

    def embed(self, x, t, y, cond_image=None):
        """Patch tokens with positions (N, T, D), timestep embedding (N, D) and label embedding (N, D).

        cond_image: (N, cond_channels, H, W) when the model is image-conditioned (config.cond_channels > 0).
        """
        cfg = self.config
        if x.dim() != 4 or x.shape[1:] != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(f"x must have shape (N, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}), "
                             f"got {tuple(x.shape)}")
        if t.shape != x.shape[:1] or y.shape != x.shape[:1]:
            raise ValueError(f"t and y must have shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}")
        if cfg.cond_channels:
            expected = (x.shape[0], cfg.cond_channels, cfg.input_size, cfg.input_size)
            if cond_image is None or tuple(cond_image.shape) != expected:
                got = None if cond_image is None else tuple(cond_image.shape)
                raise ValueError(f"this model is image-conditioned: cond_image must have shape {expected}, got {got}")
            x = torch.cat([x, cond_image.to(x.dtype)], dim=1)  # (N, C + C_cond, H, W)
        elif cond_image is not None:
            raise ValueError("cond_image given to a model built without cond_channels")
        # (N, T, D), T = H * W / patch_size ** 2. The patch embedding's output is a transposed view of the conv's
        # (N, D, T); made contiguous once here, or every residual add keeps that layout and each LayerNorm (forward
        # and backward) copies its input.
        x = (self.x_embedder(x) + self.pos_embed).contiguous()
        return x, self.t_embedder(t), self.y_embedder(y, self.training)

    def head(self, x, c):
        """Final layer and unpatchify: tokens (N, T, D) -> (N, C_out, H, W)."""
        return self.unpatchify(self.final_layer(x, c))

    def as_eps(self, out, x_t, t):
        """The network output (N, C_out, H, W) with its first C channels as eps (converted from v or x0).

        A v-network predicts x_0 = sqrt(a_t)·x_t - sqrt(1 - a_t)·v with an error no larger than its own, where an
        eps-network's error is amplified by 1 / sqrt(a_t) at high noise. An x0-network outputs a clean image at
        every noise level (at low noise it need not reproduce the noise, only what lies under it).
        """
        if self.config.prediction == "eps":
            return out
        C = self.in_channels
        c_out, c_x = _eps_coefficients(self.config.prediction, out.device)[:, t].to(out.dtype).view(2, -1, 1, 1, 1)
        return torch.cat([c_out * out[:, :C] + c_x * x_t, out[:, C:]], dim=1)  # (N, C_out, H, W)

    def forward(self, x, t, y, cond_image=None):
        """
        Forward pass of DiT.
        x: (N, C, H, W) tensor of spatial inputs (images or latent representations of images)
        t: (N,) tensor of diffusion timesteps
        y: (N,) tensor of class labels
        cond_image: (N, C_cond, H, W) conditioning image, for models with config.cond_channels > 0
        """
        x_t = x
        x, t_emb, y_emb = self.embed(x, t, y, cond_image)
        c = t_emb + y_emb  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        return self.as_eps(self.head(x, c), x_t, t)  # (N, C_out, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, **kwargs):
        """
        Forward pass with classifier-free guidance. The batch is [conditional; unconditional] halves: y's
        second half holds the null class (num_classes); only x's first half is used (both halves see it).
        Guidance applies to the noise channels [:in_channels] (the reference hard-codes the channel count for
        its 4-channel latents); the learned-sigma channels pass through. kwargs go to forward.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y, **kwargs)
        eps, rest = model_out[:, : self.in_channels], model_out[:, self.in_channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    def _config_dict(self) -> dict:
        return {"dit": self.config.to_dict()}

    @classmethod
    def _from_config_dict(cls, d: dict) -> "DiT":
        return cls(DiTConfig.from_dict(d["dit"]))


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim, grid_size, device=None):
    """(grid_size * grid_size, embed_dim) fixed embedding of a square grid, rows in row-major token order.

    As the reference: the first embed_dim / 2 channels embed the column (w) index, the rest the row (h) index.
    """
    grid_h = torch.arange(grid_size, dtype=torch.float64, device=device)
    grid_w = torch.arange(grid_size, dtype=torch.float64, device=device)
    grid = torch.meshgrid(grid_w, grid_h, indexing="xy")  # here w goes first
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H * W, D / 2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H * W, D / 2)
    return torch.cat([emb_h, emb_w], dim=1).float()  # (H * W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """embed_dim: output dimension for each position; pos: positions to be encoded -> (M, embed_dim)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega  # (D / 2,)
    out = pos.reshape(-1)[:, None] * omega[None]  # (M, D / 2), outer product
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)
