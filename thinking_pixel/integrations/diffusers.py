"""The recursion on diffusers transformers: apply_recursion, save_recursion, load_recursion.

Supported models (``RecursionConfig.layers`` indexes ``transformer_blocks``, or ``blocks`` for our DiT):

- diffusers ``SD3Transformer2DModel``: each chosen ``JointTransformerBlock``'s joint attention ``attn`` gets a
  RecursionAttnProcessor. The vision stream's ``to_q/to_k/to_v`` carry the recursion; the text tokens' K/V
  (``add_k_proj/add_v_proj`` and ``norm_added_k``) are computed once per block call and stay fixed over the T
  steps; steps 1..T-1 compute only the vision rows of the attention; the last step runs the full joint attention
  (text queries from ``add_q_proj``), so the text stream's output is the base block's whenever the LoRA B are zero.
  The last block is ``context_pre_only``: its text output is discarded by the block, so no text queries there.
- diffusers ``DiTTransformer2DModel``: ``attn1`` (self-attention) of the chosen ada-norm-zero blocks.
- ``thinking_pixel.DiT``: ThinkingPixelDiT.from_dit (a new model holding a copy of the weights: use the result).

Built on diffusers' own seam, ``Attention.set_processor``: the processor is an nn.Module holding the experts and
the gate (diffusers registers nn.Module processors as submodules, so their parameters are
``transformer_blocks.{i}.attn.processor.lora.*`` / ``...gate.*`` in the model's state dict); the blocks' code runs
unchanged. The block hands its processor x~ (the norm1 output) and the modulated text, not the conditioning the
gate needs, so the gate's inputs are captured with forward hooks on the modules that compute them:

    SD3: model.time_text_embed.timestep_embedder ("timestep") and .text_embedder ("condition", pooled text);
         their sum is the blocks' temb.
    DiT: each chosen block's norm1.emb.timestep_embedder ("timestep") and .class_embedder ("condition");
         their sum is the embedding the block's AdaLayerNormZero modulates with.

Each hook stores its module's output on the processor, which sums the parts named in ``gate_inputs``. Hooks (rather
than reading temb off the block call) keep the gate-input ablations available and survive gradient checkpointing
(the stored embeddings are the ones of the same forward pass). They are callable objects, so a deepcopy of the
model (e.g. an EMA copy) hooks its own processors. The embeddings are those of the model's latest forward: call
the model, not a block alone (a processor that never saw one raises).

save_recursion / load_recursion write and read ``recursion_config.json`` (the RecursionConfig with resolved layers,
the model class and width) and ``recursion.safetensors`` (only the experts' and gates' tensors), like a peft
adapter: load_recursion applies the recursion to a freshly loaded base and fills it in.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import tp_kernels

from .._fileio import atomic_write
from ..models import DiT, RecursionConfig, ThinkingPixelDiT
from ..models.pretrained import read_json, state_mismatches
from ..modules.recursive_attention import LatentRecursion

__all__ = [
    "RECURSION_CONFIG_NAME",
    "RECURSION_WEIGHTS_NAME",
    "RecursionAttnProcessor",
    "SUPPORTED_MODELS",
    "apply_recursion",
    "install_processors",
    "load_recursion",
    "recursion_config",
    "save_recursion",
]

RECURSION_CONFIG_NAME = "recursion_config.json"
RECURSION_WEIGHTS_NAME = "recursion.safetensors"
FORMAT_VERSION = 1
SUPPORTED_MODELS = ("diffusers.SD3Transformer2DModel", "diffusers.DiTTransformer2DModel", "thinking_pixel.DiT")


class _StoreEmbedding:
    """Forward hook: keeps a module's output (an embedding the gate conditions on) on a processor."""

    def __init__(self, processor, name):
        self.processor, self.name = processor, name

    def __call__(self, module, args, output):
        self.processor.embeddings[self.name] = output


