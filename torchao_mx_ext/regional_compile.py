"""Compile an HF decoder for generation, layer by layer or whole, with cheap guards and GQA-packed
decode attention.

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
  implementation that packs in compiled code too. Same math; the softmax runs over the same keys. On
  AVX2 and AVX-512 CPUs the packed step runs :mod:`.kernels.cpu_decode_attention` (ATen's flash
  attention tiles for long queries: 2x slower on a Zen 4 core, emulated bf16 GEMMs on AVX2); its
  softmax weights stay float32 where ATen's bf16 kernel rounds them to bf16, so decode-step logits
  differ from an eager ``sdpa`` model's by that rounding (an eager model switched to
  :data:`PACKED_GQA_SDPA` gives the compiled numbers). On AVX-512 CPUs without AMX prompts run
  :mod:`.kernels.cpu_prompt_attention` (ATen's kernel: 2x slower there, a third of a W4A4 prefill),
  with the same float32 softmax, so prompt logits differ from ``sdpa``'s by that rounding too.
* **Operator calls.** Inductor's Python wrapper pays a few microseconds per extern call, hundreds a
  step; the GEMVs that read one activation (q/k/v, gate/up) run as one call
  (:class:`~.gemv_grouping.GroupSharedInputGEMVs`, a post-grad pass; same bits).
* **Recomputed rotary embedding.** transformers computes the rotary cos / sin once a forward;
  Inductor's heuristics recomputed them inside every layer's kernel for every head (12% of a W4A4
  prompt on a Zen 4 core). ``realize_opcount_threshold`` is set to 4, so they are stored once.
* **The calls themselves.** Where :mod:`.decoder_step` applies (Llama-family layers on CPU), batch-1
  decode steps over a static cache skip the graph: the whole step is one C++ call (``fused_decode``,
  on by default; 1.3-1.6x the graph step's tokens/s on a Zen 4 core, ``docs/results.md``).
* **Exactness.** Inductor's ``emulate_precision_casts`` is on, so a bfloat16 W4A4 model compiles to the
  same logits as eager (activation quantization would turn fused-precision differences into FP4 steps).

:func:`compile_model` applies the same to the whole model (one graph per input shape, a Dynamo cache
of its own): no per-layer wrappers and guard checks between layers, the faster batch-1 decode, at a
longer compile.

    tme.compile_decoder_layers(model)            # + model.set_attn_implementation(PACKED_GQA_SDPA)
    tme.compile_model(model)                     # the same options, one graph for the whole step
"""

import logging
import types
from typing import Optional

import torch
import torch.nn.functional as F

from .architectures import decoder_layers
from .gemv_grouping import GroupSharedInputGEMVs
from .kernels import cpu_decode_attention, cpu_prompt_attention

logger = logging.getLogger(__name__)

__all__ = ["PACKED_GQA_SDPA", "compile_decoder_layers", "compile_model", "packed_gqa_sdpa_attention", "register_packed_gqa_sdpa"]

PACKED_GQA_SDPA = "torchao_mx_ext_sdpa_packed_gqa"


