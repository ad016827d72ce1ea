"""MXFP4 format primitives: E2M1 elements, E8M0 scale rules, packing, quantize/dequantize."""

from .e2m1 import E2M1_MAX, code_to_e2m1, e2m1_to_code, round_to_e2m1
from .e8m0 import SCALE_RULES, check_scale_rule, element_multiplier, shared_exponent
from .packing import pack_uint4, unpack_uint4
from .quantize import mxfp4_dequantize, mxfp4_fake_quantize, mxfp4_quantize, round_onto_scales

__all__ = [
    "E2M1_MAX",
    "SCALE_RULES",
    "check_scale_rule",
    "code_to_e2m1",
    "e2m1_to_code",
    "element_multiplier",
    "mxfp4_dequantize",
    "mxfp4_fake_quantize",
    "mxfp4_quantize",
    "pack_uint4",
    "round_onto_scales",
    "round_to_e2m1",
    "shared_exponent",
    "unpack_uint4",
]
