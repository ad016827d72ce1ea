"""Router graph passes: trace a router with ``torch.fx``, rewrite its graph, install the result on the
same instance as a subclass of its class; reversible and composable.

How a pass is installed on a router instance ``r`` of class ``C``:

1. its hyper-parameters are registered on ``r`` as *non-persistent* tensor buffers (``state_dict`` keys
   are unchanged; the compiled graph reads them as inputs, so changing a value in place with
   :func:`set_router_pass_buffer` neither recompiles nor re-traces);
2. ``r`` is traced with ``torch.fx`` (:class:`RouterPassTracer`), and the pass edits the graph: the
   routing functions of the passes (PESF, Ban, Pick) enter as single ``call_function`` nodes;
3. ``r.__class__`` becomes ``type(C.__name__, (C,), {"forward": <generated forward>})``: ``self.weight``,
   ``self.e_score_correction_bias`` and the new buffers still resolve on the instance, ``isinstance(r, C)``
   still holds (transformers records ``router_logits`` by ``isinstance``), and ``torch.export`` /
   ``torch.compile(fullgraph=True)`` trace the generated Python like any forward.

Output shapes never change: a pruned slot gets index ``N`` (= ``num_experts``, the sentinel every
experts backend skips, see :func:`.adapters.enable_sentinel_slots`) and weight 0. The returned
``router_logits`` stay the router's own, so ``output_router_logits=True`` and the auxiliary loss see the
unmodified router.

Passes compose: tracing a router that already carries passes yields a graph with their routing
functions as leaf calls, and the next pass edits that graph (e.g. Pick then Ban, PESF then Ban). A pass
can be installed once per router. :func:`remove_router_passes` restores every original class and
deletes the added buffers.

What a trace freezes. Python control flow runs once, at installation: router attributes read as
Python values (``top_k``, ``norm_topk_prob``, ``topk_method``, ``routed_scaling_factor``, ``hidden_dim``)
are constants of the installed forward; change them, then remove and reinstall the passes. Tensors
(``weight``, ``e_score_correction_bias``, the pass buffers) stay live. The derived classes are created at
run time, so pickling a whole model object (``torch.save(model)``) does not work while passes are
installed; ``state_dict`` does, with unchanged keys.

Flattening blocks. Qwen3/Qwen2-MoE, Mixtral and OLMoE blocks call ``self.gate(x.view(-1, H))``, which hides
the sequences from the router. :func:`rewire_block_gate_input` traces such a block with its submodules
(``gate``, ``experts``, ``shared_expert`` ...) as leaves and passes the block's 3-D input to ``gate``
instead (the routers' first op is ``reshape(-1, H)``, so their math is unchanged), installed the same
way. DeepSeek blocks already pass ``(B, S, H)``. Why a graph pass and not a pre-hook that stashes the
batch shape: a hook would smuggle Python state past ``torch.export``/``fullgraph`` compilation, while the
rewired graph carries the shape in the tensor itself.
"""

import operator
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from .adapters import MoEAdapter, disable_sentinel_slots
from .pass_settings import BUFFER_CHECKS, MASK_BUFFERS, check_expert_mask

__all__ = [
    "GATE_INPUT_PASS",
    "routing_function",
    "RouterPassTracer",
    "trace_module",
    "router_graph_outputs",
    "append_routing_function",
    "install_graph_pass",
    "installed_passes",
    "has_router_pass",
    "remove_graph_passes",
    "remove_router_passes",
    "rewire_block_gate_input",
    "set_router_pass_buffer",
    "drop_routing_slots",
]

# Routing functions (PESF, Ban, Pick) kept as one call_function node when a passed router is traced again.
_ROUTING_FUNCTIONS: list = []


def routing_function(fn: Callable) -> Callable:
    """Register ``fn`` as a routing function: a pure tensor function that a pass inserts into a router
    graph as one node, and that stays one node when that router is traced again."""
    _ROUTING_FUNCTIONS.append(fn)
    return fn


