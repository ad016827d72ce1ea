"""The MXFP4 weight tensor subclass (`RotatedMXFP4Tensor`) and the activation container, one per file."""

import torch

from .mxfp4_activation_tensor import MXFP4ActivationTensor
from .rotated_mxfp4_tensor import RotatedMXFP4Tensor, check_weight, padded_width

# torch.load(weights_only=True) (the default) refuses classes it does not know.
torch.serialization.add_safe_globals([RotatedMXFP4Tensor])

__all__ = ["MXFP4ActivationTensor", "RotatedMXFP4Tensor", "check_weight", "padded_width"]
