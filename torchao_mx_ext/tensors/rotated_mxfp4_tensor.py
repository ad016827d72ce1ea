"""``RotatedMXFP4Tensor``: a linear weight stored as MXFP4 after an orthogonal rotation.

For ``y = x W^T`` (``W`` is ``N x K``) the weight stores ``Q(W R)``: ``W`` zero-padded to a width
divisible by the block (``K_p``), rotated by the block-diagonal ``R`` (``rotation``, one shared block,
or ``None`` for no rotation), and MXFP4-quantized along ``K_p`` (codes two per uint8 + E8M0 uint8
scales: 4.25 bits per weight). Its linear computes ``y = Q_a(x R) Q(W R)^T + b`` with the activation
padded, rotated and quantized online (``Q_a`` with ``act_scale_rule``; ``None`` = weight-only).
Since ``R`` is orthogonal, ``x R (W R)^T = x W^T``: only quantization changes the result.

Emulation (no MXFP4 GEMM on CPUs and Hopper GPUs): rotation and quantization run in float32, the GEMM
in float32, or in bfloat16 for bfloat16 inputs: MXFP4 values (``q * 2^e``, ``q`` with at most two
significant bits) are exact in bfloat16, so only the accumulation's output rounding differs
(``fp_quant``'s 4/3 factor is not exact there, so it stays in float32). An optional ``dequantized``
cache (:func:`torchao_mx_ext.inference.cache_dequantized_weights`) trades memory for speed by skipping
the per-call decode. Kernels (``kernels/``): on CPU, small batches decode the weight inside the
reduction (``cpu_mxfp4_gemv``; a W4A4 one also rotates and quantizes its input in that call),
W4A4 batches of 9 to 128 rows on AVX2 CPUs run on exact integer dot products of the codes
(``cpu_mxfp4_mm``), and larger ones decode the weight (``cpu_mxfp4_dequantize``) for the library GEMM;
on Blackwell GPUs, opted in, W4A4 runs on MXFP4 tensor cores (``cuda_mxfp4_mm``).
Rotation-domain paper: FP-Quant / MR-GPTQ (arXiv 2509.23202) and BRQ (arXiv 2511.04214).
"""

import math

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from .caching import stable_metadata_hash
from ..kernels import CPU_NATIVE_BF16_GEMM, check_kernel_preference, cpu_mxfp4_dequantize, cpu_mxfp4_gemv, cpu_mxfp4_mm, cpu_mxfp4_quantize, cuda_mxfp4_mm, effective_preference
from ..mx import check_scale_rule, mxfp4_dequantize, mxfp4_quantize
from ..rotation import pad_and_rotate
from .mxfp4_activation_tensor import MXFP4ActivationTensor

__all__ = ["RotatedMXFP4Tensor", "check_weight", "padded_width"]

aten = torch.ops.aten