class RecursionAttnProcessor(LatentRecursion):
    """A diffusers attention processor running the recursion on the vision stream's to_q / to_k / to_v.

    forward(attn, hidden_states (N, T, D), encoder_hidden_states (N, L, D) or None) -> what the processor it
    replaces returns: the vision output (N, T, D) for a self-attention (DiT's attn1, AttnProcessor2_0's kind);
    for a joint attention (SD3, JointAttnProcessor2_0's kind) the pair (vision output, text output (N, L, D)),
    the text output None in a context_pre_only block (whose block discards it).
    """

    def __init__(self, dim, heads, cond_dim=None, cond_inputs=(), **kwargs):
        super().__init__(dim, cond_dim, **kwargs)
        self.heads = heads
        self.cond_inputs = tuple(cond_inputs)  # the embeddings the gate sums into its condition, in this order
        self.embeddings = {}  # name -> (N, D_c), filled by _StoreEmbedding hooks during the model's forward

    @classmethod
    def for_attention(cls, attn, recursion: RecursionConfig, cond_inputs=(), **kwargs):
        """A processor for diffusers Attention ``attn`` (its width and heads) under ``recursion``."""
        return cls(attn.inner_dim, attn.heads, attn.inner_dim, cond_inputs, **recursion.module_kwargs(), **kwargs)

    def gate_condition(self):
        """(N, D_c) the sum of the captured embeddings named in cond_inputs, or None if the gate takes none."""
        if not self.cond_inputs:
            return None
        missing = [name for name in self.cond_inputs if name not in self.embeddings]
        if missing:
            raise RuntimeError(f"RecursionAttnProcessor has no {missing} embedding for its gate: it is captured "
                               "while the model's forward computes it, so call the model, not a block alone")
        parts = [self.embeddings[name] for name in self.cond_inputs]
        return sum(parts[1:], parts[0]).to(self.gate.cond_proj.weight.dtype)  # fp32 gate under a bf16 model

    def context_qkv(self, attn, context):
        """Text tokens (N, L, D) -> their frozen (q or None, k, v), each (N, L, D), computed once per call.
        q is None where the block drops the text output (context_pre_only)."""
        k = self._per_head(attn.norm_added_k, attn.add_k_proj(context))
        v = attn.add_v_proj(context)
        q = None
        if not attn.context_pre_only:
            q = self._per_head(attn.norm_added_q, attn.add_q_proj(context))
        return q, k, v

    def _per_head(self, norm, x):
        """A per-head norm (diffusers' qk-norm, over the head dim) of x (N, T, D), or x itself without one."""
        return x if norm is None else norm(x.unflatten(-1, (self.heads, -1))).flatten(-2)

    def base_projection(self, attn, x):
        """The frozen [q | k | v] of x~ (N, T, 3D): three GEMMs, once per call (the recursion's last step)."""
        return torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=-1)

    def attend_step(self, attn, qkv, context, last):
        """One step's attention: vision queries (and the text's at the last step) over [vision; text] keys."""
        if attn.norm_q is not None or attn.norm_k is not None:
            q, k, v = qkv.split(self.dim, dim=-1)  # (N, T, D) each
            qkv = torch.cat([self._per_head(attn.norm_q, q), self._per_head(attn.norm_k, k), v], dim=-1)
        q_c, k_c, v_c = (None, None, None) if context is None else context
        # the text stream's output is needed from the last step only
        out = tp_kernels.joint_attention(qkv, self.heads, q_c if last else None, k_c, v_c)  # (N, T [+ L], D)
        return out.to(qkv.dtype)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if attention_mask is not None:
            raise ValueError("RecursionAttnProcessor does not support attention_mask (diffusers' DiT and SD3 "
                             "blocks pass none)")
        x = hidden_states  # x~, (N, T, D)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"hidden_states must have shape (N, T, {self.dim}), got {tuple(x.shape)}")
        n_tokens = x.shape[1]
        context = None if encoder_hidden_states is None else self.context_qkv(attn, encoder_hidden_states)
        out = self.recurse(x, self.gate_condition(), lambda: self.base_projection(attn, x),
                           lambda qkv, last: self.attend_step(attn, qkv, context, last))
        # out: (N, T, D), or (N, T + L, D) when the last step also ran the text queries
        vision = attn.to_out[1](attn.to_out[0](out[:, :n_tokens]))  # output projection, dropout
        if encoder_hidden_states is None:
            return vision
        text = None if attn.context_pre_only else attn.to_add_out(out[:, n_tokens:])
        return vision, text

    def extra_repr(self):
        return f"{super().extra_repr()}, heads={self.heads}, cond_inputs={self.cond_inputs}"


# --- which blocks, and where the gate's embeddings come from, per model class ----------------------------------

