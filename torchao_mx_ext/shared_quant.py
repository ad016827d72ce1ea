"""Rotate and quantize a shared activation once: q/k/v (and gate/up) read the same input.

Each :class:`RotatedMXFP4Tensor` linear pads, rotates and MXFP4-quantizes its own input, so in a
decoder layer q_proj, k_proj and v_proj each compute ``Q_a(x R)`` of the same ``x`` (and gate_proj and
up_proj of theirs). Neither Dynamo, AOTAutograd nor Inductor merges them: each weight's rotation block
reaches the graph as a separate input (tensor subclasses are flattened per parameter), and Inductor
does not eliminate duplicate subgraphs even when the inputs are the same tensor (kernel counts:
``benchmarks/README.md``). A W4A4 layer of a compiled decoder therefore runs 7 rotation GEMMs and 7
activation-quantization kernels where 4 suffice.

:func:`share_input_quantization` computes it once per group: a forward pre-hook on the group's parent
(``self_attn``, ``mlp``) replaces the parent's input ``x`` by ``Q_a(pad(x) R)`` (cast back to ``x``'s
dtype), and the members' weights become the same codes with no rotation and no activation
quantization (``Q(W R)`` over the padded width). The result is bit for bit the same: MXFP4 values are
exact in bfloat16 and the members' GEMMs see the same operands in the same dtype (groups where that
does not hold, ``fp_quant`` scales on bfloat16/float16 models, are left alone with a warning).

Where W4A4 runs the CPU integer GEMM (``kernels/cpu_mxfp4_mm.py``), which needs the activation as codes,
the members keep their activation rule and re-derive the codes from the shared input, an elementwise
pass (the rotation, a GEMM, is still done once). Quantizing MXFP4 values again gives the same values
for the ``floor``, ``even``, ``rceil`` and ``mse`` rules (:data:`REQUANTIZE_EXACT`; the block maximum
lands on 4 or 6 times the scale, or on a value the next lower scale represents exactly), so the
result is again bit for bit the same (``tests/test_shared_quant.py`` checks both).

It assumes what holds for Llama-family decoders (``SUPPORTED_ARCHITECTURES``): the parent passes its
first input unchanged to every member and to nothing else. For other models pass ``groups`` (and
``check_architecture=False``) only where that is true. Like :func:`cache_dequantized_weights`, it is
an inference-time mode: :func:`unshare_input_quantization` restores the per-linear weights; saving a
checkpoint in this mode writes the per-linear weights (:func:`per_linear_state_dict`).

    tme.share_input_quantization(model)
    model = torch.compile(model, fullgraph=True)
"""

import logging
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Sequence, Tuple

import torch

from .kernels import cpu_mxfp4_gemv, cpu_mxfp4_mm, cpu_mxfp4_quantize
from .rotation.fusion import SUPPORTED_ARCHITECTURES
from .tensors import RotatedMXFP4Tensor

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_GROUPS", "REQUANTIZE_EXACT", "per_linear_state_dict", "per_linear_weights", "share_input_quantization", "shared_groups", "unshare_input_quantization"]

# Activation scale rules for which quantizing an MXFP4 tensor again returns the same values.
REQUANTIZE_EXACT = ("floor", "even", "rceil", "mse")

