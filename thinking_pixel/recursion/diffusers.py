"""The recursion on diffusers transformers: apply_recursion, remove_recursion, save_recursion, load_recursion.

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

The rest of diffusers' model API keeps the recursion or says why not:

- Processors: each recursion attention's ``set_processor`` (the seam of set_attn_processor, fuse_qkv_projections
  and the like) and the model's ``set_attn_processor`` are guarded. diffusers' fused-projection processors leave
  the recursion in place (it reads ``to_qkv`` / ``to_added_qkv`` itself once the projections are fused); any other
  processor there raises before anything changes, naming remove_recursion, which undoes apply_recursion
  (processors, hooks, parameters, the marks below).
- Layerwise casting: the processors join the model's ``_skip_layerwise_casting_patterns``, so
  enable_layerwise_casting leaves the experts and gates in full precision; the gate computes in full precision
  even where its weights are stored in fp8 / fp16 (Gate.fused_terms).
- save_pretrained: the recursion's tensors are in the model's state dict, and apply_recursion puts its config in
  ``model.config`` (key ``thinking_pixel_recursion``), so a save_pretrained directory (any variant, sharded or not)
  holds both. ``load_recursion(Model.from_pretrained(directory), directory)`` restores it; a plain from_pretrained
  warns, through diffusers' unexpected-config warning, with that call.
- torch.compile: the forward keeps the module state it reads (the embedding dict has its keys from the start; step
  counts only under halting, in place), so a compiled model keeps one graph per mode.

save_recursion / load_recursion write and read ``recursion_config.json`` (the RecursionConfig with resolved layers,
the model class and width) and ``recursion.safetensors`` (only the experts' and gates' tensors), like a peft
adapter: load_recursion applies the recursion to a freshly loaded base and fills it in.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import tp_kernels

from .._fileio import atomic_write
from ..models import DiT
from ..models.pretrained import read_json, state_mismatches
from .config import RecursionConfig
from .dit import ThinkingPixelDiT
from .layers import LatentRecursion, full_precision

__all__ = [
    "RECURSION_CONFIG_NAME",
    "RECURSION_WEIGHTS_NAME",
    "RecursionAttnProcessor",
    "SUPPORTED_MODELS",
    "apply_recursion",
    "install_processors",
    "load_recursion",
    "recursion_config",
    "remove_recursion",
    "save_recursion",
]

RECURSION_CONFIG_NAME = "recursion_config.json"
RECURSION_WEIGHTS_NAME = "recursion.safetensors"
PRETRAINED_CONFIG_NAME = "config.json"  # diffusers' ModelMixin.save_pretrained
CONFIG_KEY = "thinking_pixel_recursion"  # the recursion's entry in a diffusers model's config
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
        # name -> (N, D_c), set by _StoreEmbedding hooks during the model's forward; the keys are there from the
        # start (None until a forward), so a compiled model sees the same dict on its first call and later ones
        self.embeddings = dict.fromkeys(self.cond_inputs)

    @classmethod
    def for_attention(cls, attn, recursion: RecursionConfig, cond_inputs=(), **kwargs):
        """A processor for diffusers Attention ``attn`` (its width and heads) under ``recursion``."""
        return cls(attn.inner_dim, attn.heads, attn.inner_dim, cond_inputs, **recursion.module_kwargs(), **kwargs)

    def gate_condition(self):
        """(N, D_c) the sum of the captured embeddings named in cond_inputs, or None if the gate takes none."""
        if not self.cond_inputs:
            return None
        missing = [name for name in self.cond_inputs if self.embeddings[name] is None]
        if missing:
            raise RuntimeError(f"RecursionAttnProcessor has no {missing} embedding for its gate: it is captured "
                               "while the model's forward computes it, so call the model, not a block alone")
        parts = [self.embeddings[name] for name in self.cond_inputs]
        return sum(parts[1:], parts[0])  # the gate computes in full precision whatever its dtype (Gate.fused_terms)

    def context_qkv(self, attn, context):
        """Text tokens (N, L, D) -> their frozen (q or None, k, v), each (N, L, D), computed once per call.
        q is None where the block drops the text output (context_pre_only)."""
        if attn.fused_projections:  # fuse_qkv_projections: one GEMM for the three
            q, k, v = attn.to_added_qkv(context).chunk(3, dim=-1)
        else:
            q = None if attn.context_pre_only else attn.add_q_proj(context)
            k, v = attn.add_k_proj(context), attn.add_v_proj(context)
        k = self._per_head(attn.norm_added_k, k)
        q = None if attn.context_pre_only else self._per_head(attn.norm_added_q, q)
        return q, k, v

    def _per_head(self, norm, x):
        """A per-head norm (diffusers' qk-norm, over the head dim) of x (N, T, D), or x itself without one."""
        return x if norm is None else norm(x.unflatten(-1, (self.heads, -1))).flatten(-2)

    def base_projection(self, attn, x):
        """The frozen [q | k | v] of x~ (N, T, 3D), once per call (the recursion's last step): three GEMMs, or
        one after fuse_qkv_projections."""
        if attn.fused_projections:
            return attn.to_qkv(x)
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
        ("cross-attention", attn.is_cross_attention),
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


# --- the recursion's sites: what apply_recursion changes on a diffusers model, guarded and undone -------------------

def _is_fused_processor(processor) -> bool:
    """diffusers' processors for fused projections (fuse_qkv_projections sets them): the recursion's processor
    computes with the fused projections itself, so it stays where one of them is set."""
    from diffusers.models import attention_processor

    fused = tuple(getattr(attention_processor, name) for name in ("FusedAttnProcessor2_0", "FusedJointAttnProcessor2_0")
                  if hasattr(attention_processor, name))
    return isinstance(processor, fused)


def _check_replacement(path, current, new):
    """Refuse to set processor ``new`` where the recursion processor ``current`` is (attention ``path``), unless
    it leaves the recursion working: ``current`` itself, or a fused-projection processor."""
    if new is current or _is_fused_processor(new):
        return
    raise ValueError(f"{path} holds the recursion ({type(current).__name__}): setting a {type(new).__name__} there "
                     "would drop it; call thinking_pixel.remove_recursion(model) first (it puts back the processor "
                     "the recursion replaced)")


class _RecursionSite:
    """What apply_recursion changed at one diffusers Attention, kept to guard it and to undo it. It stands in for
    the attention's ``set_processor``, the seam every processor change in diffusers goes through
    (set_attn_processor, fuse_qkv_projections, set_default_attn_processor, the xformers / attention-slicing
    switches): a fused-projection processor leaves the recursion in place, any other one is refused."""

    def __init__(self, attn, path, replaced, before_fusion, hooks):
        self.attn, self.path = attn, path
        self.replaced = replaced  # the processor the recursion took the place of: remove_recursion puts it back
        self.before_fusion = before_fusion  # a fused model's pre-fusion processor here (what unfusing restores)
        self.hooks = hooks  # the handles of the gate's _StoreEmbedding hooks

    def __call__(self, processor):
        _check_replacement(self.path, self.attn.processor, processor)


class _GuardedSetAttnProcessor:
    """A diffusers model's ``set_attn_processor`` while it holds the recursion: every recursion site is checked
    before diffusers replaces any processor, so a refused call leaves the whole model as it was."""

    def __init__(self, model):
        self.model = model

    def __call__(self, processor):
        for path, current in _processors(self.model).items():
            new = processor.get(f"{path}.processor") if isinstance(processor, dict) else processor
            if new is not None:  # a dict without this key: diffusers' own check names it
                _check_replacement(path, current, new)
        type(self.model).set_attn_processor(self.model, processor)


def _unfused_processors(model):
    """diffusers' record of the processors before fuse_qkv_projections, which unfuse_qkv_projections sets back
    ({processor path: processor}), or None."""
    original = getattr(model, "original_attn_processors", None)
    return original if isinstance(original, dict) else None


def _skip_pattern(path) -> str:
    """The layerwise-casting skip pattern of the processor at attention ``path`` (matched against module names)."""
    return rf"^{re.escape(path)}\.processor$"


def apply_recursion(model, recursion: RecursionConfig, *, freeze_base: bool = True):
    """Add the recursion to ``model`` and return it.

    Diffusers models are changed in place (their chosen attentions get a RecursionAttnProcessor); a
    ``thinking_pixel.DiT`` is returned as a new ThinkingPixelDiT holding a copy of its weights. With freeze_base
    (default) only the experts and gates require grad. A freshly wrapped model computes exactly the base's outputs
    until the experts' LoRA B move away from zero.

    On a diffusers model the recursion also enters ``model.config`` (key ``thinking_pixel_recursion``), so that
    ``save_pretrained`` writes it beside the recursion's tensors and ``load_recursion(model, directory)`` restores
    it from that directory; remove_recursion takes it all off again.
    """
    if not isinstance(recursion, RecursionConfig):
        raise TypeError(f"recursion must be a RecursionConfig, got {type(recursion).__name__}")
    if isinstance(model, ThinkingPixelDiT):
        raise ValueError("this model already has the recursion (a ThinkingPixelDiT); apply_recursion adds it once")
    if isinstance(model, DiT):
        return ThinkingPixelDiT.from_dit(model, recursion, freeze_base=freeze_base)
    install_processors(model, recursion, RecursionAttnProcessor, freeze_base=freeze_base)
    if hasattr(model, "register_to_config"):
        model.register_to_config(**{CONFIG_KEY: {"load_with": "thinking_pixel.load_recursion(model, directory)",
                                                 **_recursion_meta(model)}})
    return model


def install_processors(model, recursion: RecursionConfig, processor_class, *, freeze_base=True, **kwargs):
    """Set ``processor_class.for_attention(attn, recursion, cond_inputs, **kwargs)`` on the attention of each block
    in ``recursion.layers`` of a diffusers model, hook the gate's embeddings to it, guard its place, and return
    the model. The processors are left out of diffusers' layerwise casting (they stay in full precision)."""
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
    unfused = _unfused_processors(model)
    for i in layers:
        _, path, attn, sources = sites[i]
        weight = attn.to_q.weight
        with torch.device(weight.device):
            processor = processor_class.for_attention(attn, recursion, cond_inputs, **kwargs)
        processor.to(full_precision(weight.dtype)).train(model.training)  # like peft's adapters
        hooks = [sources[name].register_forward_hook(_StoreEmbedding(processor, name)) for name in cond_inputs]
        key = f"{path}.processor"
        before_fusion = None if unfused is None else unfused.get(key)
        site = _RecursionSite(attn, path, attn.processor, before_fusion, hooks)
        attn.set_processor(processor)
        attn.set_processor = site
        if before_fusion is not None:
            unfused[key] = processor  # unfuse_qkv_projections keeps the recursion
    if hasattr(type(model), "set_attn_processor"):
        model.set_attn_processor = _GuardedSetAttnProcessor(model)
    if hasattr(model, "_skip_layerwise_casting_patterns"):
        model._skip_layerwise_casting_patterns = [*(model._skip_layerwise_casting_patterns or ()),
                                                  *(_skip_pattern(sites[i][1]) for i in layers)]
    model._thinking_pixel_recursion = dataclasses.replace(recursion, layers=layers)
    return model


def remove_recursion(model):
    """Take the recursion off a diffusers model (in place) and return the model: each attention gets back the
    processor the recursion replaced, and the recursion's parameters, hooks, config entry, layerwise-casting skip
    patterns and processor guards go. The base's parameters keep the requires_grad that apply_recursion left.
    """
    if isinstance(model, (DiT, ThinkingPixelDiT)):
        raise TypeError("remove_recursion takes a diffusers model; apply_recursion on a thinking_pixel.DiT returns "
                        "a new model (a ThinkingPixelDiT) and leaves the DiT as it was")
    processors = _processors(model)
    if not processors:
        raise ValueError(f"this {type(model).__name__} has no recursion to remove")
    unfused = _unfused_processors(model)
    sites, _ = _sites(model)
    for _, path, attn, _ in sites:
        if path not in processors:
            continue
        site = vars(attn).pop("set_processor")
        for hook in site.hooks:
            hook.remove()
        key = f"{path}.processor"
        if unfused is not None and unfused.get(key) is processors[path]:
            unfused[key] = site.replaced if site.before_fusion is None else site.before_fusion
        attn.set_processor(site.replaced)
        processors[path].embeddings.update(dict.fromkeys(processors[path].cond_inputs))  # no stale tensors
    vars(model).pop("set_attn_processor", None)
    if "_skip_layerwise_casting_patterns" in vars(model):
        ours = {_skip_pattern(path) for path in processors}
        kept = [p for p in vars(model).pop("_skip_layerwise_casting_patterns") if p not in ours]
        if kept != list(type(model)._skip_layerwise_casting_patterns or ()):
            model._skip_layerwise_casting_patterns = kept  # patterns set on the model by someone else
    if CONFIG_KEY in getattr(model, "config", {}):
        from diffusers.configuration_utils import FrozenDict

        model._internal_dict = FrozenDict({k: v for k, v in model._internal_dict.items() if k != CONFIG_KEY})
    del model._thinking_pixel_recursion
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


def _recursion_meta(model) -> dict:
    """What a directory records of a model's recursion: the format, the base it fits, its RecursionConfig."""
    return {"format": FORMAT_VERSION, **_base_description(model), "recursion": recursion_config(model).to_dict()}


def save_recursion(model, directory):
    """Write the recursion of ``model`` to ``directory``: recursion_config.json + recursion.safetensors (only the
    experts' and gates' tensors). Both files are written atomically, the weights first."""
    directory = Path(directory)
    meta = _recursion_meta(model)
    state = {name: p.detach().contiguous() for name, p in _recursion_state(model).items()}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / RECURSION_WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(directory / RECURSION_CONFIG_NAME,
                  lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def _read_recursion_meta(directory: Path):
    """-> (meta, RecursionConfig, the file holding them): recursion_config.json (save_recursion), else the
    ``thinking_pixel_recursion`` entry of config.json (save_pretrained of a diffusers model with the recursion)."""
    config_path = directory / RECURSION_CONFIG_NAME
    if config_path.is_file():
        meta = read_json(config_path, "")
    else:
        config_path = directory / PRETRAINED_CONFIG_NAME
        model_config = read_json(config_path, "") if config_path.is_file() else None
        meta = model_config.get(CONFIG_KEY) if isinstance(model_config, dict) else None
        if meta is None:
            raise FileNotFoundError(f"no {RECURSION_CONFIG_NAME} in {directory} (written by save_recursion), and no "
                                    f"{CONFIG_KEY!r} entry in a {PRETRAINED_CONFIG_NAME} there (written by "
                                    "save_pretrained of a model with the recursion)")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: not a recursion config of format {FORMAT_VERSION}")
    try:
        return meta, RecursionConfig.from_dict(meta["recursion"]), config_path
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: invalid recursion config: {e}") from None


def _weight_files(directory: Path, config_path: Path, variant):
    """The files that hold the recursion's tensors: recursion.safetensors next to recursion_config.json, else the
    checkpoint ModelMixin.save_pretrained wrote (one file or its shards, safetensors or .bin, ``variant`` named
    as diffusers names it)."""
    if config_path.name == RECURSION_CONFIG_NAME:
        if variant is not None:
            raise ValueError(f"variant names the weight files of save_pretrained; {directory} was written by "
                             "save_recursion")
        return [directory / RECURSION_WEIGHTS_NAME]
    from diffusers.utils import (SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME,
                                 _add_variant)

    for weights, index in ((SAFETENSORS_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        weights, index = directory / _add_variant(weights, variant), directory / _add_variant(index, variant)
        if index.is_file():
            weight_map = read_json(index, "").get("weight_map", {})
            return [directory / name for name in sorted(set(weight_map.values()))]
        if weights.is_file():
            return [weights]
    found = sorted(p.name for p in directory.glob("diffusion_pytorch_model*"))
    raise FileNotFoundError(f"no {_add_variant(SAFETENSORS_WEIGHTS_NAME, variant)} (or its shards, or .bin) in "
                            f"{directory}, which has {found}; weights saved with save_pretrained(variant=...) load "
                            "with load_recursion(model, directory, variant=...)")


def _read_tensors(files, names=None) -> dict:
    """name -> tensor of ``names`` (None: every tensor) found in the safetensors / torch.save files ``files``."""
    state = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt") as f:
                    keys = set(f.keys())
                    state.update({n: f.get_tensor(n) for n in keys if names is None or n in names})
            else:
                tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                state.update({n: t for n, t in tensors.items() if names is None or n in names})
        except (SafetensorError, OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
            raise ValueError(f"{path} is not a readable weights file: {e}") from None
    return state


def _differences(saved: dict, current: dict) -> list[str]:
    return [f"{key}: saved {saved.get(key)!r}, model {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def load_recursion(model, directory, *, variant=None, freeze_base: bool = True):
    """Load a recursion into ``model`` and return the model: from a directory written by save_recursion, or by
    ``save_pretrained`` of a diffusers model that had the recursion (its config.json entry and its weight files,
    one or sharded; ``variant`` as given to save_pretrained):

        model = load_recursion(SD3Transformer2DModel.from_pretrained(directory), directory)

    A model without the recursion gets it first (apply_recursion with the saved RecursionConfig; a DiT becomes a
    ThinkingPixelDiT: use the result). A model that already has one must have the same config. Any difference in
    model class, width, depth or RecursionConfig field is named in the error.
    """
    directory = Path(directory)
    meta, saved, config_path = _read_recursion_meta(directory)
    base = {k: meta.get(k) for k in ("model_class", "dim", "num_blocks")}
    problems = _differences(base, _base_description(model))
    if problems:
        raise ValueError(f"the recursion in {directory} was saved for another model: " + "; ".join(problems))
    files = _weight_files(directory, config_path, variant)
    if _has_recursion(model):
        problems = _differences(saved.to_dict(), recursion_config(model).to_dict())
        if problems:
            raise ValueError(f"the recursion in {directory} has another RecursionConfig than the model's: "
                             + "; ".join(problems))
    else:
        model = apply_recursion(model, saved, freeze_base=freeze_base)
    params = _recursion_state(model)
    # the recursion's own file holds nothing else (anything more is named); a model checkpoint holds the base too
    state = _read_tensors(files, None if config_path.name == RECURSION_CONFIG_NAME else set(params))
    problems = state_mismatches(params, state)
    if problems:
        raise ValueError(f"the tensors in {', '.join(f.name for f in files)} do not match {config_path}: "
                         + "; ".join(problems))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    return model
