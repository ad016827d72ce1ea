"""Sequential, layer-by-layer calibration of a decoder (the GPTQ pipeline).

Only one decoder layer's inputs are held in memory (``n_samples x seq_len x hidden``): the inputs of
layer ``i + 1`` are the outputs of layer ``i`` *after* it was quantized, so every layer is calibrated
on what the quantized model really feeds it (Frantar et al. 2022, section 5; MR-GPTQ).

Models larger than memory: dispatch them with accelerate (``disk_offload``/``cpu_offload``, or
``from_pretrained(..., device_map=..., offload_folder=...)``); each offloaded layer is materialised
just before it is calibrated and then kept, quantized (4.25 bits per weight), in memory, so peak
memory is one full-precision layer plus the quantized model plus the calibration activations.

Per layer: attach Hessian observers (``MXFP4GPTQConfig(step="prepare")``) to its linears and fused MoE
experts modules (per-expert Hessians of both 3-D projections, from the tokens the layer's router sends
each expert), run the calibration inputs through it, run GPTQ (``step="convert"``), then run the
inputs through the quantized layer to produce the next layer's inputs. A tqdm bar shows the layers.

Asymmetric calibration (``asymmetric=True``, GPTAQ; :mod:`.gptq`): a second, full-precision stream
runs beside the quantized one (each layer applied, before its conversion, to the full-precision
model's own hidden states), and every linear is fitted to the full-precision model's output of that
linear rather than to its own output on the drifted inputs. Per calibration sample the layer runs on
the reference stream first (its linears' observers keep those inputs) and then on the quantized
stream (paired with them row by row). Fused experts keep plain GPTQ: tokens of the two streams are
routed differently, so their rows do not pair. Costs one more layer forward per sample and one more
hidden-state buffer.
"""

import logging
from typing import Callable, Dict, Optional

import torch
from torchao.quantization import quantize_
from tqdm.auto import tqdm

from ..architectures import decoder_layers, expert_projection_names
from ..configs import MXFP4Config, is_quantizable
from .data import check_calibration_ids
from .gptq import OBSERVER_ATTR, MXFP4GPTQConfig

logger = logging.getLogger(__name__)

__all__ = [
    "capture_first_layer_inputs", "decoder_layers_fqn", "materialize_offloaded", "run_layer", "run_layer_paired",
    "sequential_gptq",
]


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_first_layer_inputs(model, calib_ids: torch.Tensor):
    """(hidden states ``[n, L, d]`` entering layer 0, the keyword arguments the layer receives) for
    token ids ``calib_ids [n, L]`` (checked first: :func:`.data.check_calibration_ids`)."""
    layers = decoder_layers(model, "sequential calibration")
    calib_ids = check_calibration_ids(model, calib_ids, "calibration (capture_first_layer_inputs)")
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    hidden = []
    try:
        for ids in calib_ids:
            try:
                model(ids.unsqueeze(0), use_cache=False)
            except _StopForward:
                pass
            hidden.append(captured["hidden"][0].to(torch.float32))
    finally:
        handle.remove()
    return torch.stack(hidden), captured["kwargs"]


