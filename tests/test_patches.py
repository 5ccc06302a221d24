"""ComfyUI's transformer_options patches on the U-Net: called where ComfyUI's SD U-Net calls them,
with the same block ids, and with the effect they ask for; unknown patches are refused."""
import copy

import pytest
import torch

from vc_model.attention import SpatialTransformer, TemporalTransformer

from vc_model.unet import UNet3D

from test_ops import fixture_unet
from test_unet import call, load_case, unet_config


@pytest.fixture(scope="module")
def v2():
    return fixture_unet("t2v_unet_v2")


def run(model, tensors, patches=None, replace=None, **options):
    if patches is not None:
        options["patches"] = patches
    if replace is not None:
        options["patches_replace"] = replace
    return call(model, tensors, transformer_options=options)


def spatial_blocks(model):
    """(block name, id) of every spatial transformer, in forward order."""
    return list(model.spatial_blocks)


def test_no_patches_and_identity_patches_change_nothing(v2):
    model, tensors = v2
    ref = call(model, tensors)
    assert torch.equal(run(model, tensors, {}, {}, cond_or_uncond=[0]), ref)
    identity = {
        "attn1_patch": [lambda n, c, v, extra: (n, c, v)], "attn2_patch": [lambda n, c, v, extra: (n, c, v)],
        "attn1_output_patch": [lambda n, extra: n], "attn2_output_patch": [lambda n, extra: n],
        "middle_patch": [lambda x, extra: x],
    }
    # The patched path attends per frame with the context repeated: same maths, other summation order.
    torch.testing.assert_close(run(model, tensors, identity), ref, rtol=1e-5, atol=1e-5)


def test_attention_patches_see_per_frame_tokens_and_comfy_block_ids(v2):
    model, tensors = v2
    seen = []

    def attn1(n, context, value, extra):
        seen.append(("attn1", extra["block"], extra["block_index"], extra["transformer_index"], tuple(n.shape),
                     extra["n_heads"], extra["dim_head"], tuple(extra["original_shape"])))
        assert context is n and value is n
        return n, context, value

    def attn2(n, context, value, extra):
        seen.append(("attn2", extra["block"], tuple(context.shape)))
        return n, context, value

    run(model, tensors, {"attn1_patch": [attn1], "attn2_patch": [attn2]}, cond_or_uncond=[0, 1])
    blocks = spatial_blocks(model)
    first = [s for s in seen if s[0] == "attn1"]
    assert [s[1] for s in first] == blocks  # only spatial transformers, in order, with ComfyUI's ids
    assert [s[3] for s in first] == list(range(len(blocks)))  # transformer_index counts them
    b, _, t, h, w = tensors["input.x"].shape
    assert first[0][4][0] == b * t and first[0][7] == (b, 4, t, h, w)
    spatial = [m for m in model.modules() if isinstance(m, SpatialTransformer)]
    assert [s[5] * s[6] for s in first] == [m.proj_in.out_features for m in spatial]
    second = [s for s in seen if s[0] == "attn2"]
    assert len(second) == len(blocks) and all(s[2][0] == b * t for s in second)  # context per frame


