"""``quantize_`` configs of the MoE router passes and how to apply and save them (the passes live in
:mod:`.pesf`, :mod:`.ban_pick`, :mod:`.router_pass`; the configs and their accepted values in
:mod:`.pass_settings`, the handlers next to each pass; importing this module loads them all).

    apply_router_pass(model, PESFConfig(alpha=0.3))                     # EAC-MoE PESF
    apply_router_pass(model, BanConfig(tau=0.8, k_min=1))               # Ban only
    apply_router_pass(model, PickConfig(experts=[3], boost=1.0))        # Pick only
    apply_router_pass(model, calibrate_ban_pick(model, calib_ids))      # Ban&Pick, per layer

    # the torchao way (scalar settings; per layer through torchao's FqnToConfig):
    quantize_(model, BanConfig(tau=0.8), filter_fn=is_moe_router)

Per-layer values (``layer_*`` fields) are keyed by the router's fully qualified name
(``"model.layers.3.mlp.gate"``; the block's name ``"model.layers.3.mlp"`` is accepted too). A
``quantize_`` handler receives a module without its name, so a config with per-layer values goes
through :func:`apply_router_pass`, which expands it into torchao's ``FqnToConfig`` of per-router
configs; the handler itself refuses it with that advice.

:func:`apply_router_pass` also does what a router handler cannot reach from the router alone: it
rewires the flattening blocks for PESF (so the router sees ``(B, S, H)``) and marks the experts modules
to skip sentinel slots in every experts backend (:func:`.adapters.enable_sentinel_slots`).
"""

from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import quantize_
from torchao.quantization.quant_api import FqnToConfig

from .adapters import enable_sentinel_slots, find_moe_blocks, is_moe_router
from .ban_pick import BAN_PASS, PICK_PASS, install_ban, install_pick
from .pass_settings import SETTING_CHECKS, BanConfig, BanPickConfig, PESFConfig, PickConfig, check_experts
from .pesf import PESF_PASS, install_pesf
from .router_pass import GATE_INPUT_PASS, installed_passes, rewire_block_gate_input

__all__ = [
    "PESFConfig",
    "PickConfig",
    "BanConfig",
    "BanPickConfig",
    "apply_router_pass",
    "prepare_blocks_for_router_passes",
    "router_pass_settings",
    "check_router_pass_settings",
    "install_router_passes",
]
# PESFConfig, PickConfig, BanConfig, BanPickConfig are defined in .pass_settings (below the passes, which
# need them for their handlers); this is their public home.


_ROUTER_CONFIGS = (PESFConfig, PickConfig, BanConfig, BanPickConfig)


def apply_router_pass(model: nn.Module, config: AOBaseConfig) -> nn.Module:
    """Install a router pass on every supported MoE router of ``model`` (in place) and return ``model``.

    Runs ``quantize_(model, config, filter_fn=is_moe_router)`` (or, with per-layer values, an
    ``FqnToConfig`` of per-router configs), after rewiring the flattening blocks for PESF and marking
    the experts modules to skip sentinel slots.

    Everything below is checked before the model is changed (a refused call leaves it as it was).

    Raises:
        TypeError, ValueError: a config field out of range (also one assigned after construction).
        ValueError: a dense model, an unsupported router (see :func:`.adapters.find_moe_blocks`), a
            per-layer key that names no router, an expert index ``>= N`` of a router, a router that
            already carries the pass.
        RuntimeError: nothing was rewritten.
    """
    if not isinstance(config, _ROUTER_CONFIGS):
        raise TypeError(f"expected one of {[c.__name__ for c in _ROUTER_CONFIGS]}, got {type(config).__name__}")
    config.validate()  # again: fields may have been assigned since construction
    blocks = find_moe_blocks(model)
    router_fqns = [f"{fqn}.gate" if fqn else "gate" for fqn, _, _ in blocks]
    before = {fqn: installed_passes(block.gate) for (fqn, block, _) in blocks}
    if config.has_layer_values():
        known = set(router_fqns) | {fqn for fqn, _, _ in blocks}
        unknown = sorted(config.layer_keys() - known)
        if unknown:
            raise ValueError(f"per-layer keys name no MoE router of the model: {unknown[:4]}")
    _check_routers_take(config, blocks, router_fqns)

    prepare_blocks_for_router_passes(blocks, rewire_gate_input=isinstance(config, PESFConfig))

    if config.has_layer_values():
        quantize_(model, FqnToConfig({fqn: config.for_router(fqn) for fqn in router_fqns}), filter_fn=None)
    else:
        quantize_(model, config, filter_fn=is_moe_router)

    changed = [fqn for (fqn, block, _) in blocks if installed_passes(block.gate) != before[fqn]]
    if not changed:
        raise RuntimeError(f"{type(config).__name__}: no router of {type(model).__name__} was rewritten")
    return model