class RouterPassTracer(fx.Tracer):
    """``torch.fx`` tracer for routers and MoE blocks.

    Args:
        leaf_submodules: keep every submodule as a ``call_module`` leaf (used for blocks: ``gate``,
            ``experts``, shared experts stay calls, so hooks on them keep firing).
    """

    def __init__(self, leaf_submodules: bool = False):
        # autowrap looks the registered routing functions up in the globals of the forward being
        # traced: the generated forward of an already-passed router refers to them there.
        super().__init__(autowrap_functions=tuple(_ROUTING_FUNCTIONS))
        self.leaf_submodules = leaf_submodules

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return self.leaf_submodules or super().is_leaf_module(m, module_qualified_name)


def trace_module(module: nn.Module, leaf_submodules: bool = False) -> fx.Graph:
    return RouterPassTracer(leaf_submodules).trace(module)


def _input_placeholder(graph: fx.Graph) -> fx.Node:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise RuntimeError(f"expected a router forward(hidden_states); the graph has {len(placeholders)} inputs")
    return placeholders[0]


def router_graph_outputs(graph: fx.Graph) -> Tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
    """``(output_node, router_logits, top_k_weights, top_k_index)`` of a router graph."""
    output = next(n for n in graph.nodes if n.op == "output")
    result = output.args[0]
    if not (isinstance(result, (tuple, list)) and len(result) == 3):
        raise RuntimeError("a router must return (router_logits, top_k_weights, top_k_index)")
    return (output, *result)


def append_routing_function(
    graph: fx.Graph,
    fn: Callable,
    buffer_names: Sequence[str],
    constants: Sequence = (),
    pass_input: bool = False,
) -> None:
    """Replace the router outputs ``(w, i)`` with ``fn([x,] w, i, *buffers, *constants)``'s two outputs.

    ``x`` (``pass_input``) is the router input, ``buffers`` are ``get_attr`` nodes of the named buffers.
    """
    output, logits, weights, indices = router_graph_outputs(graph)
    with graph.inserting_before(output):
        buffers = [graph.get_attr(name) for name in buffer_names]
        args = ([_input_placeholder(graph)] if pass_input else []) + [weights, indices, *buffers, *constants]
        routed = graph.call_function(fn, tuple(args))
        new_weights = graph.call_function(operator.getitem, (routed, 0))
        new_indices = graph.call_function(operator.getitem, (routed, 1))
    output.args = ((logits, new_weights, new_indices),)


_BASE_ATTR = "_router_pass_base"
_PASSES_ATTR = "_router_passes"
_BUFFERS_ATTR = "_router_pass_buffers"
# One derived class per (class, generated source, passes): all layers of a model share it.
_CLASS_CACHE: Dict[Tuple[type, str, Tuple[str, ...], Tuple[str, ...]], type] = {}


def installed_passes(module: nn.Module) -> Tuple[str, ...]:
    """Names of the passes installed on ``module``, in installation order."""
    return tuple(getattr(type(module), _PASSES_ATTR, ()))


def has_router_pass(module: nn.Module, name: str) -> bool:
    return name in installed_passes(module)