def _diffusers_classes():
    try:
        from diffusers import DiTTransformer2DModel, SD3Transformer2DModel
    except ImportError:
        return ()
    return SD3Transformer2DModel, DiTTransformer2DModel


def _check_attention(attn, index, joint):
    """The processor replaces JointAttnProcessor2_0 / AttnProcessor2_0 for the configurations those blocks build."""
    problems = [name for name, bad in (
        ("group_norm", attn.group_norm is not None), ("spatial_norm", attn.spatial_norm is not None),
        ("residual_connection", attn.residual_connection), ("rescale_output_factor", attn.rescale_output_factor != 1),
        ("fused projections", attn.fused_projections), ("cross-attention", attn.is_cross_attention),
        ("added K/V projections" if not joint else "no added K/V projections", (attn.add_k_proj is not None) != joint),
    ) if bad]
    if problems:
        raise ValueError(f"transformer_blocks[{index}]'s attention has {', '.join(problems)}: not the attention "
                         "the recursion supports")


def _sites(model):
    """([(block index, attention path, diffusers Attention, {name: module whose output is that gate embedding})]
    for every block, joint): where the recursion can go in a supported diffusers model."""
    classes = _diffusers_classes()
    if classes and isinstance(model, classes[0]):  # SD3Transformer2DModel
        embed = model.time_text_embed
        sources = {"timestep": embed.timestep_embedder, "condition": embed.text_embedder}
        return [(i, f"transformer_blocks.{i}.attn", block.attn, sources)
                for i, block in enumerate(model.transformer_blocks)], True
    if classes and isinstance(model, classes[1]):  # DiTTransformer2DModel
        sites = []
        for i, block in enumerate(model.transformer_blocks):
            emb = getattr(block.norm1, "emb", None)
            if block.norm_type != "ada_norm_zero" or emb is None:
                raise ValueError(f"transformer_blocks[{i}] is not an ada-norm-zero block with timestep and class "
                                 f"embedders (norm_type={block.norm_type!r})")
            sites.append((i, f"transformer_blocks.{i}.attn1", block.attn1,
                          {"timestep": emb.timestep_embedder, "condition": emb.class_embedder}))
        return sites, False
    raise TypeError(f"apply_recursion supports {', '.join(SUPPORTED_MODELS)}; got {type(model).__module__}."
                    f"{type(model).__name__}")


def _processors(model):
    """{attention path: RecursionAttnProcessor} of a diffusers model, in block order (empty without recursion)."""
    sites, _ = _sites(model)
    return {path: attn.processor for _, path, attn, _ in sites if isinstance(attn.processor, RecursionAttnProcessor)}


def _has_recursion(model) -> bool:
    return isinstance(model, ThinkingPixelDiT) or (not isinstance(model, DiT) and bool(_processors(model)))


def apply_recursion(model, recursion: RecursionConfig, *, freeze_base: bool = True):
    """Add the recursion to ``model`` and return it.

    Diffusers models are changed in place (their chosen attentions get a RecursionAttnProcessor); a
    ``thinking_pixel.DiT`` is returned as a new ThinkingPixelDiT holding a copy of its weights. With freeze_base
    (default) only the experts and gates require grad. A freshly wrapped model computes exactly the base's outputs
    until the experts' LoRA B move away from zero.
    """
    if not isinstance(recursion, RecursionConfig):
        raise TypeError(f"recursion must be a RecursionConfig, got {type(recursion).__name__}")
    if isinstance(model, ThinkingPixelDiT):
        raise ValueError("this model already has the recursion (a ThinkingPixelDiT); apply_recursion adds it once")
    if isinstance(model, DiT):
        return ThinkingPixelDiT.from_dit(model, recursion, freeze_base=freeze_base)
    return install_processors(model, recursion, RecursionAttnProcessor, freeze_base=freeze_base)


