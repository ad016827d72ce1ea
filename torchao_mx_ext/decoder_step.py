"""Batch-1 decode steps of Llama-family decoders as one C++ call on CPUs.

A compiled decode step of a small model is a few hundred operator calls: Dynamo's guard check, then
Inductor's Python wrapper calling each GEMV, attention, norm and pointwise kernel. On a Zen 4 core that
bookkeeping was a third of a SmolLM2-135M W4A4 step (``benchmarks/decode_profile.py``), and each call
paid cold caches after the weights had streamed through them (``docs/results.md``).
:class:`FusedDecodeStep` runs the whole step (embedding, every layer, final norm, head) in one call of
``torch.classes.torchao_mx_ext.DecoderStep`` (``kernels/decoder_step.cpp``), the "replay" of a
captured graph without the capture: the linears run the operators' own kernels (the MXFP4 GEMV with its
fused rotation and activation quantization, the int8 head, dense linears through ``at::linear``),
attention the decode-attention kernel over the static cache's prefix, and norms, RoPE, SiLU and the
residual adds are small loops that round to the model dtype where eager PyTorch does.

It applies to decoders whose layers are transformers' ``LlamaDecoderLayer`` layout (Llama, Mistral,
Qwen2, Qwen3: RMSNorm, rotary attention with grouped key/value heads, Qwen3's per-head q/k norms,
SiLU-gated MLP; q/k/v biases allowed)
with each linear dense, MXFP4 (:class:`~.tensors.RotatedMXFP4Tensor`; W4A4 where its input transform
fuses into the GEMV, or weight-only) or int8 (:class:`~.inference.Int8WeightOnlyLinear`), including
after :func:`~.shared_quant.share_input_quantization` (the members' per-linear weights are used:
the same numbers). :func:`why_not` says why a model is left out. A step is taken when the call is
``model(token [1, 1], cache=<StaticCache of batch 1>, use_cache=..., logits_to_keep=..., return_dict=...)``
with no positions or other inputs, no gradient needed, and no mask or one that selects exactly the cached
keys so far (``generate(..., cache_implementation="static")`` passes that one); anything else runs the
model's own forward.

Numbers: the linears' and attention's are their operators' (attention as :data:`PACKED_GQA_SDPA`: float32
softmax weights); elsewhere eager PyTorch's roundings, with float32 sums in another order and a
polynomial exp in SiLU (a few float32 ulps), so logits match the eager model's to bf16 rounding
(``tests/test_decoder_step.py``; bit for bit on its small models, not guaranteed in general).

    tme.compile_model(model)   # uses it for batch-1 CPU decode steps where it applies
"""

from __future__ import annotations

from typing import Optional

import torch

from .kernels import cpu_extension, cpu_mxfp4_quantize
from .mx.e8m0 import element_multiplier
from .shared_quant import per_linear_weights
from .tensors import RotatedMXFP4Tensor

__all__ = ["FusedDecodeStep", "SUPPORTED_LAYERS", "why_not"]

# Decoder layers with LlamaDecoderLayer's forward (pre-norm attention and SiLU-gated MLP, residual adds);
# Qwen3's adds an RMSNorm over each query and key head before RoPE.
SUPPORTED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")


def _linear_kind(module: torch.nn.Module, dtype: torch.dtype, weight=None) -> tuple[Optional[str], Optional[tuple]]:
    """(why not, None) or (None, spec) for one linear: ``("dense", w, b)``, ``("int8", q, s, b)`` or
    ``("mxfp4", qdata, scale, bias, rotation, block_size, multiplier, act_rule)``. ``weight``: the
    per-linear weight of a shared group's member (in place of ``module.weight``)."""
    from .inference import Int8WeightOnlyLinear

    if isinstance(module, Int8WeightOnlyLinear):
        return None, ("int8", module.qweight, module.scales, module.bias)
    if not isinstance(module, torch.nn.Linear):
        return f"{type(module).__name__} is not a linear", None
    w = module.weight if weight is None else weight
    bias = module.bias
    if not isinstance(w, RotatedMXFP4Tensor):
        if type(w) not in (torch.Tensor, torch.nn.Parameter) or w.dtype != dtype:
            return f"a {type(w).__name__} {w.dtype} weight", None
        return None, ("dense", w.detach(), None if bias is None else bias.detach())
    # A dense cache (cache_dequantized_weights) is left aside: one-row linears read the codes with it too.
    if w.qdata.dim() != 2 or w.kernel_preference == "emulated" or w.block_size % 32:
        return "an MXFP4 weight with the emulated preference or blocks not a multiple of 32", None
    if "fp_quant" in (w.scale_rule, w.act_scale_rule) or w.in_features != w.padded_in_features:
        return "an MXFP4 weight with fp_quant scales or a padded width", None
    rotation = w.rotation
    if w.act_scale_rule is not None and not cpu_mxfp4_quantize.fuses_into_gemv(w):
        return "a W4A4 weight whose input transform does not fuse into the GEMV", None
    if w.act_scale_rule is None and rotation is not None and not cpu_mxfp4_quantize.takes_rotation(rotation):
        return "a weight-only rotation the C++ transform does not take", None
    gemm_bias = None if bias is None else bias.detach().to(w.gemm_dtype(dtype))
    return None, ("mxfp4", w.qdata, w.scale, gemm_bias, rotation, w.block_size, element_multiplier(w.scale_rule), w.act_scale_rule)


