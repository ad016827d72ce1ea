"""Sequential, layer-by-layer calibration of a decoder (the GPTQ pipeline).

Only one decoder layer's inputs are held in memory (``n_samples x seq_len x hidden``): the inputs of
layer ``i + 1`` are the outputs of layer ``i`` *after* it was quantized, so every layer is calibrated
on what the quantized model really feeds it (Frantar et al. 2022, section 5; MR-GPTQ).

Per layer: attach Hessian observers (``GPTQConfig(step="prepare")``) to its linears, run the
calibration inputs through it, run GPTQ (``step="convert"``), then run the inputs through the
quantized layer to produce the next layer's inputs. A tqdm bar shows the layers.
"""

from typing import Callable, Dict, Optional

import torch
from torchao.quantization import quantize_
from tqdm.auto import tqdm

from ..configs import MXFP4Config
from .gptq import GPTQConfig


class _StopForward(Exception):
    pass


def _decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise NotImplementedError(
            f"sequential calibration needs a decoder with model.model.layers (Llama-family HF models); got {type(model).__name__}"
        )
    return layers


@torch.no_grad()
def capture_first_layer_inputs(model, calib_ids: torch.Tensor):
    """(hidden states ``[n, L, d]`` entering layer 0, the keyword arguments the layer receives)."""
    layers = _decoder_layers(model)
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


def _run_layer(layer, hidden: torch.Tensor, kwargs: Dict) -> torch.Tensor:
    out = torch.empty_like(hidden)
    for i in range(hidden.shape[0]):
        y = layer(hidden[i : i + 1], **kwargs)
        out[i] = (y[0] if isinstance(y, tuple) else y)[0]
    return out


@torch.no_grad()
def sequential_gptq(
    model: torch.nn.Module,
    calib_ids: torch.Tensor,
    config_for: Callable[[str], Optional[MXFP4Config]],
    progress: bool = True,
    **gptq_kwargs,
) -> torch.nn.Module:
    """GPTQ every linear of every decoder layer, layer after layer.

    ``config_for(name)`` gives the MXFP4 base config for a linear by its short name inside the layer
    (``"q_proj"``, ``"down_proj"``, ...), or ``None`` to leave it alone; ``gptq_kwargs`` go to
    :class:`GPTQConfig` (``damp``, ``column_block``, ``act_order``, ``mse_shrink``).
    """
    layers = _decoder_layers(model)
    hidden, kwargs = capture_first_layer_inputs(model, calib_ids)
    for layer in tqdm(layers, desc="GPTQ layers", disable=not progress):
        targets = {}
        for fqn, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                base = config_for(fqn.split(".")[-1])
                if base is not None:
                    targets[fqn] = base
        for fqn, base in targets.items():
            quantize_(layer, GPTQConfig(base=base, step="prepare", **gptq_kwargs), filter_fn=lambda m, n, f=fqn: n == f)
        _run_layer(layer, hidden, kwargs)
        for fqn, base in targets.items():
            quantize_(layer, GPTQConfig(base=base, step="convert", **gptq_kwargs), filter_fn=lambda m, n, f=fqn: n == f)
        hidden = _run_layer(layer, hidden, kwargs)
    return model
