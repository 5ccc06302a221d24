"""ComfyUI's `transformer_options` patch protocol, honoured by the VideoCrafter U-Net (no comfy import).

The U-Net hands one dict down its blocks the way ComfyUI's SD U-Net (`UNetModel`) does:
"original_shape" (the 5D input shape), "transformer_index" (counts spatial transformers),
"block" = ("input" | "middle" | "output", block id), "block_index" (block within a spatial
transformer), "activations_shape". Patches (lists of callables under "patches"):

    emb_patch(emb, model_channels, opts) -> emb                   after the time (+ fps) embedding
    input_block_patch(h, opts) -> h                               after every input block
    input_block_patch_after_skip(h, opts) -> h                    after its skip was stored
    output_block_patch(h, skip, opts) -> h, skip                  before every output block
    attn1_patch(n, context, value, extra) -> n, context, value    spatial self-attention input
    attn1_output_patch(n, extra) -> n                             spatial self-attention output
    middle_patch(x, extra) -> x                                   between the two attentions
    attn2_patch(n, context, value, extra) -> n, context, value    spatial cross-attention input
    attn2_output_patch(n, extra) -> n                             spatial cross-attention output

and "patches_replace" {"attn1" | "attn2": {(block name, block id[, block_index]): fn(q, k, v, extra)
-> out}}, which replaces the attention product of that spatial transformer (q/k/v/out [B, N, inner]).

h is [(b t), c, h, w] (frames folded into the batch); attention tokens are per frame,
[(b t), (h w), c], with the text context repeated per frame, as in ComfyUI's own video U-Nets.
`extra` is transformer_options without the patches, plus "n_heads", "dim_head", "attn_precision".
Spatial patches do not apply to the temporal transformers. A patch name or replace key the
model cannot honour raises ValueError naming it: nothing is silently ignored.
"""
from __future__ import annotations

MODEL_PATCHES = ("emb_patch", "input_block_patch", "input_block_patch_after_skip", "output_block_patch")
BLOCK_PATCHES = ("attn1_patch", "attn1_output_patch", "middle_patch", "attn2_patch", "attn2_output_patch")
REPLACE_PATCHES = ("attn1", "attn2")


def check_transformer_options(options: dict, spatial_blocks: dict[tuple[str, int], int]) -> None:
    """Raise ValueError for a patch the U-Net does not honour. `spatial_blocks` maps
    (block name, block id) of every spatial transformer to its depth."""
    patches = options.get("patches") or {}
    unknown = [name for name in patches if name not in MODEL_PATCHES + BLOCK_PATCHES]
    if unknown:
        raise ValueError(
            f"The VideoCrafter U-Net cannot apply the model patch {', '.join(map(repr, unknown))} (set by a node "
            f"that patches the MODEL); it honours {', '.join(MODEL_PATCHES + BLOCK_PATCHES)} and attn1/attn2 "
            "replacements. Remove that node.")
    replace = options.get("patches_replace") or {}
    unknown = [name for name in replace if name not in REPLACE_PATCHES]
    if unknown:
        raise ValueError(
            f"The VideoCrafter U-Net cannot apply the replacement patch {', '.join(map(repr, unknown))}; it honours "
            "attn1 and attn2 replacements of its spatial transformers. Remove the node that sets it.")
    for name in REPLACE_PATCHES:
        for key in replace.get(name) or {}:
            if not _block_exists(key, spatial_blocks):
                where = ", ".join(f"{b}{i}" for b, i in sorted(spatial_blocks))
                raise ValueError(
                    f"A {name} replacement patch targets {key!r}, but the VideoCrafter U-Net has no spatial "
                    f"transformer there (it has them at {where}); the patch would have no effect.")


def _block_exists(key, spatial_blocks) -> bool:
    if not isinstance(key, tuple) or len(key) not in (2, 3) or tuple(key[:2]) not in spatial_blocks:
        return False
    return len(key) == 2 or (isinstance(key[2], int) and 0 <= key[2] < spatial_blocks[tuple(key[:2])])


def has_block_patches(options: dict) -> bool:
    """True when a spatial transformer block must run `patched_block_forward`."""
    patches = options.get("patches")
    if patches and any(patches.get(name) for name in BLOCK_PATCHES):
        return True
    replace = options.get("patches_replace")
    return bool(replace and any(replace.get(name) for name in REPLACE_PATCHES))


def _replacement(table: dict, options: dict):
    block = options.get("block")
    if not table or block is None:
        return None
    return table.get((block[0], block[1], options.get("block_index", 0))) or table.get(tuple(block))


def _attend(attn, replace, h, context, value, image_context, extra, options):
    if replace is None:
        return attn(h, context, image_context, value=value, transformer_options=options)
    context = h if context is None else context
    value = context if value is None else value
    q = attn.to_q(h)
    out = replace(q, attn.to_k(context), attn.to_v(value), extra)
    image = attn.image_branch(q, image_context, options)  # the I2V image branch is added as usual
    return attn.to_out(out if image is None else out + image)


def patched_block_forward(block, x, context, image_context, options: dict):
    """A spatial BasicTransformerBlock's forward with ComfyUI's attention patches, per frame.

    x [b, t, (h w), c]; context [b, L, D]; image_context [b, M, D] or None -> like x. Without
    patches it equals the block's own forward."""
    g, s, n, c = x.shape
    patches = options.get("patches") or {}
    replace = options.get("patches_replace") or {}
    extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
    extra.update(n_heads=block.attn1.heads, dim_head=block.attn1.dim_head, attn_precision=None)

    h = block.norm1(x).reshape(g * s, n, c)
    ctx = value = None
    if patches.get("attn1_patch"):
        ctx = value = h
        for patch in patches["attn1_patch"]:
            h, ctx, value = patch(h, ctx, value, extra)
    h = _attend(block.attn1, _replacement(replace.get("attn1"), options), h, ctx, value, None, extra, options)
    for patch in patches.get("attn1_output_patch") or ():
        h = patch(h, extra)
    x = h.reshape(g, s, n, c) + x
    if patches.get("middle_patch"):
        y = x.reshape(g * s, n, c)
        for patch in patches["middle_patch"]:
            y = patch(y, extra)
        x = y.reshape(g, s, n, c)

    h = block.norm2(x).reshape(g * s, n, c)
    ctx = context.repeat_interleave(s, dim=0)
    image = image_context.repeat_interleave(s, dim=0) if image_context is not None else None
    value = None
    if patches.get("attn2_patch"):
        value = ctx
        for patch in patches["attn2_patch"]:
            h, ctx, value = patch(h, ctx, value, extra)
    h = _attend(block.attn2, _replacement(replace.get("attn2"), options), h, ctx, value, image, extra, options)
    for patch in patches.get("attn2_output_patch") or ():
        h = patch(h, extra)
    x = h.reshape(g, s, n, c) + x
    return block.ff(block.norm3(x)) + x
