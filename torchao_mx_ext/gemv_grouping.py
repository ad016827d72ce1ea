"""An Inductor post-grad pass: the MXFP4 GEMVs that read one activation become one operator call.

In a batch-1 decode step of a Llama-family decoder, ``q_proj``, ``k_proj`` and ``v_proj`` read the same
normalized activation, and so do ``gate_proj`` and ``up_proj``. Compiled, each is one extern call of
``torchao_mx_ext::mxfp4_gemv`` in Inductor's Python wrapper, and on a CPU the per-call cost (the wrapper's
Python, the dispatcher, the kernel's set-up) is a sizeable part of a small model's step: SmolLM2-135M
makes about 25 operator and kernel calls a layer. :class:`GroupSharedInputGEMVs` rewrites every set of
``mxfp4_gemv`` nodes with the same input node (and block size, scale multiplier, output dtype and
activation rule) into one ``mxfp4_gemv_group`` node, which prepares the input once per distinct
rotation and runs the GEMVs one after the other: the same numbers, bit for bit, in one call.

Under :func:`~torchao_mx_ext.share_input_quantization` the members read
``Q_a(x R)`` made by the group's pre-hook (``mxfp4_rotate_fake_quantize``, then a cast back to the
model's dtype, which is exact) and either quantize it again themselves (exact, see ``shared_quant.py``;
where the integer GEMM serves prompts) or take it as it is. Where every member does one of these with
the pre-hook's rule and block, the group reads ``x`` and ``R`` instead, and the pre-hook's quantizer and
cast drop out of the graph: ``Q_a(Q_a(x R)) = Q_a(x R)``, so again the same bits, in one call instead of
three.

:func:`~torchao_mx_ext.compile_model` and :func:`~torchao_mx_ext.compile_decoder_layers` install it
(``post_grad_custom_post_pass``); with plain ``torch.compile`` pass
``options={"post_grad_custom_post_pass": GroupSharedInputGEMVs()}``.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .kernels import cpu_mxfp4_gemv, cpu_mxfp4_quantize  # noqa: F401  (defines the operators)

__all__ = ["GroupSharedInputGEMVs", "group_shared_input_gemvs"]

_GEMV = torch.ops.torchao_mx_ext.mxfp4_gemv.default
_GROUP = torch.ops.torchao_mx_ext.mxfp4_gemv_group.default
_ROTATE_QUANTIZE = torch.ops.torchao_mx_ext.mxfp4_rotate_fake_quantize.default
_CASTS = (torch.ops.prims.convert_element_type.default, torch.ops.aten._to_copy.default)


def _arguments(node: torch.fx.Node) -> dict:
    """The call's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    bound = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def _shared_quantizer_input(x: torch.fx.Node, members: list[dict]):
    """``(src, rotation, rule)`` if ``x`` is ``Q_a(src R)`` (cast or not, ``Q_a`` with ``rule``) made for
    these members alone, and every member, with no rotation of its own, either quantizes it again with
    the same rule and block or takes it as it is (no rule); else ``None``."""
    quantized = x
    if x.op == "call_function" and x.target in _CASTS:
        if len(x.users) != len(members):
            return None
        quantized = x.args[0]
    if not (isinstance(quantized, torch.fx.Node) and quantized.op == "call_function" and quantized.target is _ROTATE_QUANTIZE):
        return None
    if len(quantized.users) != (1 if quantized is not x else len(members)):
        return None
    q = _arguments(quantized)
    rule = q["scale_rule"]
    if rule in (None, "none") or q["block_size"] != members[0]["block_size"]:
        return None
    if any(m["rotation"] is not None or m["act_scale_rule"] not in (rule, None) for m in members):
        return None
    return q["x"], q["rotation"], rule


def group_shared_input_gemvs(graph: torch.fx.Graph) -> int:
    """Rewrite ``graph`` in place (see the module docstring); returns the number of groups made."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _GEMV:
            a = _arguments(node)
            key = (a["x"], a["block_size"], a["multiplier"], a["out_dtype"], a["act_scale_rule"])
            groups[key].append((node, a))
    made = 0
    for (x, block_size, multiplier, out_dtype, rule), members in groups.items():
        if len(members) < 2 or out_dtype is None:
            continue
        first = min((node for node, _ in members), key=order.__getitem__)
        args = [a for _, a in members]
        # Every operand must exist where the group call goes (before its first member).
        operands = [v for a in args for k in ("qdata", "scale", "bias", "rotation") if isinstance(v := a[k], torch.fx.Node)]
        if any(order[v] >= order[first] for v in operands):
            continue
        src, rotations, dropped = x, [a["rotation"] for a in args], []
        shared = _shared_quantizer_input(x, args)
        if shared is not None and all(order.get(v, -1) < order[first] for v in shared if isinstance(v, torch.fx.Node)):
            src, rotation, rule = shared
            rotations = [rotation] * len(args)
            dropped = [x] if x.target is _ROTATE_QUANTIZE else [x, x.args[0]]
        with graph.inserting_before(first):
            group = graph.call_function(_GROUP, (
                src, [a["qdata"] for a in args], [a["scale"] for a in args], block_size, multiplier,
                [a["bias"] for a in args], out_dtype, rotations, rule,
            ))
            group.meta["val"] = [node.meta.get("val") for node, _ in members]
            for i, (node, _) in enumerate(members):
                item = graph.call_function(operator.getitem, (group, i))
                item.meta.update(node.meta)
                node.replace_all_uses_with(item)
        for node, _ in members:
            graph.erase_node(node)
        for node in dropped:  # the pre-hook's cast, then its quantizer: no users left
            if not node.users:
                graph.erase_node(node)
        made += 1
    return made


class GroupSharedInputGEMVs(CustomGraphPass):
    """:func:`group_shared_input_gemvs` as an Inductor ``post_grad_custom_post_pass`` (cacheable: its
    uuid is a hash of this file)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        group_shared_input_gemvs(graph)

    def uuid(self):
        return get_hash_for_files((__file__,))