def _rms_norm(module) -> Optional[tuple]:
    if not type(module).__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon"):
        return None
    return module.weight.detach(), float(module.variance_epsilon)


def _layers_spec(model) -> tuple[Optional[str], Optional[dict]]:
    config = model.config.get_text_config(decoder=True)
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if getattr(inner, name, None) is None:
            return f"model.model.{name} is missing", None
    dtype = inner.embed_tokens.weight.dtype
    if dtype not in (torch.bfloat16, torch.float16, torch.float32) or inner.embed_tokens.weight.device.type != "cpu":
        return f"a {dtype} model on {inner.embed_tokens.weight.device}", None
    if type(inner.embed_tokens) is not torch.nn.Embedding or type(inner.embed_tokens.weight) not in (torch.Tensor, torch.nn.Parameter):
        return "the embedding is not a plain nn.Embedding", None
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} (SiLU only)", None
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return "sliding-window layers", None
    rope_type = getattr(inner.rotary_emb, "rope_type", "default")
    if "dynamic" in rope_type or "longrope" in rope_type:
        return f"a {rope_type} rotary embedding (its tables depend on the sequence length)", None
    layers = []
    for i, layer in enumerate(inner.layers):
        if type(layer).__name__ not in SUPPORTED_LAYERS:
            return f"layer {i} is a {type(layer).__name__} ({', '.join(SUPPORTED_LAYERS)} only)", None
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        # The families' own modules (LlamaAttention / LlamaMLP, ...), not replacements such as MoE blocks.
        if not type(attn).__name__.endswith("Attention") or not type(mlp).__name__.endswith("MLP"):
            return f"layer {i}: its self_attn / mlp are a {type(attn).__name__} / {type(mlp).__name__}", None
        qk_norms = None  # Qwen3: an RMSNorm over each query and key head
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "k_norm", None) is not None:
            qk_norms = [_rms_norm(getattr(attn, n, None)) for n in ("q_norm", "k_norm")]
            if None in qk_norms or qk_norms[0][1] != qk_norms[1][1]:
                return f"layer {i}: q/k norms that are not a pair of RMSNorms with one eps", None
        norms = [_rms_norm(getattr(layer, n, None)) for n in ("input_layernorm", "post_attention_layernorm")]
        if None in norms:
            return f"layer {i}: its norms are not RMSNorms", None
        specs = {}
        for parent, names in ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")), (mlp, ("gate_proj", "up_proj", "down_proj"))):
            shared = per_linear_weights(parent) or {}
            for n in names:
                module = getattr(parent, n, None)
                if module is None:
                    return f"layer {i}: no {n}", None
                why, spec = _linear_kind(module, dtype, shared.get(n))
                if why is not None:
                    return f"layer {i}.{n}: {why}", None
                specs[n] = spec
        layers.append({"norms": norms, "qk_norms": qk_norms, "linears": specs, "scaling": float(attn.scaling)})
    norm = _rms_norm(inner.norm)
    head = getattr(model, "lm_head", None)
    if norm is None or head is None:
        return "no final RMSNorm or lm_head", None
    why, head_spec = _linear_kind(head, dtype)
    if why is not None:
        return f"lm_head: {why}", None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return "logit soft-capping or scaling", None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return None, {
        "dtype": dtype, "layers": layers, "norm": norm, "head": head_spec, "hidden": config.hidden_size,
        "heads": config.num_attention_heads, "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "head_dim": head_dim,
    }


def why_not(model: torch.nn.Module) -> Optional[str]:
    """Why :class:`FusedDecodeStep` does not apply to ``model`` (``None`` if it does)."""
    if not cpu_extension.is_available():
        return "the C++ CPU kernels are unavailable"
    why, _ = _layers_spec(model)
    return why