def packed_gqa_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: Optional[float] = None, **kwargs):
    """transformers' ``sdpa`` attention, packing grouped query heads for one-token steps also when compiled.

    ``query [B, H, 1, D]`` becomes ``[B, H_kv, g, D]`` (``g = H / H_kv``: the query heads that share a
    key/value head, consecutive in transformers' layout), attends to ``key``/``value [B, H_kv, L, D]``
    with the mask ``[B, 1, 1, L]`` broadcast over heads and rows, and is unpacked to ``[B, 1, H, D]``.
    Prompts on AVX-512 CPUs without AMX run :mod:`.kernels.cpu_prompt_attention` (where it applies;
    no position bias or soft-capping). Anything else (other prompts, no grouping, per-head masks,
    position biases, soft-capping) goes to transformers' ``sdpa_attention_forward`` unchanged."""
    groups = getattr(module, "num_key_value_groups", 1)
    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    simple = (
        query.shape[2] == 1 and groups > 1 and plain
        and (attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1))
    )
    if not simple and plain and (attention_mask is None or attention_mask.shape[-1] == key.shape[2]):
        if cpu_prompt_attention.applies(query, key, value, attention_mask, dropout):  # AVX-512 without AMX: prompts
            return _prompt_attention(module, query, key, value, attention_mask, scaling, kwargs.get("is_causal")), None
    if not simple:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, _, dim = query.shape
    packed = query.reshape(batch, heads // groups, groups, dim)
    if cpu_decode_attention.applies(packed, key, value, attention_mask, dropout):  # AVX2 / AVX-512: the few-row kernel
        out = cpu_decode_attention.decode_attention(packed, key, value, attention_mask, scaling)
    else:
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling)
    return out.reshape(out.shape[0], heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _prompt_attention(module, query, key, value, attention_mask, scaling, is_causal):
    """Prompt rows through :mod:`.kernels.cpu_prompt_attention` (grouped heads read their key/value head
    directly), with transformers' ``sdpa`` rules for causality: causal where no mask is given and the
    module is causal, aligned top-left, the keys cut to the prompt's length as transformers does."""
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_length:
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    out = cpu_prompt_attention.prompt_attention(query, key, value, attention_mask, scaling, is_causal)
    return out.transpose(1, 2).contiguous()


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


def _compile_own_forward(module, name: str, backend, fullgraph, dynamic, options, compile_kwargs) -> None:
    """``module.forward`` becomes ``torch.compile`` of a function with a code object of its own:
    Dynamo keeps its compiled entries on the code object, so ``module`` gets a cache of its own."""
    fn = types.FunctionType(_call_forward.__code__.replace(co_name=name, co_qualname=name), _call_forward.__globals__, name)
    compiled = torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=dynamic, options=options or None, **compile_kwargs)
    module.forward = types.MethodType(compiled, module)


def _prepare(model, packed_gqa: bool, skip_module_guards: bool, emulate_precision_casts: bool, backend, compile_kwargs) -> dict:
    """Switch ``model`` to the GQA-packed attention (if asked and it uses ``sdpa``) and return the
    ``torch.compile`` options both entry points share (``compile_kwargs``' own ``options`` popped in)."""
    if packed_gqa and getattr(model.config, "_attn_implementation", None) == "sdpa":
        register_packed_gqa_sdpa()
        model.set_attn_implementation(PACKED_GQA_SDPA)
    options = dict(compile_kwargs.pop("options", None) or {})
    if skip_module_guards:
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    if emulate_precision_casts and backend == "inductor":
        options.setdefault("emulate_precision_casts", True)
    if backend == "inductor":
        # The generated wrapper checks every input's and extern output's sizes, strides and alignment on
        # each call (~45 checks a decoder layer); the graphs here are static and our ops return dense
        # outputs, so they only cost time (~0.5 ms a SmolLM2-135M decode step on one Zen 3 core).
        options.setdefault("size_asserts", False)
        options.setdefault("alignment_asserts", False)
        # q/k/v (and gate/up) GEMVs of a decode step as one operator call each (gemv_grouping.py).
        options.setdefault("post_grad_custom_post_pass", GroupSharedInputGEMVs())
        # Store a pointwise result read by several kernels once it costs more than 4 operations, instead
        # of recomputing it in each (Inductor's default: 30). The rotary embedding's cos / sin (computed
        # once a forward by transformers) were otherwise recomputed for every head of every layer: 12%
        # of a SmolLM2-135M W4A4 prompt on a Zen 4 core (0.61-0.63 against 0.68-0.75 s, docs/results.md).
        options.setdefault("realize_opcount_threshold", 4)
    return options