class RotatedMXFP4Tensor(TorchAOBaseTensor):
    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["block_size", "scale_rule", "act_scale_rule", "in_features", "dtype"]
    optional_tensor_data_names = ["rotation", "dequantized"]
    optional_tensor_attribute_names = ["kernel_preference"]

    def __new__(
        cls, qdata, scale, block_size, scale_rule, act_scale_rule, in_features, dtype, rotation=None, dequantized=None,
        kernel_preference="auto",
    ):
        shape = (*qdata.shape[:-1], in_features)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qdata.device, requires_grad=False)

    def __init__(
        self, qdata, scale, block_size, scale_rule, act_scale_rule, in_features, dtype, rotation=None, dequantized=None,
        kernel_preference="auto",
    ):
        check_kernel_preference(kernel_preference)
        self.qdata = qdata
        self.scale = scale
        self.block_size = block_size
        self.scale_rule = scale_rule
        self.act_scale_rule = act_scale_rule
        self.in_features = in_features
        self.rotation = rotation
        self.dequantized = dequantized
        self.kernel_preference = kernel_preference  # kernels/__init__.py: which kernel the linear uses

    def _stable_hash_for_caching(self) -> str:
        return stable_metadata_hash(self)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_hp(
        cls,
        weight: torch.Tensor,
        block_size: int = 32,
        scale_rule: str = "floor",
        act_scale_rule: str | None = "floor",
        rotation: torch.Tensor | None = None,
        kernel_preference: str = "auto",
    ) -> "RotatedMXFP4Tensor":
        """Quantize a high-precision ``N x K`` weight. ``rotation`` is the ``b x b`` block of ``R``
        (``b`` divides the padded width); the width is zero-padded to a multiple of ``block_size``
        and ``b``."""
        check_scale_rule(scale_rule)
        if act_scale_rule is not None:
            check_scale_rule(act_scale_rule)
        check_weight(weight)
        width = padded_width(weight.shape[-1], block_size, None if rotation is None else rotation.shape[0])
        # Rotated offline in float64: the stored weight is Q(fl32(W R)).
        rotated = pad_and_rotate(weight.to(torch.float64), width, rotation)
        qdata, scale = mxfp4_quantize(rotated.to(torch.float32), block_size, scale_rule)
        return cls(qdata, scale, block_size, scale_rule, act_scale_rule, weight.shape[-1], weight.dtype, rotation, None, kernel_preference)

    # -- math -----------------------------------------------------------------------------------
    @property
    def padded_in_features(self) -> int:
        return self.qdata.shape[-1] * 2

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Q(W R)`` (rotated, quantized, padded width ``K_p``) in ``dtype`` (default: the weight's).
        On AVX-512 and AVX2 CPUs by the vectorised C++ decode where it applies (bit-equal; not with the
        ``emulated`` preference); elsewhere pure torch, which Inductor fuses."""
        dtype = dtype or self.dtype
        decode = cpu_mxfp4_dequantize
        if self.kernel_preference != "emulated" and decode.VECTORIZED and decode.applies(self.qdata, self.block_size, self.scale_rule, dtype):
            return cpu_mxfp4_dequantize.mxfp4_dequantize(self.qdata, self.scale, self.block_size, dtype)
        return mxfp4_dequantize(self.qdata, self.scale, self.block_size, self.scale_rule, dtype)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` in float32, with ``x`` zero-padded to the stored width."""
        return pad_and_rotate(x.to(torch.float32), self.padded_in_features, self.rotation)

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The GEMM's activation operand in float32: ``Q_a(x R)`` (``x R`` for weight-only), padded; one
        fused CPU kernel call where it applies (:func:`.cpu_mxfp4_quantize.rotate_and_quantize`)."""
        return cpu_mxfp4_quantize.rotate_and_quantize(
            x, self.padded_in_features, self.rotation, self.block_size, self.act_scale_rule, self.kernel_preference
        )

    def quantize_input(self, x: torch.Tensor) -> MXFP4ActivationTensor:
        """The activation operand as codes + scales: ``Q_a(x R)`` (for hardware MXFP4 GEMMs)."""
        if self.act_scale_rule is None:
            raise ValueError("this weight is weight-only (act_scale_rule=None): its inputs are not quantized")
        return MXFP4ActivationTensor.from_hp(self.rotate_input(x), self.block_size, self.act_scale_rule)

    def gemm_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        exact_in_bf16 = "fp_quant" not in (self.scale_rule, self.act_scale_rule)
        return torch.bfloat16 if input_dtype == torch.bfloat16 and exact_in_bf16 else torch.float32

    def with_dequantized_cache(self, enabled: bool = True) -> "RotatedMXFP4Tensor":
        """The same weight, with (or without) a cached ``Q(W R)`` in its GEMM dtype."""
        cache = self.dequantize(self.gemm_dtype(self.dtype)) if enabled else None
        return RotatedMXFP4Tensor(
            self.qdata, self.scale, self.block_size, self.scale_rule, self.act_scale_rule,
            self.in_features, self.dtype, self.rotation, cache, self.kernel_preference,
        )

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``Q_a(x R) Q(W R)^T + b``, emulated (see the module docstring), returned in ``x.dtype``."""
        gemm_dtype = self.gemm_dtype(x.dtype)
        # The device test first: CPU calls (also compiled ones) never read the environment override.
        if x.device.type == "cuda" and effective_preference(self.kernel_preference) == "hw_mxfp4" and cuda_mxfp4_mm.applies(self, x):
            # MXFP4 tensor cores (opt-in): the activation as codes + scales, no dequantization.
            xr = self.rotate_input(x)
            a = MXFP4ActivationTensor.from_hp(xr.reshape(-1, xr.shape[-1]), self.block_size, self.act_scale_rule)
            y = cuda_mxfp4_mm.mxfp4_scaled_mm(a.qdata, a.scale, a.scale_rule, self.qdata, self.scale, self.scale_rule, bias, x.dtype)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if cpu_mxfp4_mm.applies(self, x):
            # W4A4 on CPU: exact integer chunk dot products on the codes (same numbers up to float32
            # summation order). The activation's quantization before it fuses into one Inductor kernel.
            xr = self.rotate_input(x)
            a = MXFP4ActivationTensor.from_hp(xr.reshape(-1, xr.shape[-1]), self.block_size, self.act_scale_rule)
            b = None if bias is None else bias.to(gemm_dtype)
            y = cpu_mxfp4_mm.mxfp4_mm(a.qdata, a.scale, self.qdata, self.scale, self.block_size, b, x.dtype)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if cpu_mxfp4_quantize.fuses_into_gemv(self) and cpu_mxfp4_gemv.applies(self, x, fused_input=True):
            # W4A4 decode: the GEMV rotates and quantizes its input itself (the quantizer kernel's bits)
            # and takes its integer path; one operator call per linear. With PANELS (AVX-512 VNNI) also
            # prompts: more than 16 rows run as the kernel's panel GEMM.
            width = self.padded_in_features
            xp = x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))
            b = None if bias is None else bias.to(gemm_dtype)
            return cpu_mxfp4_gemv.mxfp4_gemv(
                xp, self.qdata, self.scale, self.block_size, self.scale_rule, b, x.dtype, self.rotation, self.act_scale_rule
            )
        # Same numbers as quantize_input(x).dequantize() (up to the rotation's float32 summation order
        # where the fused kernel runs), without materialising codes.
        xr = self.transform_input(x)
        if self.kernel_preference != "emulated" and cpu_mxfp4_gemv.applies(self, xr):
            # Small batch on CPU: decode inside the reduction (same numbers up to float32 summation order).
            # Also with a dense cache: the packed codes are a quarter of its bytes, and GEMV is memory-bound.
            b = None if bias is None else bias.to(gemm_dtype)
            # A quantized activation is exact in the GEMM dtype: the float32 one goes in as it is (no cast
            # kernel) and takes the kernel's integer path.
            xg = xr if self.act_scale_rule is not None else xr.to(gemm_dtype)
            return cpu_mxfp4_gemv.mxfp4_gemv(xg, self.qdata, self.scale, self.block_size, self.scale_rule, b, x.dtype)
        xr = xr.to(gemm_dtype)
        if self.dequantized is not None:
            w = self.dequantized
        else:
            if gemm_dtype == torch.bfloat16 and xr.device.type == "cpu" and not CPU_NATIVE_BF16_GEMM:
                # No bf16 GEMM instructions (AVX2): float32 is several times faster. The same operands
                # (the input already rounded to bf16), exact in float32; a bf16 GEMM accumulates in
                # float32 too, so only the summation order differs.
                gemm_dtype = torch.float32
                xr = xr.to(gemm_dtype)
            w = self.dequantize(gemm_dtype)
        y = F.linear(xr, w.to(gemm_dtype), None if bias is None else bias.to(gemm_dtype))
        return y.to(x.dtype)


