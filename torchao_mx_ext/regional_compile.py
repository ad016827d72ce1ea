"""Compile a decoder layer by layer, with cheap guards and GQA-packed decode attention.

Compiling the whole model with ``fullgraph=True`` works (``tests/test_compile.py``) but generates code
for every layer. Regional compilation (each decoder layer compiled on its own; all layers share the
generated code through Inductor's FX-graph cache) compiles far faster, and leaves two per-step costs
that this module removes, and one exactness trap (timings: ``docs/results.md``):

* **Guard evaluation.** ``layer.compile()`` gives every layer the same code object (``Module._call_impl``)
  and so one Dynamo cache; the layers differ in constants (the layer index picks its KV-cache slot), so
  the cache holds ``2 x num_layers`` entries (prompt and decode step per layer) that each call scans,
  evaluating a guard tree over the whole module and cache for each.
  :func:`compile_decoder_layers` gives each layer its own code object (its own cache: 2 entries) and,
  by default, drops the guards on module attributes (``torch.compiler.skip_guard_on_all_nn_modules_unsafe``).
* **GQA decode attention.** For one query token, transformers' SDPA path folds the query heads of each
  key/value head into the query-length axis (``pack_gqa``: ``[B, H, 1, D] -> [B, H_kv, H / H_kv, D]``),
  so attention reads each cached key once instead of ``H / H_kv`` times; it skips that under Dynamo and
  repeats keys and values instead (``repeat_kv``). :data:`PACKED_GQA_SDPA` is an attention
  implementation that packs in compiled code too. Same math; the softmax runs over the same keys.
* **Exactness.** Inductor's ``emulate_precision_casts`` is on, so a bfloat16 W4A4 model compiles to the
  same logits as eager (activation quantization would turn fused-precision differences into FP4 steps).

    tme.compile_decoder_layers(model)            # + model.set_attn_implementation(PACKED_GQA_SDPA)
"""

import types
from typing import Optional

import torch
import torch.nn.functional as F

from .architectures import decoder_layers

__all__ = ["PACKED_GQA_SDPA", "compile_decoder_layers", "packed_gqa_sdpa_attention", "register_packed_gqa_sdpa"]

PACKED_GQA_SDPA = "torchao_mx_ext_sdpa_packed_gqa"


def packed_gqa_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None, **kwargs):
    """transformers' ``sdpa`` attention, packing grouped query heads for one-token steps also when compiled.

    ``query [B, H, 1, D]`` becomes ``[B, H_kv, g, D]`` (``g = H / H_kv``: the query heads that share a
    key/value head, consecutive in transformers' layout), attends to ``key``/``value [B, H_kv, L, D]``
    with the mask ``[B, 1, 1, L]`` broadcast over heads and rows, and is unpacked to ``[B, 1, H, D]``.
    Anything else (prefill, no grouping, per-head masks, position biases, soft-capping) goes to
    transformers' ``sdpa_attention_forward`` unchanged."""
    groups = getattr(module, "num_key_value_groups", 1)
    simple = (
        query.shape[2] == 1 and groups > 1 and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
        and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1))
    )
    if not simple:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups, dim)
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(out.shape[0], heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register_packed_gqa_sdpa() -> None:
    """Register :func:`packed_gqa_sdpa_attention` with transformers as :data:`PACKED_GQA_SDPA` (masks as
    ``sdpa``), so ``model.set_attn_implementation(PACKED_GQA_SDPA)`` works. :func:`compile_decoder_layers`
    does it; idempotent. Not done at import: it would import transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_GQA_SDPA, packed_gqa_sdpa_attention)
    AttentionMaskInterface.register(PACKED_GQA_SDPA, sdpa_mask)


def _call_forward(layer, *args, **kwargs):
    return type(layer).forward(layer, *args, **kwargs)


def compile_decoder_layers(
    model: torch.nn.Module,
    *,
    packed_gqa: bool = True,
    skip_module_guards: bool = True,
    emulate_precision_casts: bool = True,
    backend="inductor",
    fullgraph: bool = True,
    dynamic: Optional[bool] = False,
    **compile_kwargs,
) -> torch.nn.Module:
    """Compile each decoder layer of an HF causal LM (``model.model.layers``) in place; returns ``model``.

    Each layer's ``forward`` becomes ``torch.compile`` of a function with a code object of its own, so
    each layer has its own Dynamo cache (the prompt and the decode-step graph). ``skip_module_guards``
    drops Dynamo's guards on module attributes: calls are cheaper, but a change to a layer after its
    first call (a new weight type, hooks added, ``share_input_quantization``) is not noticed; make such
    changes before, or call this again (a fresh compile). ``packed_gqa`` switches the model to
    :data:`PACKED_GQA_SDPA` when it uses ``sdpa``. ``emulate_precision_casts`` (Inductor) rounds
    fused intermediates to bfloat16/float16 where eager code does: activation quantization is
    discontinuous, and without it a bfloat16 W4A4 model's compiled logits differ from eager by whole
    FP4 steps (with it they are identical: ``tests/test_regional_compile.py``). Embedding,
    mask construction and LM head stay eager.
    """
    if packed_gqa and getattr(model.config, "_attn_implementation", None) == "sdpa":
        register_packed_gqa_sdpa()
        model.set_attn_implementation(PACKED_GQA_SDPA)
    options = dict(compile_kwargs.pop("options", None) or {})
    if skip_module_guards:
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    if emulate_precision_casts and backend == "inductor":
        options.setdefault("emulate_precision_casts", True)
    for i, layer in enumerate(decoder_layers(model, "compile_decoder_layers")):
        name = f"decoder_layer_{i}"
        # A new code object per layer: Dynamo keeps its compiled entries on the code object.
        fn = types.FunctionType(_call_forward.__code__.replace(co_name=name, co_qualname=name), _call_forward.__globals__, name)
        compiled = torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=dynamic, options=options or None, **compile_kwargs)
        layer.forward = types.MethodType(compiled, layer)
    return model