_CONFIG_PASSES = {
    PESFConfig: (PESF_PASS,),
    PickConfig: (PICK_PASS,),
    BanConfig: (BAN_PASS,),
    BanPickConfig: (PICK_PASS, BAN_PASS),
}


def _check_routers_take(config, blocks, router_fqns) -> None:
    """What the installers would refuse on some router, refused for all of them before any changes:
    a pass already installed, an expert index out of a router's range."""
    for (_, block, adapter), router_fqn in zip(blocks, router_fqns):
        installed = installed_passes(block.gate)
        for name in _CONFIG_PASSES[type(config)]:
            if name in installed:
                raise ValueError(
                    f"pass {name!r} is already installed on {router_fqn}: change its buffers with "
                    "set_router_pass_buffer, or remove_router_passes first"
                )
        resolved = config.for_router(router_fqn) if config.has_layer_values() else config
        num_experts = adapter.num_experts(block.gate)
        for field in ("experts", "picks", "protected"):
            if hasattr(resolved, field):
                bad = [e for e in check_experts(getattr(resolved, field), field) if e >= num_experts]
                if bad:
                    raise ValueError(
                        f"{type(config).__name__}.{field}: expert index {bad[0]} out of range [0, {num_experts}) "
                        f"of router {router_fqn}"
                    )


def prepare_blocks_for_router_passes(blocks, rewire_gate_input: bool) -> None:
    """What a router pass needs from its MoE block, for ``(fqn, block, adapter)`` triples of
    :func:`.adapters.find_moe_blocks`: the flattening blocks rewired so the router sees ``(B, S, H)``
    (``rewire_gate_input``, for PESF) and the experts marked to skip sentinel slots. Idempotent.
    Used by :func:`apply_router_pass` and :func:`install_router_passes`."""
    for _, block, adapter in blocks:
        if rewire_gate_input:
            rewire_block_gate_input(block, adapter)
        enable_sentinel_slots(block.experts)


# ---------------------------------------------------------------------------------------------------
# Saved form of the installed passes (what torchao_mx_ext.hf stores in its quantization config)
#
#   {router_fqn: [{"pass": "pick", "experts": [3], "boost": 1.0},
#                 {"pass": "ban", "tau": 0.8, "k_min": 1, "protected": [3]}], ...}
#
# in installation order; the values are read from the pass buffers ("experts"/"protected": the indices
# set in the (N,) bool masks).

# pass name -> ((saved key, buffer name, kind), ...); kinds: "float", "int", "experts" (bool mask)
_SAVED_PASS_FIELDS = {
    PESF_PASS: (("alpha", "pesf_alpha", "float"),),
    PICK_PASS: (("experts", "pick_mask", "experts"), ("boost", "pick_boost", "float")),
    BAN_PASS: (("tau", "ban_tau", "float"), ("k_min", "ban_k_min", "int"), ("protected", "ban_protected", "experts")),
}
_INSTALLERS = {
    PESF_PASS: lambda router, v: install_pesf(router, v["alpha"]),
    PICK_PASS: lambda router, v: install_pick(router, v["experts"], v["boost"]),
    BAN_PASS: lambda router, v: install_ban(router, v["tau"], v["k_min"], v["protected"]),
}


def _read_buffer(buf: torch.Tensor, kind: str):
    if kind == "float":
        return float(buf.item())
    if kind == "int":
        return int(buf.item())
    return [int(e) for e in buf.detach().cpu().nonzero().flatten().tolist()]


def _buffer_value(value, kind: str, buf: torch.Tensor) -> torch.Tensor:
    if kind != "experts":
        return torch.tensor(value, dtype=buf.dtype, device=buf.device)
    mask = torch.zeros(buf.shape, dtype=torch.bool)
    for e in value:
        if not 0 <= int(e) < buf.shape[0]:
            raise ValueError(f"expert index {e} out of range [0, {buf.shape[0]})")
        mask[int(e)] = True
    return mask.to(buf.device)


def router_pass_settings(model: nn.Module) -> Dict[str, List[Dict[str, Any]]]:
    """The passes installed on the routers of ``model``: ``{router_fqn: [{"pass": name, <values>}, ...]}``
    in installation order, values read from the pass buffers (so changes made with
    :func:`.router_pass.set_router_pass_buffer` are included); JSON-ready. Empty if none.

    The block rewrite (``gate_sees_sequences``) is not listed: :func:`install_router_passes` redoes it
    for routers with PESF, as :func:`apply_router_pass` does.

    Raises:
        ValueError: a pass this function cannot describe (one installed with ``install_graph_pass``
            by other code), a buffer value out of the accepted range (:func:`check_router_pass_settings`).
    """
    settings = {}
    for fqn, module in model.named_modules():
        passes = [p for p in installed_passes(module) if p != GATE_INPUT_PASS]
        if not passes:
            continue
        entries = []
        for name in passes:
            if name not in _SAVED_PASS_FIELDS:
                raise ValueError(
                    f"{fqn or type(module).__name__}: router pass {name!r} cannot be saved (known: "
                    f"{', '.join(sorted(_SAVED_PASS_FIELDS))})"
                )
            entry = {"pass": name}
            for key, buffer, kind in _SAVED_PASS_FIELDS[name]:
                entry[key] = _read_buffer(module._buffers[buffer], kind)
            entries.append(entry)
        settings[fqn] = entries
    try:  # a buffer written directly (not through set_router_pass_buffer) is unchecked: refuse to save bad values
        check_router_pass_settings(settings)
    except ValueError as e:
        raise ValueError(
            f"{e} (read from the pass buffers; written directly, bypassing set_router_pass_buffer's checks?)"
        ) from None
    return settings