def install_graph_pass(
    module: nn.Module,
    pass_name: str,
    rewrite: Callable[[fx.Graph], None],
    buffers: Optional[Mapping[str, torch.Tensor]] = None,
    leaf_submodules: bool = False,
) -> nn.Module:
    """Trace ``module``, apply ``rewrite`` to the graph, install the result as a subclass of its class.

    Args:
        module: a router (or an MoE block with ``leaf_submodules=True``); modified in place.
        pass_name: unique name of the pass on this module (installing it twice raises).
        rewrite: edits the traced graph in place.
        buffers: hyper-parameters, registered as non-persistent buffers on ``module`` before tracing
            (the graph reads them with ``get_attr``), on the device of ``module``'s tensors.
        leaf_submodules: trace submodules as leaves (blocks).

    Returns:
        ``module`` (same instance, new class).
    """
    if pass_name in installed_passes(module):
        raise ValueError(
            f"pass {pass_name!r} is already installed on {type(module).__name__}: change its buffers with "
            "set_router_pass_buffer, or remove_router_passes first"
        )
    buffers = dict(buffers or {})
    for name in buffers:
        if hasattr(module, name):
            raise ValueError(f"{type(module).__name__} already has an attribute {name!r}")
    device = next(iter(list(module.parameters()) + list(module.buffers())), torch.empty(0)).device
    for name, value in buffers.items():
        module.register_buffer(name, value.to(device), persistent=False)
    try:
        graph = trace_module(module, leaf_submodules)
        rewrite(graph)
        graph.lint()
        code_module = fx.GraphModule(module, graph)
    except Exception:
        for name in buffers:
            del module._buffers[name]
        raise
    cls = type(module)
    passes = installed_passes(module) + (pass_name,)
    added = tuple(getattr(cls, _BUFFERS_ATTR, ())) + tuple(buffers)
    key = (cls, code_module.code, passes, added)
    new_cls = _CLASS_CACHE.get(key)
    if new_cls is None:
        base = getattr(cls, _BASE_ATTR, cls)

        def extra_repr(self, _base=base):
            inner = _base.extra_repr(self)
            return (inner + ", " if inner else "") + f"router_passes={list(type(self)._router_passes)}"

        new_cls = type(cls.__name__, (cls,), {
            "forward": type(code_module).__dict__["forward"],
            "extra_repr": extra_repr,
            _BASE_ATTR: base,
            _PASSES_ATTR: passes,
            _BUFFERS_ATTR: added,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": f"{base.__name__} with router passes {list(passes)} (torchao_mx_ext.moe.router_pass).",
            "__reduce_ex__": _refuse_pickling,
        })
        _CLASS_CACHE[key] = new_cls
    module.__class__ = new_cls
    return module


def _refuse_pickling(self, protocol):
    # The class holds FX-generated code made at run time; pickle would fail with a bare "not the same
    # object" error. Say what works instead.
    raise TypeError(
        f"a {type(self).__name__} with router passes {list(type(self)._router_passes)} cannot be pickled "
        "(torch.save(model)): save with torchao_mx_ext.hf.save_pretrained, which records the passes and "
        "re-installs them on load, or remove_router_passes(model) first"
    )


def remove_graph_passes(module: nn.Module) -> bool:
    """Restore ``module``'s original class and delete the buffers its passes added; False if none."""
    cls = type(module)
    base = getattr(cls, _BASE_ATTR, None)
    if base is None:
        return False
    for name in getattr(cls, _BUFFERS_ATTR, ()):
        module._buffers.pop(name, None)
    module.__class__ = base
    return True


def remove_router_passes(model: nn.Module) -> int:
    """Undo every router pass and block rewrite in ``model`` (and the sentinel flags of the experts):
    original classes, no added buffers. Returns the number of modules restored."""
    restored = 0
    for module in list(model.modules()):
        restored += int(remove_graph_passes(module))
        disable_sentinel_slots(module)
    return restored


# ---------------------------------------------------------------------------------------------------
# Block rewrite: give the router the (B, S, H) input of the block


# Name of the block rewrite below: installed like a pass (on the block), but no router pass; the saved
# pass settings leave it out and PESF's preparation redoes it.
GATE_INPUT_PASS = "gate_sees_sequences"


def _rewire_gate_input(graph: fx.Graph) -> None:
    x = _input_placeholder(graph)
    gate_calls = [n for n in graph.nodes if n.op == "call_module" and n.target == "gate"]
    if len(gate_calls) != 1:
        raise RuntimeError(f"expected one call of self.gate in the block, found {len(gate_calls)}")
    gate = gate_calls[0]
    flat = gate.args[0]
    # Only the pattern we know is exact: gate(x.view(-1, H)) / gate(x.reshape(-1, H)) of the block input.
    is_flatten_of_input = (
        isinstance(flat, fx.Node)
        and flat.op == "call_method"
        and flat.target in ("view", "reshape")
        and flat.args[0] is x
        and len(flat.args) == 3
        and flat.args[1] == -1
    )
    if not is_flatten_of_input:
        raise RuntimeError(f"the block does not call gate(hidden_states.view(-1, H)); got gate({flat})")
    gate.args = (x,) + tuple(gate.args[1:])