def install_processors(model, recursion: RecursionConfig, processor_class, *, freeze_base=True, **kwargs):
    """Set ``processor_class.for_attention(attn, recursion, cond_inputs, **kwargs)`` on the attention of each block
    in ``recursion.layers`` of a diffusers model, hook the gate's embeddings to it, and return the model."""
    sites, joint = _sites(model)
    done = _processors(model)
    if done:
        raise ValueError(f"this model already has the recursion in {list(done)}; "
                         "apply_recursion adds it once (load_recursion fills in an existing one)")
    layers = recursion.resolve_layers(len(sites))
    cond_inputs = tuple(name for name in recursion.gate_inputs if name != "tokens")
    for i in layers:
        _check_attention(sites[i][2], i, joint)
    if freeze_base:
        model.requires_grad_(False)
    for i in layers:
        _, _, attn, sources = sites[i]
        weight = attn.to_q.weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32  # like peft
        with torch.device(weight.device):
            processor = processor_class.for_attention(attn, recursion, cond_inputs, **kwargs).to(dtype)
        processor.train(model.training)
        for name in cond_inputs:
            sources[name].register_forward_hook(_StoreEmbedding(processor, name))
        attn.set_processor(processor)
    model._thinking_pixel_recursion = dataclasses.replace(recursion, layers=layers)
    return model


def recursion_config(model) -> RecursionConfig:
    """The RecursionConfig of a model that has the recursion (layers resolved)."""
    if isinstance(model, ThinkingPixelDiT):
        return dataclasses.replace(model.recursion, layers=model.recursive_layers)
    if isinstance(model, DiT) or not _has_recursion(model):
        raise ValueError(f"this {type(model).__name__} has no recursion: call apply_recursion first")
    return model._thinking_pixel_recursion


def _recursion_state(model) -> dict:
    """name -> tensor of every recursion parameter, names as in the model's state dict."""
    if isinstance(model, ThinkingPixelDiT):
        return dict(model.expert_named_parameters())
    return {f"{path}.processor.{name}": p for path, processor in _processors(model).items()
            for name, p in processor.recursion_parameters()}


def _base_description(model) -> dict:
    """What a recursion file must agree with besides its RecursionConfig: model class and width."""
    if isinstance(model, DiT):
        return {"model_class": "DiT", "dim": model.config.hidden_size, "num_blocks": model.config.depth}
    sites, _ = _sites(model)
    return {"model_class": type(model).__name__, "dim": sites[0][2].inner_dim, "num_blocks": len(sites)}


def save_recursion(model, directory):
    """Write the recursion of ``model`` to ``directory``: recursion_config.json + recursion.safetensors (only the
    experts' and gates' tensors). Both files are written atomically, the weights first."""
    directory = Path(directory)
    config = recursion_config(model)
    state = {name: p.detach().contiguous() for name, p in _recursion_state(model).items()}
    meta = {"format": FORMAT_VERSION, **_base_description(model), "recursion": config.to_dict()}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / RECURSION_WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(directory / RECURSION_CONFIG_NAME,
                  lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def _read_recursion_dir(directory: Path):
    config_path = directory / RECURSION_CONFIG_NAME
    meta = read_json(config_path, f"no {RECURSION_CONFIG_NAME} in {directory} (written by save_recursion)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: not a recursion config of format {FORMAT_VERSION}")
    try:
        return meta, RecursionConfig.from_dict(meta["recursion"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: invalid recursion config: {e}") from None


def _differences(saved: dict, current: dict) -> list[str]:
    return [f"{key}: saved {saved.get(key)!r}, model {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def load_recursion(model, directory, *, freeze_base: bool = True):
    """Load a recursion written by save_recursion into ``model`` and return the model.

    A model without the recursion gets it first (apply_recursion with the saved RecursionConfig; a DiT becomes a
    ThinkingPixelDiT: use the result). A model that already has one must have the same config. Any difference in
    model class, width, depth or RecursionConfig field is named in the error.
    """
    directory = Path(directory)
    meta, saved = _read_recursion_dir(directory)
    base = {k: meta.get(k) for k in ("model_class", "dim", "num_blocks")}
    problems = _differences(base, _base_description(model))
    if problems:
        raise ValueError(f"the recursion in {directory} was saved for another model: " + "; ".join(problems))
    if _has_recursion(model):
        problems = _differences(saved.to_dict(), recursion_config(model).to_dict())
        if problems:
            raise ValueError(f"the recursion in {directory} has another RecursionConfig than the model's: "
                             + "; ".join(problems))
    else:
        model = apply_recursion(model, saved, freeze_base=freeze_base)
    weights_path = directory / RECURSION_WEIGHTS_NAME
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None
    params = _recursion_state(model)
    problems = state_mismatches(params, state)
    if problems:
        raise ValueError(f"{weights_path} does not match {RECURSION_CONFIG_NAME}: " + "; ".join(problems))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    return model