def zero_attention_output(model, name):
    """A copy of `model` whose spatial `name` (attn1/attn2) layers output zeros."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, SpatialTransformer):
            out = getattr(m.transformer_blocks[0], name).to_out[0]
            out.weight.zero_()
            out.bias.zero_()
    return model


@pytest.mark.parametrize("name", ["attn1", "attn2"])
def test_output_patches_act_on_the_spatial_attention_output(v2, name):
    model, tensors = v2
    patched = run(model, tensors, {f"{name}_output_patch": [lambda n, extra: n * 0]})
    expected = call(zero_attention_output(model, name), tensors)
    torch.testing.assert_close(patched, expected, rtol=1e-5, atol=1e-5)
    assert (patched - call(model, tensors)).abs().max() > 1e-3


def test_attn1_replace_is_applied_to_its_block_only(v2):
    """A PAG-style replacement (attention output = v) of the middle block's self-attention equals
    that layer running with an attention function that returns v."""
    model, tensors = v2
    calls = []

    def identity_attention(q, k, v, extra):
        calls.append(extra["block"])
        return v

    expected_model = copy.deepcopy(model)
    middle = next(m for m in expected_model.middle_block if isinstance(m, SpatialTransformer))
    middle.transformer_blocks[0].attn1.attention = lambda q, k, v, heads, **kw: v
    expected = call(expected_model, tensors)
    for key in [("middle", 0), ("middle", 0, 0)]:
        calls.clear()
        out = run(model, tensors, replace={"attn1": {key: identity_attention}})
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert calls == [("middle", 0)]
    assert (expected - call(model, tensors)).abs().max() > 1e-3


def test_attn2_replace_gets_projected_per_frame_q_k_v(v2):
    model, tensors = v2
    shapes = []

    def replace(q, k, v, extra):
        shapes.append((q.shape, k.shape, v.shape))
        return q * 0

    out = run(model, tensors, replace={"attn2": {("output", len(model.output_blocks) - 1): replace}})
    b, _, t, h, w = tensors["input.x"].shape
    (q, k, v), = shapes
    assert q[0] == k[0] == b * t and q[1] == h * w and k[1] == tensors["input.context"].shape[1]
    assert (out - call(model, tensors)).abs().max() > 1e-4


def test_block_patches_get_comfy_ids_and_act_where_comfy_applies_them(v2):
    model, tensors = v2
    seen = []

    def record(kind):
        def patch(h, options):
            seen.append((kind, options["block"]))
            return h
        return patch

    def output_patch(h, skip, options):
        seen.append(("output", options["block"]))
        return h, skip

    def emb_patch(emb, channels, options):
        seen.append(("emb", channels))
        return emb

    out = run(model, tensors, {"input_block_patch": [record("input")], "input_block_patch_after_skip": [record("skip")],
                               "output_block_patch": [output_patch], "emb_patch": [emb_patch]})
    assert torch.equal(out, call(model, tensors))
    n_in, n_out = len(model.input_blocks), len(model.output_blocks)
    assert [s for s in seen if s[0] == "input"] == [("input", ("input", i)) for i in range(n_in)]
    assert [s for s in seen if s[0] == "skip"] == [("skip", ("input", i)) for i in range(n_in)]
    assert [s for s in seen if s[0] == "output"] == [("output", ("output", i)) for i in range(n_out)]
    assert seen[0] == ("emb", model.cfg.model_channels)

    # output_block_patch on ("output", 0) sees the middle block's output as h: scaling it there
    # equals scaling the middle block's output.
    def scale_first(h, skip, options):
        return (h * 1.5 if options["block"] == ("output", 0) else h), skip

    hooked = copy.deepcopy(model)
    hooked.middle_block.register_forward_hook(lambda m, i, o: o * 1.5)
    torch.testing.assert_close(run(model, tensors, {"output_block_patch": [scale_first]}), call(hooked, tensors),
                               rtol=1e-6, atol=1e-6)

    def scale_input_1(h, options):
        return h * 2 if options["block"] == ("input", 1) else h

    hooked = copy.deepcopy(model)
    hooked.input_blocks[1].register_forward_hook(lambda m, i, o: o * 2)
    torch.testing.assert_close(run(model, tensors, {"input_block_patch": [scale_input_1]}), call(hooked, tensors),
                               rtol=1e-6, atol=1e-6)

    zero_emb = run(model, tensors, {"emb_patch": [lambda emb, channels, options: emb * 0]})
    assert (zero_emb - out).abs().max() > 1e-3


def test_temporal_layers_get_the_options_but_not_spatial_patches(v2):
    model, tensors = copy.deepcopy(v2[0]), v2[1]
    seen = []
    for m in model.modules():
        if isinstance(m, TemporalTransformer):
            m.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(args[2] if len(args) > 2 else
                                                                                kwargs.get("transformer_options")),
                                        with_kwargs=True)
    calls = []
    run(model, tensors, {"attn1_patch": [lambda n, c, v, extra: calls.append(1) or (n, c, v)]}, marker="x")
    temporal = [m for m in model.modules() if isinstance(m, TemporalTransformer)]
    assert len(seen) == len(temporal) and all(o is not None and o["marker"] == "x" for o in seen)
    assert len(calls) == len(spatial_blocks(model))


def test_i2v_image_branch_still_added_under_patches():
    params = load_case("t2v_unet_v2")[1]
    torch.manual_seed(0)
    model = UNet3D(unet_config(params, image_attention=True)).eval()
    x, text, image = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 77, 32), torch.randn(1, 4, 32)
    identity = {"attn2_patch": [lambda n, c, v, extra: (n, c, v)]}
    with torch.no_grad():
        ref = model(x, 10, text, image_context=image)
        patched = model(x, 10, text, image_context=image, transformer_options={"patches": identity})
        no_image = model(x, 10, text)
    torch.testing.assert_close(patched, ref, rtol=1e-5, atol=1e-5)
    assert (ref - no_image).abs().max() > 1e-3


@pytest.mark.parametrize("options,word", [
    ({"patches": {"double_block": [lambda *a: a]}}, "double_block"),
    ({"patches": {"forward_timestep_embed_patch": [(object, lambda *a: a)]}}, "forward_timestep_embed_patch"),
    ({"patches_replace": {"dit": {("double_block", 0): lambda *a: a}}}, "dit"),
    ({"patches_replace": {"attn1": {("input", 99): lambda *a: a}}}, "('input', 99)"),
    ({"patches_replace": {"attn2": {("middle", 0, 5): lambda *a: a}}}, "('middle', 0, 5)"),
])
def test_patches_the_model_cannot_honour_are_refused(v2, options, word):
    model, tensors = v2
    with pytest.raises(ValueError, match=word.replace("(", r"\(").replace(")", r"\)")):
        call(model, tensors, transformer_options=options)


def test_callers_options_dict_is_not_modified(v2):
    model, tensors = v2
    options = {"patches": {}, "cond_or_uncond": [0]}
    call(model, tensors, transformer_options=options)
    assert options == {"patches": {}, "cond_or_uncond": [0]}