def compile_decoder_layers(
    model: torch.nn.Module,
    *,
    packed_gqa: bool = True,
    skip_module_guards: bool = True,
    emulate_precision_casts: bool = True,
    fused_decode: bool = True,
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
    mask construction and LM head stay eager. ``fused_decode``: batch-1 decode steps run as one C++
    call where :mod:`.decoder_step` applies, as in :func:`compile_model`.
    """
    options = _prepare(model, packed_gqa, skip_module_guards, emulate_precision_casts, backend, compile_kwargs)
    for i, layer in enumerate(decoder_layers(model, "compile_decoder_layers")):
        _compile_own_forward(layer, f"decoder_layer_{i}", backend, fullgraph, dynamic, options, compile_kwargs)
    if fused_decode:
        _route_decode_steps(model)
    return model


def compile_model(
    model: torch.nn.Module,
    *,
    packed_gqa: bool = True,
    skip_module_guards: bool = True,
    emulate_precision_casts: bool = True,
    freeze: bool = True,
    fused_decode: bool = True,
    backend="inductor",
    fullgraph: bool = True,
    dynamic: Optional[bool] = False,
    **compile_kwargs,
) -> torch.nn.Module:
    """Compile a whole HF causal LM in place as one graph per input shape; returns ``model``.

    With a static KV cache (:func:`torchao_mx_ext.eval.generation.static_cache`) that is two graphs:
    the prompt and every decode step. One graph per step leaves no Python between layers, which is
    what batch-1 decode needs (``docs/results.md``: 1.2x the per-layer graphs' tokens/s); it compiles
    slower than :func:`compile_decoder_layers`, whose per-layer graphs share Inductor's FX-graph cache.
    ``model.forward`` gets a code object of its own (a Dynamo cache per model, so two compiled models
    never share entries) and the options of :func:`compile_decoder_layers`: ``skip_module_guards``
    (measured: Dynamo's guards over the whole model's parameters and quantized-tensor attributes cost
    about 4 ms a decode step on SmolLM2-135M; a change to the model after its first call is then not
    noticed, so quantize, share inputs and untie before), ``packed_gqa`` and
    ``emulate_precision_casts`` (compiled logits equal eager ones). Embedding and LM head are inside
    the graph. ``freeze`` turns on Inductor's freezing: parameters become constants of the compiled
    graph instead of inputs of every call (SmolLM2-135M W4A4: about 700 tensors, codes, scales and
    rotations, gathered and checked per step; measured 0.4-0.5 ms of a 14 ms decode step on one Zen 3
    core, ``docs/results.md``; no extra memory: the constants are the parameters' own tensors). The
    weights must then not change after the first call. ``fused_decode``: where
    :mod:`.decoder_step` applies (Llama-family layers of dense, MXFP4 or int8 linears, the C++ kernels
    built), batch-1 decode steps over a static cache skip the graph and run as one C++ call
    (:class:`~.decoder_step.FusedDecodeStep`: no guards, no per-operator wrapper; logits equal to bf16
    rounding, not guaranteed bit for bit); other calls run the compiled graph. Needs the model's ``forward`` on its
    class (any ``PreTrainedModel``)."""
    if "forward" in vars(model):
        raise ValueError("compile_model: this model's forward is already replaced (compiled?); compile a fresh model")
    if freeze and backend == "inductor":
        compile_kwargs["options"] = {"freezing": True, **(compile_kwargs.get("options") or {})}
    options = _prepare(model, packed_gqa, skip_module_guards, emulate_precision_casts, backend, compile_kwargs)
    _compile_own_forward(model, f"{type(model).__name__}_forward", backend, fullgraph, dynamic, options, compile_kwargs)
    if fused_decode:
        _route_decode_steps(model)
    return model


def _route_decode_steps(model: torch.nn.Module) -> None:
    """Send the batch-1 decode steps :class:`~.decoder_step.FusedDecodeStep` takes to it, the rest to
    the compiled forward (kept as ``model.forward``'s fallback). Logs where it does not apply."""
    from .decoder_step import FusedDecodeStep, why_not

    why = why_not(model)
    if why is not None:
        logger.info("decode steps stay in the compiled graph (the fused C++ step does not apply: %s)", why)
        return
    step = FusedDecodeStep(model)
    compiled = model.forward

    def forward(self, input_ids=None, *args, cache=None, **kwargs):
        if not args and step.accepts(input_ids, cache, kwargs):
            return step(input_ids, cache)
        return compiled(input_ids, *args, cache=cache, **kwargs)

    model.forward = types.MethodType(forward, model)
    model._tme_decode_step = step