class FusedDecodeStep:
    """The decode-step engine of one model (see the module docstring). ``model``'s weights are read at
    construction (the engine holds references: quantize, share and untie before)."""

    def __init__(self, model: torch.nn.Module):
        if not cpu_extension.is_available():
            raise RuntimeError("FusedDecodeStep: the C++ CPU kernels are unavailable")
        why, spec = _layers_spec(model)
        if why is not None:
            raise ValueError(f"FusedDecodeStep does not apply to this model: {why}")
        self.model = model
        self.dtype = spec["dtype"]
        scalings = {layer["scaling"] for layer in spec["layers"]}
        if len(scalings) != 1:
            raise ValueError("FusedDecodeStep: layers with different attention scalings")
        self.engine = torch.classes.torchao_mx_ext.DecoderStep(spec["hidden"], spec["heads"], spec["kv_heads"], spec["head_dim"], scalings.pop())
        self._head_dim = spec["head_dim"]
        self._rope_len = 0  # positions in the engine's rotary tables: set when a cache is bound
        self.engine.set_embedding(model.model.embed_tokens.weight.detach())
        for layer in spec["layers"]:
            ids = {n: self._add(s) for n, s in layer["linears"].items()}
            (in_w, in_eps), (post_w, post_eps) = layer["norms"]
            (q_norm, qk_eps), (k_norm, _) = layer["qk_norms"] or ((None, 1e-6), (None, 1e-6))
            self.engine.add_layer(in_w, in_eps, post_w, post_eps, [ids["q_proj"], ids["k_proj"], ids["v_proj"]], ids["o_proj"],
                                  [ids["gate_proj"], ids["up_proj"]], ids["down_proj"], q_norm, k_norm, qk_eps)
        norm_w, norm_eps = spec["norm"]
        self.engine.set_head(norm_w, norm_eps, self._add(spec["head"]))
        self._cache = None
        self._bound = None  # the bound cache's first keys and length tensors: re-bound if either is replaced

    def _add(self, spec: tuple) -> int:
        kind, *args = spec
        if kind == "dense":
            return self.engine.add_dense(*args)
        if kind == "int8":
            return self.engine.add_int8(*args)
        return self.engine.add_mxfp4(*args)

    def _set_rope(self, positions: int) -> None:
        """The model's own rotary tables (cos, sin ``[positions, head_dim]`` in the model dtype), as its
        rotary module computes them for positions 0 .. positions - 1."""
        with torch.inference_mode():
            probe = torch.zeros(1, positions, self._head_dim, dtype=self.dtype)
            cos, sin = self.model.model.rotary_emb(probe, torch.arange(positions).unsqueeze(0))
        self.engine.set_rope(cos[0].to(self.dtype).contiguous(), sin[0].to(self.dtype).contiguous())
        self._rope_len = positions

    def _bind(self, cache) -> bool:
        """Bind the engine to ``cache`` (a batch-1 ``StaticCache`` of full-attention layers, initialised,
        in the model dtype on the CPU); False if it is not one."""
        if type(cache).__name__ != "StaticCache":
            return False
        layers = getattr(cache, "layers", [])
        if len(layers) != len(self.model.model.layers):
            return False
        if not all(type(la).__name__ == "StaticLayer" and getattr(la, "is_initialized", False) for la in layers):
            return False
        keys = [la.keys for la in layers]
        if any(k.dim() != 4 or k.shape[0] != 1 or k.dtype != self.dtype or k.device.type != "cpu" or not k.is_contiguous() for k in keys):
            return False
        sliding = getattr(self.model.config.get_text_config(decoder=True), "sliding_window", None)
        max_len = keys[0].shape[2]
        if sliding is not None and max_len > sliding:
            return False
        if self._rope_len < max_len:
            self._set_rope(max_len)
        self.engine.bind_cache(keys, [la.values for la in layers], [la.cumulative_length for la in layers])
        self._cache, self._bound = cache, (keys[0], layers[0].cumulative_length)
        return True

    def accepts(self, input_ids, cache, kwargs: dict) -> bool:
        """Whether this call is a step the engine takes (see the module docstring)."""
        if cache is None or torch.is_grad_enabled() or not isinstance(input_ids, torch.Tensor):
            return False
        if input_ids.shape != (1, 1) or input_ids.dtype != torch.long or input_ids.device.type != "cpu":
            return False
        mask = None
        for name, value in kwargs.items():
            if name == "use_cache" and value is not False:
                continue
            if name == "return_dict" and value is not False:
                continue
            if name == "logits_to_keep" and isinstance(value, int):
                continue
            if name == "attention_mask" and isinstance(value, dict) and list(value) == ["full_attention"]:
                value = value["full_attention"]  # generate() passes the masks by layer type
            if name == "attention_mask" and isinstance(value, torch.Tensor):
                mask = value
                continue
            if value is not None or name not in ("attention_mask", "position_ids", "inputs_embeds", "labels", "cache_position"):
                return False
        bound = cache is self._cache and cache.layers[0].keys is self._bound[0] and cache.layers[0].cumulative_length is self._bound[1]
        if not bound and not self._bind(cache):
            return False
        # A mask is taken only where it selects what the step attends to anyway (generate()'s static-cache mask).
        return mask is None or self.engine.mask_is_causal_prefix(mask)

    def __call__(self, input_ids: torch.Tensor, cache):
        """The step's ``CausalLMOutputWithPast`` (logits ``[1, 1, V]``); writes the cache in place."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(logits=self.engine.step(input_ids), cache=cache)
