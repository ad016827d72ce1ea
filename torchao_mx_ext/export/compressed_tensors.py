"""compressed-tensors export (vLLM): our MXFP4 codes and scales as an ``mxfp4-pack-quantized`` checkpoint.

    from torchao_mx_ext.export import to_compressed_tensors
    to_compressed_tensors(model, tokenizer, "out-ct")     # written into a sibling folder, then renamed

**Weights.** Each quantized linear ``<name>`` (a :class:`~torchao_mx_ext.tensors.RotatedMXFP4Tensor`
``[N, K]``) is stored as ``<name>.weight_packed`` (uint8 ``[N, K / 2]``) and ``<name>.weight_scale``
(uint8 ``[N, K / 32]``): our ``qdata`` and ``scale`` bytes as they are. compressed-tensors' layout is
ours (``compressors/nvfp4/helpers.py`` ``pack_fp4_to_uint8`` / ``unpack_fp4_from_uint8``: element
``2i`` in the low nibble, code = ``sign << 3 | index`` of ``0, 0.5, 1, 1.5, 2, 3, 4, 6``;
``compressors/mx_utils.py``: scale byte ``b`` is ``2^(b - 127)``), so nothing is converted or
re-rounded; its decompressor returns our ``weight.dequantize()`` bit for bit. That is ``Q(W R)``: for
a rotated linear the checkpoint holds the rotated weight and the transform config below supplies ``R``.
Every other tensor (embeddings, norms, an unquantized ``lm_head``, biases) is written dense in the
model's dtype; a tied ``lm_head`` is not written.

**Config.** ``config.json`` holds the model's config and a ``quantization_config`` built with
compressed-tensors' own classes and written by its own ``ModelCompressor.update_config``:
``quant_method: compressed-tensors``, ``format: mxfp4-pack-quantized``, one config group per
activation mode from its presets ``MXFP4`` (W4A4: dynamic MXFP4 input activations) or ``MXFP4A16``
(weight-only): weights ``num_bits 4, type float, strategy group, group_size 32, symmetric,
scale_dtype uint8``, targets ``Linear``; ``ignore`` lists every linear that is not quantized
(``lm_head`` and any other). Activation scale rules are not part of the format: an engine quantizes
activations with its own rule (compressed-tensors' own is our ``even``; a model with another activation rule gets a
warning).

**Rotations.** A per-linear rotation ``R`` that is block-diagonal with the normalised Sylvester
Hadamard ``H_b / sqrt(b)`` (``rotation="hadamard"``, ``b`` a power of two: ``block-rot``, the online R4
of ``brq``/``dartquant-block``, and a full-width Hadamard of a power-of-two width such as QuaRot's R4 on
such models) becomes a ``transform_config`` group ``type: hadamard, head_dim: b`` with two
``TransformArgs`` on those linears, as llm-compressor writes its online R4 (``SpinQuantModifier``):
``location: weight_input, inverse: true`` (offline: ``W (H^T)^T = W H``, already fused into the stored
weight) and ``location: input`` (online: ``x -> x H`` before the linear). vLLM applies only the
online one (``compressed_tensors/transform/linear.py`` ``get_linear_transform_schemes`` keeps
``args.is_online()``; ``transform/module.py`` ``HadamardTransform`` runs ``ops.hadacore_transform``
on ``head_dim`` blocks, which is ``x @ H / sqrt(head_dim)`` with compressed-tensors'
``deterministic_hadamard_matrix``) and needs no transform weights in the checkpoint for this type
(none are written). Our block must equal that matrix (checked). What cannot be expressed is refused:
``random_hadamard`` (random signs), random-orthogonal or learned blocks and full-width rotations of a
non-power-of-two width. Model-level rotations fused into plain weights (QuaRot/BRQ's R1 and R2) need
nothing. transformers' ``from_pretrained`` ignores ``transform_config`` (a warning says so when one is
written): only vLLM, or ``scripts/load_like_vllm.py``, computes such a checkpoint correctly.

**Also refused** (everything is checked before anything is written): models without our MXFP4
linears, ``fp_quant`` weight scales (their 4/3 element factor has no field in the format), inputs not
a multiple of 32 wide (we zero-pad them; the format has no padding: leave such linears unquantized and
they are exported dense), block sizes other than 32, fused MoE experts, NaN blocks.
"""