def rewire_block_gate_input(block: nn.Module, adapter: MoEAdapter) -> bool:
    """Make a flattening block call its router on the ``(B, S, H)`` block input (see module docstring).

    Returns False when nothing is needed (DeepSeek blocks, or already rewired).

    Raises:
        ValueError: Mixtral with ``router_jitter_noise > 0``: its block multiplies the input by noise
            in training mode, a branch a trace would freeze; not supported.
    """
    if not adapter.flattens_before_gate or has_router_pass(block, GATE_INPUT_PASS):
        return False
    if getattr(block, "jitter_noise", 0) > 0:
        raise ValueError("cannot rewire a Mixtral block with router_jitter_noise > 0 (training-time branch)")
    install_graph_pass(block, GATE_INPUT_PASS, _rewire_gate_input, leaf_submodules=True)
    return True


# ---------------------------------------------------------------------------------------------------
# Hyper-parameters


def set_router_pass_buffer(
    model: nn.Module,
    name: str,
    value: Union[float, int, Sequence, torch.Tensor, Mapping[str, Union[float, int, Sequence, torch.Tensor]]],
) -> int:
    """Set the pass buffer ``name`` in place on every router of ``model`` that has it, or per router
    with ``{router_fqn: value}``; ``value`` must broadcast to the buffer's shape. In place (``copy_``),
    so a compiled or exported-and-reloaded model keeps its graph. Returns the number of routers
    updated; raises if none.

    Buffers: ``pesf_alpha`` (float), ``ban_tau`` (float), ``ban_k_min`` (int), ``ban_protected``
    (``(N,)`` bool), ``pick_mask`` (``(N,)`` bool), ``pick_boost`` (float). ``ban_protected`` is set
    from the picks when Ban is installed; changing ``pick_mask`` later does not change it.

    Every value is checked (for every router) before any buffer changes, with the checks the configs
    use (:mod:`.pass_settings`): ``pesf_alpha`` and ``pick_boost`` finite and >= 0, ``ban_tau`` in
    ``[0, 1]``, ``ban_k_min`` an integer >= 1, the masks bools, one per expert (or one for all).
    ``TypeError``/``ValueError`` naming the buffer (and the router, for per-router values) otherwise.
    Buffers of passes installed by other code (:func:`install_graph_pass`) only need to broadcast.
    """
    per_router = value if isinstance(value, Mapping) else None
    writes = []
    for fqn, module in model.named_modules():
        if name not in getattr(type(module), _BUFFERS_ATTR, ()):
            continue
        if per_router is not None:
            if fqn not in per_router:
                continue
            v, where = per_router[fqn], f"{name}[{fqn!r}]"
        else:
            v, where = value, name
        buf = module._buffers[name]
        writes.append((buf, _checked_buffer_value(v, buf, name, where)))
    if not writes:
        raise ValueError(f"no router of {type(model).__name__} has a pass buffer {name!r}")
    with torch.no_grad():
        for buf, new in writes:
            buf.copy_(new)
    return len(writes)


def _checked_buffer_value(value, buf: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """``value`` for the pass buffer ``name`` (``buf``), checked and broadcast to ``buf``'s shape."""
    if name in BUFFER_CHECKS:
        value = BUFFER_CHECKS[name](value, where)
    elif name in MASK_BUFFERS:
        value = check_expert_mask(value, buf.shape[0], where)
    try:
        return torch.as_tensor(value, dtype=buf.dtype, device=buf.device).expand_as(buf)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: {value!r} does not fit the buffer of shape {tuple(buf.shape)} ({e})") from None


# ---------------------------------------------------------------------------------------------------
# Shared by the pruning passes


def drop_routing_slots(
    weights: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor, num_experts: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prune the slots where ``keep`` is False, keeping shapes: index -> ``num_experts`` (sentinel),
    weight -> 0, and the kept weights of a token with a pruned slot rescaled to the token's original
    total, ``w_j * sum_all(w) / sum_kept(w)`` (computed in float32).

    A token with nothing pruned keeps its weights and indices bit for bit (``torch.where`` on the
    token), which is what makes neutral settings exact.
    """
    pruned_any = (~keep).any(dim=-1, keepdim=True)
    w32 = weights.float()
    kept = torch.where(keep, w32, torch.zeros_like(w32))
    scale = w32.sum(dim=-1, keepdim=True) / kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    new_weights = torch.where(pruned_any, (kept * scale).to(weights.dtype), weights)
    new_indices = indices.masked_fill(~keep, num_experts)
    return new_weights, new_indices