# Children of one parent module that read the parent's input (Llama, Mistral, Qwen2, Qwen3).
DEFAULT_GROUPS: Tuple[Tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_META = "_mx_shared_input"  # on the parent: a _SharedInput (plain attribute, not state)
# Non-persistent buffer on the parent: the rotation block's float32 bits as int32, so that it moves
# with .to(device) but .to(dtype) cannot round it (floating buffers are cast), and never in state_dict.
_ROTATION = "_mx_shared_rotation"


@dataclass(frozen=True)
class _SharedInput:
    members: Tuple[str, ...]
    block_size: int
    act_scale_rule: Optional[str]
    in_features: int
    padded_in_features: int
    exact_dtypes: FrozenSet[torch.dtype]  # input dtypes for which passing Q_a(x R) in that dtype is exact
    kernel_preference: str = "auto"  # "emulated" if any member asks for the reference numbers


def _compatible(weights: Sequence[RotatedMXFP4Tensor]) -> Optional[str]:
    """Why these weights cannot share one input transform (``None`` if they can)."""
    w0 = weights[0]
    for w in weights[1:]:
        same = (
            w.block_size == w0.block_size
            and w.act_scale_rule == w0.act_scale_rule
            and w.in_features == w0.in_features
            and w.padded_in_features == w0.padded_in_features
            and w.dtype == w0.dtype
            and (w.rotation is None) == (w0.rotation is None)
            and (w.rotation is None or (w.rotation.shape == w0.rotation.shape and torch.equal(w.rotation, w0.rotation)))
        )
        if not same:
            return "their rotation, activation scale rule, block size or width differ"
    if w0.rotation is None and w0.act_scale_rule is None and w0.padded_in_features == w0.in_features:
        return "they have nothing to share (no rotation, padding or activation quantization)"
    if w0.dtype not in _exact_dtypes(weights):
        return f"passing Q_a(x R) as {w0.dtype} would round it (fp_quant scales or a float16 model)"
    return None


def _exact_dtypes(weights: Sequence[RotatedMXFP4Tensor]) -> FrozenSet[torch.dtype]:
    """Input dtypes for which casting the transformed input to that dtype loses nothing that the
    members' GEMMs would have kept: float32, and the dtypes a member's GEMM itself runs in."""
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    return frozenset(d for d in dtypes if d == torch.float32 or all(w.gemm_dtype(d) == d for w in weights))


def _shared_input(meta: _SharedInput, rotation: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``Q_a(pad(x) R)`` (or ``pad(x) R`` for weight-only) in ``x.dtype``: what each member computed
    (``RotatedMXFP4Tensor.transform_input``, in float32)."""
    if x.dtype not in meta.exact_dtypes:
        raise TypeError(
            f"shared input quantization of these weights is exact for {sorted(str(d) for d in meta.exact_dtypes)} "
            f"inputs; got {x.dtype}: call unshare_input_quantization(model) first"
        )
    if x.shape[-1] != meta.in_features:
        raise ValueError(f"expected an input of width {meta.in_features}, got {tuple(x.shape)}")
    xr = cpu_mxfp4_quantize.rotate_and_quantize(
        x, meta.padded_in_features, None if rotation is None else rotation.view(torch.float32), meta.block_size,
        meta.act_scale_rule, meta.kernel_preference,
    )
    return xr.to(x.dtype)


def _pre_hook(module, args, kwargs):
    meta, rotation = getattr(module, _META), getattr(module, _ROTATION)
    if args:
        return (_shared_input(meta, rotation, args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": _shared_input(meta, rotation, kwargs["hidden_states"])}
    raise TypeError(f"{type(module).__name__}: shared input quantization expects the input as the first argument or hidden_states=")


def _set_weight(module: torch.nn.Module, weight: RotatedMXFP4Tensor) -> None:
    module.weight = torch.nn.Parameter(weight, requires_grad=False)


def share_input_quantization(
    model: torch.nn.Module,
    groups: Sequence[Sequence[str]] = DEFAULT_GROUPS,
    check_architecture: bool = True,
) -> int:
    """Rotate and quantize each group's shared input once (see the module docstring); returns the
    number of groups now shared. Groups already shared or partly quantized are skipped; incompatible
    ones too, with a warning (one per reason).

    ``save_pretrained`` in this mode writes the per-linear weights (:func:`per_linear_state_dict`): the
    members' weights carry no rotation, and a reloaded model must rotate its inputs itself."""
    if check_architecture and type(model).__name__ not in SUPPORTED_ARCHITECTURES:
        raise NotImplementedError(
            f"shared input quantization knows the input flow of {', '.join(SUPPORTED_ARCHITECTURES)}; got "
            f"{type(model).__name__}. Pass check_architecture=False only if each group's parent feeds its "
            "first input, unchanged, to every member of the group and to nothing else."
        )
    shared, skipped = 0, {}
    for parent_name, parent in model.named_modules():
        if hasattr(parent, _META):
            continue
        for group in groups:
            members = [getattr(parent, name, None) for name in group]
            if not all(isinstance(getattr(m, "weight", None), RotatedMXFP4Tensor) for m in members):
                continue
            weights = [m.weight for m in members]
            reason = _compatible(weights)
            if reason is not None:
                skipped.setdefault(reason, []).append(f"{parent_name}.{{{','.join(group)}}}")
                continue
            w0 = weights[0]
            rotation = None if w0.rotation is None else w0.rotation.detach().to(torch.float32).contiguous().view(torch.int32)
            parent.register_buffer(_ROTATION, rotation, persistent=False)
            for m, w in zip(members, weights):
                # The integer GEMM takes codes, and the GEMV's panel GEMM quantizes its input itself: such
                # members re-quantize the shared input (exact).
                keep = w.act_scale_rule in REQUANTIZE_EXACT and (
                    cpu_mxfp4_mm.takes_weight(w) or (cpu_mxfp4_gemv.PANELS and cpu_mxfp4_quantize.fuses_into_gemv(w))
                )
                _set_weight(m, RotatedMXFP4Tensor(
                    w.qdata, w.scale, w.block_size, w.scale_rule, w.act_scale_rule if keep else None, w.padded_in_features,
                    w.dtype, None, w.dequantized, w.kernel_preference,
                ))
            parent.register_forward_pre_hook(_pre_hook, with_kwargs=True)
            setattr(parent, _META, _SharedInput(
                tuple(group), w0.block_size, w0.act_scale_rule, w0.in_features, w0.padded_in_features, _exact_dtypes(weights),
                "emulated" if any(w.kernel_preference == "emulated" for w in weights) else "auto",
            ))
            shared += 1
            break  # one group per parent
    for reason, names in skipped.items():
        log = logger.info if reason.startswith("they have nothing") else logger.warning
        log("not sharing the input of %d group(s) (%s%s): %s", len(names), names[0], ", ..." if len(names) > 1 else "", reason)
    if not shared and not skipped:
        logger.warning("share_input_quantization: no group of MXFP4 linears found to share (groups %s)", list(groups))
    return shared


def _per_linear_weight(parent: torch.nn.Module, meta: _SharedInput, w: RotatedMXFP4Tensor) -> RotatedMXFP4Tensor:
    """A shared member's weight as it was before sharing: rotating and quantizing its own input."""
    rotation = getattr(parent, _ROTATION)
    rotation = None if rotation is None else rotation.view(torch.float32)
    return RotatedMXFP4Tensor(
        w.qdata, w.scale, w.block_size, w.scale_rule, meta.act_scale_rule, meta.in_features, w.dtype, rotation, w.dequantized,
        w.kernel_preference,
    )


def per_linear_weights(parent: torch.nn.Module) -> Optional[Dict[str, RotatedMXFP4Tensor]]:
    """The weights the members of ``parent``'s shared group had before sharing (each rotating and
    quantizing its own input: the same numbers), by member name; ``None`` where ``parent`` shares none."""
    meta = getattr(parent, _META, None)
    if meta is None:
        return None
    return {name: _per_linear_weight(parent, meta, getattr(parent, name).weight) for name in meta.members}


def per_linear_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with every shared member's weight as it was before sharing, so that a
    checkpoint saved in shared mode reloads as the per-linear model (the model is not changed)."""
    state = model.state_dict()
    for parent_name, parent in model.named_modules():
        meta = getattr(parent, _META, None)
        if meta is None:
            continue
        prefix = f"{parent_name}." if parent_name else ""
        for name in meta.members:
            state[f"{prefix}{name}.weight"] = _per_linear_weight(parent, meta, getattr(parent, name).weight)
    return state


def unshare_input_quantization(model: torch.nn.Module) -> torch.nn.Module:
    """Back to per-linear weights (each rotates and quantizes its own input)."""
    for parent in model.modules():
        meta = getattr(parent, _META, None)
        if meta is None:
            continue
        for name in meta.members:
            m = getattr(parent, name)
            _set_weight(m, _per_linear_weight(parent, meta, m.weight))
        # By identity, not by a stored handle: a deep copy of the model shares no handle with the original.
        for key in [k for k, hook in parent._forward_pre_hooks.items() if hook is _pre_hook]:
            del parent._forward_pre_hooks[key]
            parent._forward_pre_hooks_with_kwargs.pop(key, None)
        del parent._buffers[_ROTATION]
        delattr(parent, _META)
    return model


def shared_groups(model: torch.nn.Module) -> Dict[str, Tuple[str, ...]]:
    """``{parent name: member names}`` of the groups whose input is shared."""
    return {name: getattr(m, _META).members for name, m in model.named_modules() if hasattr(m, _META)}
