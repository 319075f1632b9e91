"""Parameter and module names of the Wan2.1 DiT in the three places they live: ours (``WanDiT``),
diffusers' ``WanTransformer3DModel``, and the original Wan2.1 code (also ComfyUI's and most LoRA
trainers', behind a ``diffusion_model.`` prefix).

Each function maps a full name (``blocks.3.self_attn.to_q.weight``) or a module name
(``blocks.3.self_attn.to_q``); names without a rule are the same in both (norms,
patch_embedding, scale_shift_table, proj_out for diffusers).
"""

from __future__ import annotations

import re

# (diffusers pattern, ours); applied left to right, first match wins. Patterns end at a dot or
# at the end of the name, so that module names map like parameter names.
_END = r"(?=\.|$)"
FROM_DIFFUSERS = [
    (r"^condition_embedder\.time_embedder\.linear_1" + _END, "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2" + _END, "time_embedding.2"),
    (r"^condition_embedder\.time_proj" + _END, "time_projection.1"),
    (r"^condition_embedder\.text_embedder\.linear_1" + _END, "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2" + _END, "text_embedding.2"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj" + _END, "image_embedding.fc1"),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2" + _END, "image_embedding.fc2"),
    (r"^condition_embedder\.image_embedder" + _END, "image_embedding"),
    (r"^(blocks\.\d+)\.attn1\.to_out\.0" + _END, r"\1.self_attn.to_out"),
    (r"^(blocks\.\d+)\.attn1" + _END, r"\1.self_attn"),
    (r"^(blocks\.\d+)\.attn2\.to_out\.0" + _END, r"\1.cross_attn.to_out"),
    (r"^(blocks\.\d+)\.attn2" + _END, r"\1.cross_attn"),
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj" + _END, r"\1.ffn.0"),
    (r"^(blocks\.\d+)\.ffn\.net\.2" + _END, r"\1.ffn.2"),
]
# The inverse, written out rather than derived so that each direction reads on its own.
TO_DIFFUSERS = [
    (r"^time_embedding\.0" + _END, "condition_embedder.time_embedder.linear_1"),
    (r"^time_embedding\.2" + _END, "condition_embedder.time_embedder.linear_2"),
    (r"^time_projection\.1" + _END, "condition_embedder.time_proj"),
    (r"^text_embedding\.0" + _END, "condition_embedder.text_embedder.linear_1"),
    (r"^text_embedding\.2" + _END, "condition_embedder.text_embedder.linear_2"),
    (r"^image_embedding\.fc1" + _END, "condition_embedder.image_embedder.ff.net.0.proj"),
    (r"^image_embedding\.fc2" + _END, "condition_embedder.image_embedder.ff.net.2"),
    (r"^image_embedding" + _END, "condition_embedder.image_embedder"),
    (r"^(blocks\.\d+)\.self_attn\.to_out" + _END, r"\1.attn1.to_out.0"),
    (r"^(blocks\.\d+)\.self_attn" + _END, r"\1.attn1"),
    (r"^(blocks\.\d+)\.cross_attn\.to_out" + _END, r"\1.attn2.to_out.0"),
    (r"^(blocks\.\d+)\.cross_attn" + _END, r"\1.attn2"),
    (r"^(blocks\.\d+)\.ffn\.0" + _END, r"\1.ffn.net.0.proj"),
    (r"^(blocks\.\d+)\.ffn\.2" + _END, r"\1.ffn.net.2"),
]
# Ours -> the original Wan2.1 code's names, for the linears a LoRA may adapt.
_ATTN = r"^(blocks\.\d+\.(?:self|cross)_attn)\."
TO_WAN = [
    (_ATTN + r"to_q" + _END, r"\1.q"),
    (_ATTN + r"to_k" + _END, r"\1.k"),
    (_ATTN + r"to_v" + _END, r"\1.v"),
    (_ATTN + r"to_out" + _END, r"\1.o"),
    (_ATTN + r"add_k_proj" + _END, r"\1.k_img"),
    (_ATTN + r"add_v_proj" + _END, r"\1.v_img"),
    (r"^(blocks\.\d+\.ffn\.[02])" + _END, r"\1"),
    (r"^(text_embedding\.[02]|time_embedding\.[02]|time_projection\.1)" + _END, r"\1"),
    (r"^proj_out" + _END, "head.head"),
]

FROM_WAN = [  # the inverse of TO_WAN (where names differ)
    (r"^(blocks\.\d+\.(?:self|cross)_attn)\.q" + _END, r"\1.to_q"),
    (r"^(blocks\.\d+\.(?:self|cross)_attn)\.k" + _END, r"\1.to_k"),
    (r"^(blocks\.\d+\.(?:self|cross)_attn)\.v" + _END, r"\1.to_v"),
    (r"^(blocks\.\d+\.(?:self|cross)_attn)\.o" + _END, r"\1.to_out"),
    (r"^(blocks\.\d+\.cross_attn)\.k_img" + _END, r"\1.add_k_proj"),
    (r"^(blocks\.\d+\.cross_attn)\.v_img" + _END, r"\1.add_v_proj"),
    (r"^head\.head" + _END, "proj_out"),
]


def _rename(name: str, table) -> str | None:
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return None


def from_diffusers_name(name: str) -> str:
    """diffusers ``WanTransformer3DModel`` name -> ours."""
    return _rename(name, FROM_DIFFUSERS) or name


def to_diffusers_name(name: str) -> str:
    """Our name -> diffusers'."""
    return _rename(name, TO_DIFFUSERS) or name


def to_wan_name(module: str) -> str:
    """Our module name -> the original Wan2.1 code's; a ValueError for modules it names otherwise
    or lacks (norms, the image projection)."""
    new = _rename(module, TO_WAN)
    if new is None:
        raise ValueError(f"{module!r} has no name in the original Wan2.1 format this exporter knows "
                         "(attention q/k/v/o and image k/v, ffn.0/2, text/time embeddings, proj_out)")
    return new


def from_wan_name(module: str) -> str:
    """The original Wan2.1 code's module name -> ours (the inverse of ``to_wan_name``)."""
    return _rename(module, FROM_WAN) or module