import copy
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torchao.utils import TorchAOBaseTensor

from ..atomic import clean_interrupted, install_folder, new_sibling
from ..tensors import RotatedMXFP4Tensor
from .state import export_state

__all__ = [
    "CompressedTensorsExportError",
    "check_exportable",
    "hadamard_transform_size",
    "to_compressed_tensors",
]

FORMAT = "mxfp4-pack-quantized"
GROUP_SIZE = 32
_E8M0_NAN = 255
_SHOWN = 6  # layer names listed in an error before "and N more"
_MAX_SHARD_SIZE = "5GB"


class CompressedTensorsExportError(ValueError):
    """The model cannot be written as a compressed-tensors MXFP4 checkpoint (the message says why)."""


def _compressed_tensors():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as e:  # pragma: no cover - the export extra is installed by setup.sh
        raise ImportError(
            "the compressed-tensors export needs the compressed-tensors package: "
            "pip install 'torchao-mx-ext[export]' (compressed-tensors==0.20.0)"
        ) from e


def _names(names: List[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def hadamard_transform_size(rotation: Optional[torch.Tensor]) -> Optional[int]:
    """``head_dim`` of the compressed-tensors ``hadamard`` transform equal to the rotation block, ``None``
    for no rotation; raises :class:`CompressedTensorsExportError` if no such transform exists.

    The block must be compressed-tensors' ``deterministic_hadamard_matrix(b) / sqrt(b)`` (Sylvester's
    construction, the matrix vLLM's Hadacore kernel applies), sign convention included."""
    if rotation is None:
        return None
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    b = rotation.shape[0]
    if rotation.dim() != 2 or rotation.shape[1] != b:
        raise CompressedTensorsExportError(f"a rotation block must be square, got {tuple(rotation.shape)}")
    if b & (b - 1):
        raise CompressedTensorsExportError(
            f"a {b} x {b} rotation block: compressed-tensors' deterministic Hadamard (what vLLM applies online) "
            "exists only for power-of-two sizes"
        )
    ref = deterministic_hadamard_matrix(b, torch.float64, torch.device("cpu")) / math.sqrt(b)
    if not torch.allclose(rotation.detach().to("cpu", torch.float64), ref, rtol=0.0, atol=1e-6):
        raise CompressedTensorsExportError(
            f"the {b} x {b} rotation block is not the normalised Sylvester Hadamard (it is a random_hadamard, "
            "random orthogonal or learned block)"
        )
    return b if b > 1 else None  # a 1 x 1 block [[1]] is no rotation


@dataclass(frozen=True)
class _Linear:
    name: str  # module name
    weight: RotatedMXFP4Tensor
    act: bool  # W4A4 (dynamic MXFP4 input activations) or weight-only
    hadamard: Optional[int]  # head_dim of the input transform, None: no rotation
    bias: bool


def _plan(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> Tuple[List[_Linear], List[str], List[str]]:
    """(quantized linears, names of all nn.Linear modules, refusal reasons)."""
    modules = dict(model.named_modules())
    linears = [name for name, m in modules.items() if isinstance(m, torch.nn.Linear)]
    linear_set = set(linears)
    plan: List[_Linear] = []
    fp_quant, blocks, widths, ranks, not_linear, nan, foreign, rotations = [], [], [], [], [], [], [], []
    for key, t in state.items():
        if not isinstance(t, TorchAOBaseTensor):
            continue
        if not isinstance(t, RotatedMXFP4Tensor):
            foreign.append(f"{key} ({type(t).__name__})")
            continue
        module_name, _, leaf = key.rpartition(".")
        if t.qdata.dim() != 2:
            ranks.append(f"{key} {tuple(t.shape)}")
            continue
        if leaf != "weight" or module_name not in linear_set:
            not_linear.append(key)
            continue
        if t.scale_rule == "fp_quant":
            fp_quant.append(module_name)
        if t.block_size != GROUP_SIZE:
            blocks.append(f"{module_name} ({t.block_size})")
        if t.in_features % GROUP_SIZE or t.padded_in_features != t.in_features:
            widths.append(f"{module_name} ({t.in_features}, stored zero-padded to {t.padded_in_features})")
        if bool((t.scale == _E8M0_NAN).any()):
            nan.append(module_name)
        try:
            size = hadamard_transform_size(t.rotation)
        except CompressedTensorsExportError as e:
            rotations.append(f"{module_name}: {e}")
            size = None
        has_bias = getattr(modules[module_name], "bias", None) is not None
        plan.append(_Linear(module_name, t, t.act_scale_rule is not None, size, has_bias))

    problems: List[str] = []
    if getattr(model, "config", None) is None or not hasattr(model.config, "save_pretrained"):
        problems.append(f"{type(model).__name__} is not a transformers model (no .config to write config.json from)")
    if not plan and not ranks and not not_linear:
        problems.append(
            "the model has no MXFP4-quantized linear (no RotatedMXFP4Tensor weights): quantize_ it with "
            "torchao_mx_ext's MXFP4Config / MXFP4BlockRotConfig (or a recipes.METHODS method) first"
        )
    if fp_quant:
        problems.append(
            f"{_names(fp_quant)} use fp_quant scales, whose global 4/3 element factor compressed-tensors' MXFP4 "
            "cannot express (its dequantization is E2M1 code x 2^(scale - 127)); quantize with floor, even, rceil, "
            "mse or even"
        )
    if blocks:
        problems.append(f"compressed-tensors' MXFP4 groups are {GROUP_SIZE} wide; block size of {_names(blocks)}")
    if widths:
        problems.append(
            f"input width not a multiple of {GROUP_SIZE}: {_names(widths)}; compressed-tensors' weight_packed is "
            f"[N, K/2] and weight_scale [N, K/{GROUP_SIZE}] with no padding, so leave these linears unquantized "
            "(they are then exported dense and listed in `ignore`)"
        )
    if rotations:
        problems.append(
            "per-linear rotations that compressed-tensors / vLLM cannot apply online: "
            + "; ".join(rotations[:_SHOWN])
            + (f"; and {len(rotations) - _SHOWN} more" if len(rotations) > _SHOWN else "")
            + ". What exports: rotation='hadamard' with a power-of-two rotation_size (block-rot, the block R4 "
            "of brq / dartquant-block, a full-width Hadamard of a power-of-two width), rotation='identity' "
            "(rtn, gptq) and model-level rotations fused into the weights (R1/R2)"
        )
    biased = [lin.name for lin in plan if lin.hadamard is not None and lin.bias]
    if biased:
        # vLLM's CompressedTensorsLinearTransformMethod.apply has `assert bias is None` in every release
        # from 0.10.2 (transforms arrived) to 0.34.0: such a checkpoint would fail when served.
        problems.append(
            f"{_names(biased)} have a bias and an online rotation, which vLLM's transform method refuses "
            "(assert bias is None, vLLM 0.10.2 to 0.34.0); export these linears without a per-linear rotation "
            "(rtn, gptq, or a model-level rotation fused into the weights)"
        )
    if ranks:
        problems.append(f"only 2-D (linear) MXFP4 weights export, not fused MoE experts: {_names(ranks)}")
    if not_linear:
        problems.append(f"MXFP4 weights outside nn.Linear modules cannot be exported: {_names(not_linear)}")
    if nan:
        problems.append(f"{_names(nan)} hold NaN blocks (E8M0 byte 255), which compressed-tensors decodes as 2^128")
    if foreign:
        problems.append(f"quantized tensors other than RotatedMXFP4Tensor cannot be exported: {_names(foreign)}")
    return plan, linears, problems


def check_exportable(model: torch.nn.Module) -> None:
    """Raise :class:`CompressedTensorsExportError` listing every reason ``model`` cannot be exported."""
    _, _, problems = _plan(_unwrap(model), export_state(_unwrap(model)))
    if problems:
        raise CompressedTensorsExportError("cannot export to compressed-tensors: " + "; ".join(problems))


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


def _targets(members: List[str], linears: List[str]) -> Tuple[List[str], List[str]]:
    """(targets, ignore) that select exactly ``members`` among the model's linears, compactly:
    ``Linear`` minus a few names, or one regex per module leaf name, or the names themselves."""
    member_set = set(members)
    others = [n for n in linears if n not in member_set]
    options = [(["Linear"], others)]
    leaves = sorted({n.rpartition(".")[2] for n in members})
    if {n for n in linears if n.rpartition(".")[2] in leaves} == member_set:
        options.append(([f"re:(.*\\.)?{re.escape(leaf)}$" for leaf in leaves], []))
    options.append((list(members), []))
    return min(options, key=lambda o: len(o[0]) + len(o[1]))


def _configs(plan: List[_Linear], linears: List[str]):
    """compressed-tensors' QuantizationConfig and TransformConfig (or None) for the plan."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    quantized = [lin.name for lin in plan]
    ignore = [n for n in linears if n not in set(quantized)]
    modes = sorted({lin.act for lin in plan}, reverse=True)  # W4A4 first
    groups = {}
    for i, act in enumerate(modes):
        preset = "MXFP4" if act else "MXFP4A16"
        if len(modes) == 1:
            targets = ["Linear"]
        else:
            targets = [lin.name for lin in plan if lin.act == act]
        groups[f"group_{i}"] = preset_name_to_scheme(preset, targets)
    qconfig = QuantizationConfig(
        config_groups=groups, format=FORMAT, ignore=ignore, quantization_status=QuantizationStatus.COMPRESSED
    )

    schemes = {}
    for size in sorted({lin.hadamard for lin in plan if lin.hadamard is not None}):
        members = [lin.name for lin in plan if lin.hadamard == size]
        if set(members) == set(quantized):  # every quantized linear: the quantization config's selection
            targets, ignored = ["Linear"], list(ignore)
        else:
            targets, ignored = _targets(members, linears)
        schemes[f"hadamard_{size}"] = TransformScheme(
            type="hadamard",
            head_dim=size,
            apply=[
                # offline, already fused: the stored weight is Q(W H) = Q(W (H^T)^T)
                TransformArgs(targets=targets, ignore=ignored, location="weight_input", inverse=True),
                # online: x -> x H before the linear (vLLM's HadamardTransform, Hadacore)
                TransformArgs(targets=targets, ignore=ignored, location="input"),
            ],
        )
    tconfig = TransformConfig(config_groups=schemes) if schemes else None
    return qconfig, tconfig


def _tensors(state: Dict[str, torch.Tensor], plan: List[_Linear]) -> Dict[str, torch.Tensor]:
    """Checkpoint tensors: packed codes and scales for the quantized linears, the rest dense."""
    quantized = {f"{lin.name}.weight": lin for lin in plan}
    out: Dict[str, torch.Tensor] = {}
    seen: Dict[Tuple[int, tuple], str] = {}
    for key, t in state.items():
        lin = quantized.get(key)
        if lin is not None:
            out[f"{lin.name}.weight_packed"] = lin.weight.qdata.detach().to("cpu").contiguous()
            out[f"{lin.name}.weight_scale"] = lin.weight.scale.detach().to("cpu").contiguous()
            continue
        t = t.detach().to("cpu")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:
            t = t.clone()  # safetensors refuses shared storage; an untied alias gets its own copy
        seen[ident] = key
        out[key] = t.contiguous()
    return out


def _write_weights(folder: Path, tensors: Dict[str, torch.Tensor]) -> None:
    """``model.safetensors`` (or shards with an index), safetensors metadata ``format: pt``."""
    import json

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=_MAX_SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_config(folder: Path, model: torch.nn.Module, qconfig, tconfig) -> None:
    """The model's ``config.json`` with compressed-tensors' ``quantization_config`` (its own writer)."""
    from compressed_tensors.compressors import ModelCompressor

    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    if not getattr(config, "architectures", None):
        config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    ModelCompressor(quantization_config=qconfig, transform_config=tconfig).update_config(str(folder))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)


def _warn_about_engines(plan: List[_Linear], tconfig) -> None:
    dtypes = sorted({str(lin.weight.dtype).replace("torch.", "") for lin in plan} - {"bfloat16"})
    if dtypes:
        warnings.warn(
            f"a {'/'.join(dtypes)} model: compressed-tensors 0.20.0 decompresses MXFP4 weights to bfloat16 whatever "
            "the model dtype, so transformers' from_pretrained of this export fails at the first forward unless "
            "given dtype=torch.bfloat16 or quantization_config=CompressedTensorsConfig(dequantize=True) (vLLM loads "
            "the packed weights itself)",
            UserWarning,
            stacklevel=3,
        )
    rules = sorted({lin.weight.act_scale_rule for lin in plan if lin.act} - {"even"})
    if rules:
        warnings.warn(
            f"the model quantizes activations with the {'/'.join(rules)} scale rule, which compressed-tensors' "
            "format does not record: engines quantize activations with their own rule (compressed-tensors' "
            "emulation: our 'even'; vLLM's FlashInfer W4A4 kernel on Blackwell: its own; "
            "vLLM's Marlin kernel, Hopper and older: none, it runs W4A16). Evaluate with act_scale_rule='even' to see "
            "what the export computes.",
            UserWarning,
            stacklevel=3,
        )
    if tconfig is not None:
        warnings.warn(
            "this export has a transform_config (online Hadamard rotations of the linears' inputs): vLLM applies "
            "it, transformers' from_pretrained ignores it, so a plain transformers load multiplies unrotated "
            "activations by rotated weights and computes garbage; evaluate with vLLM or scripts/load_like_vllm.py",
            UserWarning,
            stacklevel=3,
        )


def to_compressed_tensors(model: torch.nn.Module, tokenizer, out: Union[str, os.PathLike], *, overwrite: bool = False) -> Path:
    """Write ``model`` (its linears quantized with our MXFP4) and ``tokenizer`` as a compressed-tensors
    ``mxfp4-pack-quantized`` checkpoint folder ``out`` that vLLM serves (see the module docstring).

    Atomic: written into a temporary sibling folder that is renamed to ``out`` at the end; an
    interrupted or failed export leaves no ``out`` (and an existing one unchanged). An existing non-empty
    ``out`` is refused unless ``overwrite`` (it is then replaced as a whole). ``tokenizer=None`` writes no
    tokenizer files. Raises :class:`CompressedTensorsExportError` before writing anything if the model
    cannot be expressed. Returns ``Path(out)``.
    """
    _compressed_tensors()
    model = _unwrap(model)
    state = export_state(model)
    plan, linears, problems = _plan(model, state)
    if problems:
        raise CompressedTensorsExportError("cannot export to compressed-tensors: " + "; ".join(problems))

    target = Path(os.path.realpath(out))
    if target.parent == target:
        raise ValueError(f"cannot export into the filesystem root {target}")
    if target.exists():
        if not target.is_dir():
            raise NotADirectoryError(f"{out} exists and is not a folder")
        if any(target.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    qconfig, tconfig = _configs(plan, linears)
    tensors = _tensors(state, plan)

    target.parent.mkdir(parents=True, exist_ok=True)
    clean_interrupted(target)
    tmp = new_sibling(target, "saving")
    try:
        _write_weights(tmp, tensors)
        _write_config(tmp, model, qconfig, tconfig)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        install_folder(tmp, target)  # nothing of an old folder is kept
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the old folder
    _warn_about_engines(plan, tconfig)
    return Path(out)
