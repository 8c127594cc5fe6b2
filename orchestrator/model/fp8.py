"""FP8 block-quantized checkpoints (the released DeepSeek-V3 / V4 weights), dequantized on read.

Such a checkpoint's config.json says (DeepSeek-V3)::

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}

and stores each quantized weight ``W`` [M, N] as ``torch.float8_e4m3fn`` beside one scale per b0 x b1 block::

    <x>.weight            [M, N]                          float8_e4m3fn
    <x>.weight_scale_inv  [ceil(M / b0), ceil(N / b1)]    float32 (or float8_e8m0fnu / uint8 bytes: scale_fmt ue8m0)

the edge blocks cropped where b0 does not divide M or b1 does not divide N (V3's ``kv_a_proj_with_mqa``
[576, 7168]: scale [5, 56]). The scale is also shipped as ``<x>.scale`` (DeepSeek-V4-Flash) or
``<x>.qscale_weight`` (Mistral Large), the renamings transformers accepts
(``FineGrainedFP8HfQuantizer.update_weight_conversions``); a fused expert tensor ``<x>.gate_up_proj`` [E, M, N]
has ``<x>.gate_up_proj_scale_inv`` [E, ceil(M / b0), ceil(N / b1)] (transformers' ``Fp8Dequantize``).

The weight is (DeepSeek-V3 ``inference/kernel.py`` ``weight_dequant``, written with tensors)::

    s_full = s.repeat_interleave(b0, 0)[:M].repeat_interleave(b1, 1)[:, :N]
    W = (w_fp8.float() * s_full.float()).to(dtype)

transformers' ``Fp8Dequantize._dequantize_one`` computes the same products but refuses ragged edge blocks, so
:func:`dequantize` is this project's own. Activation scales (``activation_scheme: static``) are for FP8
inference and are not read: training runs on the dequantized weights. Weights the checkpoint stores
unquantized (embeddings, norms, the router, ``modules_to_not_convert``) have no scale and are read as they are.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from orchestrator.config import ConfigError

__all__ = ["Fp8Format", "quantization_format", "check_quantization_config", "scale_key_of", "scale_grid", "dequantize",
           "SCALE_SUFFIXES"]

# Where a checkpoint keeps the scale of weight `<x>.weight` (first found wins): the released DeepSeek-V3 name,
# then transformers' two renamings (`<x>.scale`, `<x>.qscale_weight`).
SCALE_SUFFIXES = ("weight_scale_inv", "scale", "qscale_weight")


@dataclass(frozen=True)
class Fp8Format:
    """An FP8 checkpoint's quantization: `block` (b0, b1) rows x columns of the weight per scale; `scale_fmt`
    "float" (scales as floats) or "ue8m0" (scales as powers of two: float8_e8m0fnu, or uint8 exponent bytes)."""
    block: tuple[int, int] = (128, 128)
    scale_fmt: str = "float"


def check_quantization_config(q: Any, where: str) -> Fp8Format:
    """The format of config.json's `quantization_config` `q` (`where`: the file, for the message). Only the FP8
    block format of DeepSeek-V3 / V4 loads: quant_method "fp8", fmt "e4m3" (the default), weight_block_size two
    positive ints (default [128, 128]), scale_fmt "float" or "ue8m0", expert_dtype "fp8" (V4's FP4-packed
    experts do not). Raises ConfigError of one line naming `where` and the key."""
    key = f"{where}: quantization_config"
    if not isinstance(q, dict):
        raise ConfigError(f"{key} is {q!r}, not an object; only FP8 block-quantized checkpoints "
                          f"(quant_method 'fp8') load")
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"{key}.quant_method is {method!r}: only FP8 block-quantized checkpoints (quant_method "
                          f"'fp8', the released DeepSeek-V3/V4 weights) load; give unquantized or FP8 weights")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{key}.fmt is {fmt!r}: only 'e4m3' (float8_e4m3fn weights) loads")
    block = q.get("weight_block_size", [128, 128])
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"{key}.weight_block_size is {block!r}: it must be two positive integers "
                          f"(rows, columns of a block), e.g. [128, 128]")
    scale_fmt = q.get("scale_fmt", "float")
    if scale_fmt not in ("float", "ue8m0"):
        raise ConfigError(f"{key}.scale_fmt is {scale_fmt!r}: only 'float' and 'ue8m0' load")
    expert_dtype = q.get("expert_dtype", "fp8")
    if expert_dtype != "fp8":
        raise ConfigError(f"{key}.expert_dtype is {expert_dtype!r}: only FP8 experts load (not FP4-packed ones)")
    return Fp8Format((int(block[0]), int(block[1])), scale_fmt)


def quantization_format(folder: str | Path) -> Fp8Format | None:
    """The FP8 format of the checkpoint folder's config.json, None when it has no config.json or no
    quantization_config (an unquantized checkpoint). Raises ConfigError (check_quantization_config)."""
    file = Path(folder).expanduser() / "config.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (ValueError, OSError) as e:
        raise ConfigError(f"{file}: not readable JSON ({e})") from None
    q = data.get("quantization_config") if isinstance(data, dict) else None
    return None if q is None else check_quantization_config(q, str(file))


def scale_key_of(key: str, keys: Iterable[str] | set[str] | dict) -> str | None:
    """The key of weight `key`'s block scale among the checkpoint's `keys`, or None: `<key>_scale_inv`
    (``<x>.weight_scale_inv``, fused experts' ``<x>.gate_up_proj_scale_inv``), else for ``<x>.weight``
    ``<x>.scale`` or ``<x>.qscale_weight``."""
    keys = keys if isinstance(keys, (set, dict, frozenset)) else set(keys)
    if key.endswith(".weight"):
        stem = key[: -len(".weight")]
        names = [f"{stem}.{suffix}" for suffix in SCALE_SUFFIXES]
    else:
        names = [f"{key}_scale_inv"]
    return next((n for n in names if n in keys), None)


def scale_grid(shape: Iterable[int], block: tuple[int, int]) -> list[int]:
    """The scale shape of a weight of `shape` [..., M, N]: [..., ceil(M / b0), ceil(N / b1)]."""
    *lead, M, N = list(shape)
    return [*lead, math.ceil(M / block[0]), math.ceil(N / block[1])]


def dequantize(w: torch.Tensor, s: torch.Tensor, fmt: Fp8Format, dtype: torch.dtype, where: str = "") -> torch.Tensor:
    """``(w.float() * s_full).to(dtype)``: weight `w` [..., M, N] (float8_e4m3fn) times its block scales `s`
    [..., ceil(M / b0), ceil(N / b1)] each repeated over its b0 x b1 block, the edge blocks cropped (DeepSeek-V3
    ``weight_dequant``; leading dims: fused experts, one scale grid each). Multiplied in float32, then cast to
    `dtype`. Scales of scale_fmt "ue8m0" stored as uint8 are exponent bytes: 2 ** (byte - 127). Raises ConfigError
    naming `where` for another weight dtype or a scale of the wrong shape."""
    if w.dtype != torch.float8_e4m3fn:
        raise ConfigError(f"{where} is {str(w.dtype).removeprefix('torch.')} with a block scale: only "
                          f"float8_e4m3fn weights are dequantized (quantization_config fmt 'e4m3')")
    b0, b1 = fmt.block
    if w.dim() < 2:
        raise ConfigError(f"{where} has shape {list(w.shape)} and a block scale: a block-scaled weight has 2 dims "
                          f"(or more: fused experts)")
    want = scale_grid(w.shape, fmt.block)
    if list(s.shape) != want:
        raise ConfigError(f"{where}: its scale has shape {list(s.shape)}; a weight of shape {list(w.shape)} in "
                          f"{b0} x {b1} blocks (quantization_config.weight_block_size) has {want}")
    if s.dtype == torch.uint8:
        if fmt.scale_fmt != "ue8m0":
            raise ConfigError(f"{where}: its scale is uint8, which only quantization_config.scale_fmt 'ue8m0' "
                              f"(exponent bytes) explains")
        s32 = torch.exp2(s.to(torch.float32) - 127.0)
    else:
        s32 = s.to(torch.float32)
    M, N = w.shape[-2:]
    s_full = s32.repeat_interleave(b0, dim=-2)[..., :M, :].repeat_interleave(b1, dim=-1)[..., :N]
    return (w.to(torch.float32) * s_full).to(dtype)
