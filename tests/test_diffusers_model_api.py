"""The recursion under diffusers' own model API: layerwise casting, fused projections, processor dicts, offloading,
save_pretrained / from_pretrained (variants, shards), torch.compile recompilation, remove_recursion.

Every model here has experts with LoRA B away from zero, so a recursion that went missing shows in the outputs."""

import copy
import logging

import pytest
import torch

from thinking_pixel import RecursionConfig, apply_recursion, load_recursion, recursion_config, remove_recursion
from thinking_pixel.recursion.diffusers import RecursionAttnProcessor

from diffusers_helpers import make_base, make_inputs, perturb, run

diffusers = pytest.importorskip("diffusers")
from diffusers.hooks import apply_layerwise_casting  # noqa: E402
from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0  # noqa: E402

DIFFUSERS_KINDS = ("sd3", "dit_diffusers")
LAYERS = (0, 2)


def wrapped(kind, layers=LAYERS, **recursion):
    """(base, the base with the recursion in ``layers`` and trained-looking experts and gates)."""
    base = make_base(kind)
    settings = dict(experts=3, steps=2, rank=4) | recursion
    model = apply_recursion(copy.deepcopy(base), RecursionConfig(layers=layers, **settings))
    for i, processor in enumerate(recursion_processors(model)):
        perturb(processor.lora, std=0.3, seed=i), perturb(processor.gate, std=0.3, seed=i)
    return base, model


def recursion_processors(model):
    return [m for m in model.modules() if isinstance(m, RecursionAttnProcessor)]


def attentions(model):
    """Each block's attention that the recursion can hold: SD3's joint ``attn``, DiT's ``attn1``."""
    return [getattr(block, "attn1", None) or block.attn for block in model.transformer_blocks]


def embedding_hooks(model):
    """{module name: [the processors its _StoreEmbedding hooks feed]} over the whole model."""
    found = {}
    for name, module in model.named_modules():
        fed = [hook.processor for hook in module._forward_hooks.values() if type(hook).__name__ == "_StoreEmbedding"]
        if fed:
            found[name] = fed
    return found


def recursion_keys(model):
    return {name for name, p in model.named_parameters() if ".processor." in name}


# --- layerwise casting ----------------------------------------------------------------------------------------------

def rounded_like(model, cast):
    """A copy of ``model`` whose modules that ``cast`` stores in a low-precision dtype hold their parameters rounded
    through that dtype: what ``cast`` computes with, in full precision."""
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in cast.named_modules():
            hook = getattr(module, "_diffusers_hook", None)
            hook = None if hook is None else hook.get_hook("layerwise_casting")
            if hook is not None:
                for p in modules[name].parameters():
                    p.copy_(p.to(hook.storage_dtype).float())
    return reference


@pytest.mark.parametrize("storage", [torch.float8_e4m3fn, torch.float16], ids=["fp8", "fp16"])
@pytest.mark.parametrize("kind", DIFFUSERS_KINDS)
def test_layerwise_casting_keeps_the_recursion_in_full_precision(kind, storage):
    base, model = wrapped(kind)
    inputs = make_inputs(kind)
    keys = recursion_keys(model)
    recursion = {n: p.clone() for n, p in model.named_parameters() if n in keys}
    cast = copy.deepcopy(model)
    cast.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    assert {n: p.dtype for n, p in cast.named_parameters() if n in recursion} == dict.fromkeys(recursion,
                                                                                              torch.float32)
    assert any(p.dtype == storage for p in cast.parameters())  # the base is stored in the low precision
    with torch.no_grad():
        got = run(cast, inputs)
        want = run(rounded_like(model, cast), inputs)
        cast_base = copy.deepcopy(base)
        cast_base.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
        without = run(cast_base, inputs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - without).abs().max() > 1e-3  # the recursion is there
    assert all(torch.equal(p, recursion[n]) for n, p in cast.named_parameters() if n in recursion)