def materialize_offloaded(layer: torch.nn.Module) -> torch.nn.Module:
    """Load the weights of an accelerate-offloaded ``layer`` (every submodule whose hook keeps its
    tensors on the meta device / in a disk or CPU map) and detach the hooks: from here on the layer is
    an ordinary in-memory module that quantization can replace weights in."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import has_offloaded_params

    offloaded = [m for m in layer.modules() if has_offloaded_params(m)]
    for module in offloaded:
        module._hf_hook.pre_forward(module)  # copies the tensors from the weights map
    if offloaded or hasattr(layer, "_hf_hook"):
        remove_hook_from_module(layer, recurse=True)
    return layer


def run_layer(layer, hidden: torch.Tensor, kwargs: Dict) -> torch.Tensor:
    """The outputs ``[n, L, d]`` of decoder ``layer`` on ``hidden [n, L, d]``, one sample at a time,
    with the keyword arguments :func:`capture_first_layer_inputs` captured."""
    out = torch.empty_like(hidden)
    for i in range(hidden.shape[0]):
        y = layer(hidden[i : i + 1], **kwargs)
        out[i] = (y[0] if isinstance(y, tuple) else y)[0]
    return out


def run_layer_paired(layer, reference: torch.Tensor, hidden: torch.Tensor, kwargs: Dict, observers) -> torch.Tensor:
    """Asymmetric calibration's pass over one layer: per sample, ``layer`` on the ``reference`` stream
    with the linears' observers recording their reference rows (experts' observers paused), then on
    ``hidden`` (the quantized stream), which they accumulate paired with those rows. Returns the layer's
    outputs on the reference stream (the next layer's reference inputs)."""
    out = torch.empty_like(reference)
    for i in range(reference.shape[0]):
        for observer in observers:
            observer.record_reference(True)
        y = layer(reference[i : i + 1], **kwargs)
        out[i] = (y[0] if isinstance(y, tuple) else y)[0]
        for observer in observers:
            observer.record_reference(False)
        layer(hidden[i : i + 1], **kwargs)
    return out


@torch.no_grad()
def sequential_gptq(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    config_for: Callable[[str], Optional[MXFP4Config]],
    progress: bool = True,
    **gptq_kwargs,
) -> torch.nn.Module:
    """GPTQ every linear and every fused MoE experts module of every decoder layer, layer after layer.

    ``config_for(name)`` gives the MXFP4 base config for a linear by its short name inside the layer
    (``"q_proj"``, ``"down_proj"``, ...), or ``None`` to leave it alone; a fused experts module is
    looked up by its own short name (``"experts"``: one config for both its 3-D projections, as
    :func:`torchao_mx_ext.configs.quantize_linears` does for RTN) and gets per-expert GPTQ (module
    docstring of :mod:`torchao_mx_ext.calibration.gptq`). ``gptq_kwargs`` go to
    :class:`~.gptq.MXFP4GPTQConfig` (``damp``, ``column_block``, ``act_order``, ``mse_shrink``,
    ``asymmetric``: the linears are fitted to the full-precision model's outputs, module docstring).

    Checked before the model is touched: ``calib_ids`` (an integer ``[n, seq_len]`` tensor of ids in
    the model's vocabulary, :func:`.data.check_calibration_ids`), ``gptq_kwargs`` and every config
    ``config_for`` returns. Warnings name layers by their fqn (``model.layers.3.mlp.down_proj``).
    """
    layers = decoder_layers(model, "sequential calibration")
    calib_ids = check_calibration_ids(model, calib_ids, "sequential_gptq")
    # Every layer's targets and configs up front: a bad config fails here, not after earlier layers changed.
    asymmetric = gptq_kwargs.get("asymmetric", False)
    plan = []
    for i, layer in enumerate(layers):
        targets = {}
        for fqn, module in layer.named_modules():
            # is_quantizable: non-empty linears and fused experts (a MoEfied model's zero-width shared
            # expert has nothing to calibrate or store)
            if is_quantizable(module):
                base = config_for(fqn.split(".")[-1])
                if base is not None:
                    kwargs = dict(gptq_kwargs)
                    if expert_projection_names(module) is not None:
                        kwargs["asymmetric"] = False  # routed rows of two streams do not pair (module docstring)
                    targets[fqn] = (
                        MXFP4GPTQConfig(base=base, step="prepare", **kwargs),
                        MXFP4GPTQConfig(base=base, step="convert", **kwargs),
                    )
        plan.append(targets)
    layers_fqn = decoder_layers_fqn(model)
    hidden, kwargs = capture_first_layer_inputs(model, calib_ids)
    reference = hidden.clone() if asymmetric else None
    for i, (layer, targets) in enumerate(tqdm(list(zip(layers, plan)), desc="GPTQ layers", disable=not progress)):
        materialize_offloaded(layer)
        observers = []
        for fqn, (prepare, _) in targets.items():
            quantize_(layer, prepare, filter_fn=lambda m, n, f=fqn: n == f)
            observer = getattr(layer.get_submodule(fqn), OBSERVER_ATTR, None)
            if observer is not None:
                observer.name = f"{layers_fqn}.{i}.{fqn}"
                observers.append(observer)
        if asymmetric:
            reference = run_layer_paired(layer, reference, hidden, kwargs, observers)
        else:
            run_layer(layer, hidden, kwargs)
        for fqn, (_, convert) in targets.items():
            quantize_(layer, convert, filter_fn=lambda m, n, f=fqn: n == f)
        hidden = run_layer(layer, hidden, kwargs)
    return model


def decoder_layers_fqn(model) -> str:
    """The fqn of the decoder's layer list (``"model.layers"``): with a layer index and a module's fqn
    inside the layer, the module's fqn in ``model`` (for messages and model-level filters)."""
    layers = decoder_layers(model, "sequential calibration")
    for name, module in model.named_modules():
        if module is layers:
            return name
    return "model.layers"