def check_router_pass_settings(settings: Any) -> None:
    """Check the form of saved pass settings (see :func:`router_pass_settings`) without a model:
    ``ValueError`` naming the router and pass on unknown pass names, missing or extra values, repeats,
    and values out of the range the configs accept (NaN, ``tau > 1``, a negative boost ...)."""
    if not isinstance(settings, Mapping):
        raise ValueError(f"router passes must be a dict {{router_fqn: [pass, ...]}}, got {type(settings).__name__}")
    for fqn, entries in settings.items():
        if not isinstance(fqn, str) or not isinstance(entries, (list, tuple)) or not entries:
            raise ValueError(f"router passes: {fqn!r} must map a router name to a non-empty list of passes")
        seen = set()
        for entry in entries:
            name = entry.get("pass") if isinstance(entry, Mapping) else None
            if name not in _SAVED_PASS_FIELDS:
                raise ValueError(
                    f"router passes of {fqn!r}: unknown pass {name!r} in {entry!r}; this torchao_mx_ext knows "
                    f"{', '.join(sorted(_SAVED_PASS_FIELDS))}"
                )
            if name in seen:
                raise ValueError(f"router passes of {fqn!r}: pass {name!r} listed twice")
            seen.add(name)
            expected = {key for key, _, _ in _SAVED_PASS_FIELDS[name]}
            given = set(entry) - {"pass"}
            if given != expected:
                raise ValueError(
                    f"router passes of {fqn!r}: pass {name!r} needs the values {sorted(expected)}, got {sorted(given)}"
                )
            for key, _, kind in _SAVED_PASS_FIELDS[name]:
                v = entry[key]
                ok = (
                    (isinstance(v, (list, tuple)) and all(isinstance(e, int) and not isinstance(e, bool) for e in v))
                    if kind == "experts"
                    else isinstance(v, int) and not isinstance(v, bool)
                    if kind == "int"
                    else isinstance(v, (int, float)) and not isinstance(v, bool)
                )
                if not ok:
                    raise ValueError(f"router passes of {fqn!r}: {name}.{key} has an invalid value {v!r}")
                try:
                    SETTING_CHECKS[key](v, f"{name}.{key}")
                except (TypeError, ValueError) as e:
                    raise ValueError(f"router passes of {fqn!r}: {name}.{key} has an invalid value: {e}") from None


def install_router_passes(model: nn.Module, settings: Mapping[str, Sequence[Mapping[str, Any]]]) -> nn.Module:
    """Install the passes described by ``settings`` (the form :func:`router_pass_settings` returns) on
    ``model``'s routers, in the listed order, and set every pass buffer to the listed value exactly.
    Prepares the blocks as :func:`apply_router_pass` does (:func:`prepare_blocks_for_router_passes`).
    Everything is checked before anything is installed.

    Raises:
        ValueError: a malformed entry or unknown pass name, a name that is no supported MoE router of
            ``model``, a router that already carries passes.
    """
    check_router_pass_settings(settings)
    if not settings:
        return model
    blocks = {(f"{fqn}.gate" if fqn else "gate"): (fqn, block, adapter) for fqn, block, adapter in find_moe_blocks(model)}
    unknown = sorted(set(settings) - set(blocks))
    if unknown:
        raise ValueError(
            f"router passes name no MoE router of {type(model).__name__}: {unknown[:4]} "
            f"(its routers: {sorted(blocks)[:4]}{' ...' if len(blocks) > 4 else ''})"
        )
    busy = [fqn for fqn in settings if installed_passes(blocks[fqn][1].gate)]
    if busy:
        raise ValueError(f"routers already carry passes (remove_router_passes first): {busy[:4]}")
    for fqn, entries in settings.items():
        names = [entry["pass"] for entry in entries]
        prepare_blocks_for_router_passes([blocks[fqn]], rewire_gate_input=PESF_PASS in names)
        router = blocks[fqn][1].gate
        for entry in entries:
            _INSTALLERS[entry["pass"]](router, entry)
        # The installers derive some buffers (Ban protects Pick's experts); set the saved values exactly.
        with torch.no_grad():
            for entry in entries:
                for key, buffer, kind in _SAVED_PASS_FIELDS[entry["pass"]]:
                    buf = router._buffers[buffer]
                    buf.copy_(_buffer_value(entry[key], kind, buf))
    return model
