"""MXFP4 dequantisation of GPT-OSS checkpoints' expert weights, in numpy.

A quantised expert matrix is stored as two tensors: `<name>_blocks` [*prefix, G, 16] uint8, 32 FP4 (e2m1) values
per group of 16 bytes, two per byte with the low nibble first, and `<name>_scales` [*prefix, G] uint8, each group's
E8M0 power of two (exponent = byte - 127). The result is what transformers' `convert_moe_packed_tensors` returns:
value * 2**exponent, the groups joined along the last axis, then axes 1 and 2 swapped, so that
gate_up_proj_blocks [E, 2f, d/32, 16] gives gate_up_proj [E, d, 2f] and down_proj_blocks [E, d, f/32, 16] gives
down_proj [E, f, d].
"""

from __future__ import annotations

import numpy as np

# The 16 e2m1 codes: sign bit, two exponent bits, one mantissa bit.
FP4_VALUES = np.array([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)

# Every code has at most two significant bits and the exponents reach down to -127 only, so each value * 2**exponent
# is exact in float32 and in bfloat16 (their exponent ranges are the same) unless it overflows: 2.0 * 2**127 and
# above. The E8M0 byte 255 (exponent 128) is NaN in the OCP format, and transformers' ldexp turns its whole group into
# inf or NaN.
NAN_SCALE = 255


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray, name: str = "the MXFP4 tensor") -> np.ndarray:
    """blocks [*prefix, G, B] uint8 and scales [*prefix, G] uint8 -> float32 [prefix[0], G * B * 2, *prefix[1:]]
    (transformers' layout: the dequantised [*prefix, G * B * 2] with axes 1 and 2 swapped), exact. A NaN scale or
    a value past the float32 (and bfloat16) range is a ValueError naming `name`."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise ValueError(f"{name}: MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 4 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"{name}: expected blocks [*prefix, G, B] with at least two prefix axes and scales "
                         f"[*prefix, G], got blocks {blocks.shape} and scales {scales.shape}")
    if (scales == NAN_SCALE).any():
        raise ValueError(f"{name}: {int(np.sum(scales == NAN_SCALE))} MXFP4 scale(s) are 255 (NaN in E8M0); the "
                         "checkpoint is damaged")
    values = np.empty((*blocks.shape, 2), np.float32)
    values[..., 0] = FP4_VALUES[blocks & 0x0F]
    values[..., 1] = FP4_VALUES[blocks >> 4]
    with np.errstate(over="ignore"):
        np.ldexp(values, scales.astype(np.int32)[..., None, None] - 127, out=values)
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: {int(np.sum(~np.isfinite(values)))} MXFP4 value(s) times their scale exceed the "
                         "float32 and bfloat16 range (scale 253 on |value| >= 4, or 254 on |value| >= 2); the "
                         "checkpoint is damaged")
    *prefix, groups, width = blocks.shape
    return np.ascontiguousarray(values.reshape(*prefix, groups * width * 2).swapaxes(1, 2))