def padded_width(width: int, block_size: int, rotation_size: int | None) -> int:
    """Smallest multiple of ``block_size`` (and of ``rotation_size``) that is at least ``width``."""
    unit = block_size if rotation_size is None else math.lcm(block_size, rotation_size)
    return -(-width // unit) * unit


def check_weight(weight, ndim: int = 2, name: str = "weight") -> None:
    """Raise unless ``weight`` is a finite floating-point tensor of ``ndim`` dimensions that is not
    already quantized: what :meth:`RotatedMXFP4Tensor.from_hp` needs (``ndim=3``: fused experts)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} is not a tensor ({type(weight).__name__})")
    if isinstance(weight, TorchAOBaseTensor):
        raise TypeError(f"{name} is already quantized ({type(weight).__name__}); quantize the original weight once")
    if not weight.is_floating_point():
        raise TypeError(f"{name}: MXFP4 quantizes floating-point weights, got dtype {weight.dtype}")
    if weight.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D weight, got shape {tuple(weight.shape)}")
    if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"{name} has {bad} NaN/Inf values; MXFP4 cannot represent them")


implements = RotatedMXFP4Tensor.implements
implements_torch_function = RotatedMXFP4Tensor.implements_torch_function


@implements_torch_function(F.linear)
@implements(aten.linear.default)
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(w, RotatedMXFP4Tensor):
        raise NotImplementedError("RotatedMXFP4Tensor as the input (not the weight) of a linear is not supported")
    return w.linear(x, bias)


@implements_torch_function(torch.Tensor.dequantize)
def _(func, types, args, kwargs):
    return args[0].dequantize(*args[1:], **kwargs)


@implements(aten._to_copy.default)
def _(func, types, args, kwargs):
    # .to(device) moves the data; .to(dtype) changes the high-precision dtype of inputs/outputs
    # (the stored codes do not change).
    self = args[0]
    to = self._get_to_kwargs(*args[1:], **kwargs)
    device = to["device"]
    moved = [getattr(self, n).to(device) for n in self.tensor_data_names]
    rotation = None if self.rotation is None else self.rotation.to(device)
    out = RotatedMXFP4Tensor(
        *moved, self.block_size, self.scale_rule, self.act_scale_rule, self.in_features, to["dtype"], rotation, None,
        self.kernel_preference,
    )
    return out if self.dequantized is None else out.with_dequantized_cache()


@implements(aten.copy_.default)
def _(func, types, args, kwargs):
    # load_state_dict copies into the existing parameter: say which side is what, instead of torchao's
    # generic "metadata mismatch" (or an AttributeError when one side is a plain tensor).
    dst, src = args[0], args[1]
    if not isinstance(src, RotatedMXFP4Tensor):
        raise TypeError(
            "cannot copy a plain tensor into an MXFP4-quantized weight: load a full-precision state dict into "
            "the model before quantize_ (or quantize it with the same config after loading)"
        )
    if not isinstance(dst, RotatedMXFP4Tensor):
        raise TypeError(
            "cannot copy an MXFP4-quantized weight into a plain tensor: quantize_ the model with the config the "
            "state dict was made with first, or load with load_state_dict(..., assign=True)"
        )
    fields = ("shape", "block_size", "scale_rule", "act_scale_rule", "in_features", "padded_in_features")
    differ = [f for f in fields if getattr(dst, f) != getattr(src, f)]
    if (dst.rotation is None) != (src.rotation is None) or (
        dst.rotation is not None and dst.rotation.shape != src.rotation.shape
    ):
        differ.append("rotation")
    if differ:
        detail = ", ".join(f"{f} {getattr(dst, f, '...')!r} vs {getattr(src, f, '...')!r}" for f in differ)
        raise ValueError(f"cannot copy an MXFP4 weight of another layout ({detail}); quantize with the same config")
    dst.qdata.copy_(src.qdata)
    dst.scale.copy_(src.scale)
    if dst.rotation is not None:
        dst.rotation.copy_(src.rotation)
    if dst.dequantized is not None:
        dst.dequantized.copy_(dst.dequantize(dst.dequantized.dtype))
    return dst