@pytest.mark.parametrize("kind", DIFFUSERS_KINDS)
def test_the_gate_computes_in_the_compute_dtype_when_its_weights_are_cast_too(kind):
    """diffusers' apply_layerwise_casting, given its default patterns rather than the model's, skips nothing of the
    recursion: the gate's Linears are stored in fp8 and the gate still computes in fp32."""
    _, model = wrapped(kind)
    inputs = make_inputs(kind)
    cast = copy.deepcopy(model)
    apply_layerwise_casting(cast, torch.float8_e4m3fn, torch.float32, skip_modules_pattern=DEFAULT_SKIP_MODULES_PATTERN)
    gate = recursion_processors(cast)[0].gate
    assert gate.cond_proj.weight.dtype == gate.token_proj.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        torch.testing.assert_close(run(cast, inputs), run(rounded_like(model, cast), inputs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", DIFFUSERS_KINDS)
def test_recursion_applied_after_layerwise_casting_is_full_precision(kind):
    base, model = wrapped(kind)
    cast = copy.deepcopy(base)
    cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    apply_recursion(cast, recursion_config(model))
    cast.load_state_dict({n: p for n, p in model.state_dict().items() if ".processor." in n}, strict=False)
    assert {p.dtype for n, p in cast.named_parameters() if ".processor." in n} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(run(cast, make_inputs(kind)), run(rounded_like(model, cast), make_inputs(kind)),
                                   rtol=0, atol=1e-6)


# --- processors: fuse, dicts, replacement, removal ------------------------------------------------------------------

def test_fuse_qkv_projections_keeps_the_recursion():
    base, model = wrapped("sd3")
    inputs = make_inputs("sd3")
    keys = recursion_keys(model)
    with torch.no_grad():
        want, plain = run(model, inputs), run(base, inputs)
        model.fuse_qkv_projections()
        assert len(recursion_processors(model)) == len(LAYERS)
        assert keys <= set(model.state_dict())
        torch.testing.assert_close(run(model, inputs), want, rtol=0, atol=1e-5)
        model.unfuse_qkv_projections()
        torch.testing.assert_close(run(model, inputs), want, rtol=0, atol=1e-5)
        model.fuse_qkv_projections()
        remove_recursion(model)  # back to the base, fused
        torch.testing.assert_close(run(model, inputs), plain, rtol=0, atol=1e-5)
        model.unfuse_qkv_projections()  # restores the base's processors, not the removed recursion's
        assert not recursion_processors(model)
        torch.testing.assert_close(run(model, inputs), plain, rtol=0, atol=1e-5)


def test_the_recursion_goes_on_a_fused_model_and_unfusing_keeps_it():
    base, model = wrapped("sd3")
    inputs = make_inputs("sd3")
    fused = copy.deepcopy(base)
    fused.fuse_qkv_projections()
    apply_recursion(fused, recursion_config(model))
    fused.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        want = run(model, inputs)
        torch.testing.assert_close(run(fused, inputs), want, rtol=0, atol=1e-5)
        fused.unfuse_qkv_projections()
        assert len(recursion_processors(fused)) == len(LAYERS)
        torch.testing.assert_close(run(fused, inputs), want, rtol=0, atol=1e-5)


def test_processor_dicts_keep_the_recursion_and_replacing_it_raises():
    _, model = wrapped("sd3")
    inputs = make_inputs("sd3")
    with torch.no_grad():
        want = run(model, inputs)
    processors = model.attn_processors
    assert [k for k, p in processors.items() if isinstance(p, RecursionAttnProcessor)] == [
        f"transformer_blocks.{i}.attn.processor" for i in LAYERS]
    model.set_attn_processor(dict(processors))  # diffusers' round trip of its processor dict
    assert model.attn_processors == processors
    other = dict(processors, **{"transformer_blocks.2.attn.processor": JointAttnProcessor2_0()})
    for replacement in (JointAttnProcessor2_0(), other):
        with pytest.raises(ValueError, match=r"transformer_blocks\.[02]\.attn.*remove_recursion\(model\)"):
            model.set_attn_processor(replacement)
        assert model.attn_processors == processors  # nothing replaced, not even the blocks before
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn.*remove_recursion\(model\)"):
        model.transformer_blocks[0].attn.set_processor(JointAttnProcessor2_0())
    with torch.no_grad():
        assert torch.equal(run(model, inputs), want)


def test_dit_attention_processor_replacement_raises():
    _, model = wrapped("dit_diffusers")
    attn = model.transformer_blocks[2].attn1
    processor = attn.processor
    with pytest.raises(ValueError, match=r"transformer_blocks\.2\.attn1.*remove_recursion\(model\)"):
        attn.set_processor(AttnProcessor2_0())
    assert attn.processor is processor
    attn.set_processor(processor)  # the processor it holds: nothing changes


@pytest.mark.parametrize("kind", DIFFUSERS_KINDS)
def test_remove_recursion_restores_the_base(kind):
    base, model = wrapped(kind)
    inputs = make_inputs(kind)
    before = [type(attn.processor) for attn in attentions(base)]
    remove_recursion(model)
    assert set(model.state_dict()) == set(base.state_dict())
    assert [type(attn.processor) for attn in attentions(model)] == before
    assert not embedding_hooks(model) and not hasattr(model, "_thinking_pixel_recursion")
    assert model._skip_layerwise_casting_patterns == type(model)._skip_layerwise_casting_patterns
    assert "thinking_pixel_recursion" not in model.config
    with torch.no_grad():
        assert torch.equal(run(model, inputs), run(base, inputs))
    with pytest.raises(ValueError, match="no recursion"):
        remove_recursion(model)
    if kind == "sd3":
        model.set_attn_processor(JointAttnProcessor2_0())  # no recursion left to guard
    apply_recursion(model, RecursionConfig(layers=(1,), rank=4))
    assert recursion_config(model).layers == (1,)


@pytest.mark.parametrize("kind", DIFFUSERS_KINDS)
def test_replacing_the_recursion_leaks_no_hooks(kind):
    _, model = wrapped(kind)
    replace = (model.set_attn_processor if kind == "sd3"
               else lambda p: attentions(model)[LAYERS[0]].set_processor(p))
    with pytest.raises(ValueError, match="remove_recursion"):
        replace(AttnProcessor2_0())
    with pytest.raises(ValueError, match="already has the recursion"):
        apply_recursion(model, RecursionConfig(layers=(1,), rank=4))
    twin = copy.deepcopy(model)  # e.g. an EMA copy: removing its recursion leaves the original alone
    before = embedding_hooks(model)
    remove_recursion(twin)
    assert embedding_hooks(model) == before and len(recursion_processors(model)) == len(LAYERS)
    for layers in ((1,), (0, 1, 2), LAYERS):
        remove_recursion(model)
        apply_recursion(model, RecursionConfig(layers=layers, rank=4))
        live = recursion_processors(model)
        hooks = embedding_hooks(model)  # one hook per recursive layer on each of its two embedders
        per_embedder = len(layers) if kind == "sd3" else 1
        assert [len(fed) for fed in hooks.values()] == [per_embedder] * (2 * len(layers) // per_embedder)
        assert {id(p) for fed in hooks.values() for p in fed} == set(map(id, live))
        assert recursion_config(model).layers == layers == model._thinking_pixel_recursion.layers
    assert not embedding_hooks(twin) and not recursion_processors(twin)


def test_group_offloading_keeps_the_recursion():
    _, model = wrapped("sd3")
    inputs = make_inputs("sd3")
    with torch.no_grad():
        want = run(model, inputs)
    for offload in (dict(offload_type="block_level", num_blocks_per_group=1), dict(offload_type="leaf_level")):
        offloaded = copy.deepcopy(model)
        offloaded.enable_group_offload(torch.device("cpu"), torch.device("cpu"), **offload)
        with torch.no_grad():
            assert torch.equal(run(offloaded, inputs), want)


# --- save_pretrained / from_pretrained ------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", [{}, {"variant": "fp16", "max_shard_size": "20KB"}, {"safe_serialization": False}],
                         ids=["one_file", "sharded_variant", "bin"])
@pytest.mark.parametrize("kind", DIFFUSERS_KINDS)
def test_save_pretrained_round_trips_the_recursion(kind, layout, tmp_path):
    _, model = wrapped(kind)
    inputs = make_inputs(kind)
    with torch.no_grad():
        want = run(model, inputs)
    model.save_pretrained(tmp_path, **layout)
    variant = {"variant": layout["variant"]} if "variant" in layout else {}
    if variant:
        assert len(list(tmp_path.glob("diffusion_pytorch_model.fp16-*.safetensors"))) > 1
    cls = type(model)
    loaded = load_recursion(cls.from_pretrained(tmp_path, **variant), tmp_path, **variant)
    assert recursion_config(loaded) == recursion_config(model)
    with torch.no_grad():
        assert torch.equal(run(loaded.eval(), inputs), want)
    again = copy.deepcopy(loaded)  # a second save of the loaded model holds the same recursion
    again.save_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(run(load_recursion(cls.from_pretrained(tmp_path / "again"), tmp_path / "again").eval(),
                               inputs), want)


@pytest.mark.parametrize("kind", DIFFUSERS_KINDS)
def test_a_plain_from_pretrained_says_how_to_get_the_recursion_back(kind, tmp_path):
    _, model = wrapped(kind)
    model.save_pretrained(tmp_path)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        type(model).from_pretrained(tmp_path)
    finally:
        logger.removeHandler(handler)
    assert any("load_recursion(model, directory)" in m for m in messages), messages


def test_load_recursion_names_what_a_directory_lacks(tmp_path):
    base, model = wrapped("sd3")
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match="recursion_config.json.*thinking_pixel_recursion"):
        load_recursion(copy.deepcopy(base), tmp_path / "base")
    model.save_pretrained(tmp_path / "fp16", variant="fp16")
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors.*variant"):
        load_recursion(copy.deepcopy(base), tmp_path / "fp16")


# --- torch.compile ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", DIFFUSERS_KINDS)
def test_compiled_model_runs_one_graph_per_mode(kind):
    from torch._dynamo.testing import CompileCounter

    _, model = wrapped(kind, layers=(1,))
    inputs = make_inputs(kind)
    reference = copy.deepcopy(model)  # eager, and no forward on ``model`` before it is compiled
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        want = run(reference, inputs)
        for _ in range(3):
            torch.testing.assert_close(run(compiled, inputs), want, rtol=0, atol=1e-6)
    assert counter.frame_count == 1
    model.train()
    for _ in range(2):
        run(compiled, inputs).square().mean().backward()
    assert counter.frame_count == 2
    for processor in recursion_processors(model):  # halting off: the forward leaves no count behind
        assert processor.halting.steps_taken is None or not processor.halting.steps_taken.any()


@pytest.mark.slow
def test_compiled_model_with_halting_counts_in_place_on_one_graph():
    from torch._dynamo.testing import CompileCounter

    _, model = wrapped("dit_diffusers", layers=(1,), steps=3, halting="delta", halt_threshold=0.5)
    inputs = make_inputs("dit_diffusers")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        want = run(reference, inputs)
    (eager,) = [p.halting.steps_taken for p in recursion_processors(reference)]
    assert eager[1] == 2 * 16 and 2 * eager[1] < eager[0] < 3 * eager[1]  # some tokens halted early, some did not
    (halting,) = [p.halting for p in recursion_processors(model)]
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for calls in range(1, 4):
            torch.testing.assert_close(run(compiled, inputs), want, rtol=0, atol=1e-6)
            assert torch.equal(halting.steps_taken, calls * eager)
    assert counter.frame_count == 1
