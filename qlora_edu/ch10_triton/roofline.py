"""Chapter 10: why dequantization is memory-bound, in numbers.

Dequantizing ``n`` NF4 weights does one float32 multiply per weight (two more per block of 64, and a few integer
operations to pick the nibble) and moves, at the very least, every stored byte in and every output byte out once:

    read   n / 2 bytes of 4-bit codes + n / blocksize 8-bit constants + 4 n / (blocksize * blocksize2) bytes of
           second-level scales (+ the offset and the two tables, 1,092 bytes, once)
    write  n * (2 for bf16 / fp16, 4 for float32) bytes

For bf16 output that is about 2.52 bytes per weight against ~1 flop: 0.4 flops per byte, while an H200 can do
~67 float32 Tflop/s against ~4.8 TB/s of memory bandwidth (data sheet), 14 flops per byte. A kernel that moves the
bytes once is bounded by the bandwidth (the roofline's sloped part), never by the arithmetic; its best time is
:func:`roofline_seconds` of :func:`dequantize_traffic_bytes`. The H200's measured times of the course's
``dequantize_nf4`` and of bitsandbytes' kernel come from ``qlora_edu/reference/gpu-runs.md`` through
:func:`measured_nf4_gpu_times`, never copied by hand.
"""

from __future__ import annotations

import math
import re

import torch

from qlora_edu.ch10_triton.guards import (
    check_dequantize_traffic_bytes_args,
    check_measured_nf4_gpu_times_args,
    check_roofline_seconds_args,
)
from qlora_edu.common.guards import n_blocks
from qlora_edu.common.reference import reference_body

__all__ = ["H200_BANDWIDTH", "dequantize_traffic_bytes", "roofline_seconds", "measured_nf4_gpu_times"]

#: Bytes per second: NVIDIA's data-sheet memory bandwidth of the H200 (4.8 TB/s, SXM and NVL), a specification,
#: not a measurement; a streaming copy reaches most but not all of it.
H200_BANDWIDTH = 4.8e12

#: The section of gpu-runs.md that holds the NF4 timings, and the columns read from its table.
_SECTION = "## NF4 with double quantization on CUDA"
_COLUMNS = ("dequantize_nf4", "bnb_dequantize_4bit", "dequantize_ratio", "quantize_nf4", "bnb_quantize_4bit",
            "quantize_ratio")


def dequantize_traffic_bytes(shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                             blocksize2: int = 256) -> int:
    """The bytes a one-pass NF4 dequantization (double quantization) must read and write at least.

    Args:
        shape: the weight's shape. dtype: the output's dtype. blocksize, blocksize2: the two block sizes.

    Returns:
        ``ceil(n / 2)`` code bytes + ``ceil(n / blocksize)`` constant codes + 4 bytes per second-level scale + the
        offset (4) + NF4's table (64) and the dynamic map (1,024), + ``n * dtype size`` written.
    """
    check_dequantize_traffic_bytes_args(shape, dtype, blocksize, blocksize2)
    n = math.prod(shape)
    constants = n_blocks(n, blocksize)
    read = n_blocks(n, 2) + constants + 4 * n_blocks(constants, blocksize2) + 4 + 4 * 16 + 4 * 256
    return read + n * dtype.itemsize


def roofline_seconds(nbytes: int, bandwidth: float = H200_BANDWIDTH) -> float:
    """The time to move ``nbytes`` at ``bandwidth`` bytes per second: a memory-bound kernel's lower bound."""
    check_roofline_seconds_args(nbytes, bandwidth)
    return nbytes / bandwidth


def measured_nf4_gpu_times() -> dict[tuple[int, int], dict[str, float]]:
    """The NF4 timings measured on an H200, read from ``qlora_edu/reference/gpu-runs.md``.

    Returns:
        ``{(rows, cols): {"dequantize_nf4": ms, "bnb_dequantize_4bit": ms, "dequantize_ratio": r,
        "quantize_nf4": ms, "bnb_quantize_4bit": ms, "quantize_ratio": r}}`` for the four shapes of its table
        (bf16 weights, block 64, double quantization, median of 50 runs timed with CUDA events).

    Raises:
        ValueError: the file has no such table (it was edited): the message says what was looked for.
    """
    check_measured_nf4_gpu_times_args()
    body = reference_body("gpu-runs.md")
    start = body.find(_SECTION)
    if start < 0:
        raise ValueError(f"qlora_edu/reference/gpu-runs.md has no section starting {_SECTION!r}")
    table = {}
    for line in body[start:].splitlines()[1:]:
        if table and not line.startswith("|"):
            break  # the end of the table
        m = re.match(r"\|\s*(\d+)\s*×\s*(\d+)\s*\|(.*)\|\s*$", line)
        if m:
            values = [float(v) for v in m.group(3).split("|")]
            if len(values) != len(_COLUMNS):
                raise ValueError(f"gpu-runs.md: the row {line!r} has {len(values)} numbers, not {len(_COLUMNS)}")
            table[int(m.group(1)), int(m.group(2))] = dict(zip(_COLUMNS, values, strict=True))
    if not table:
        raise ValueError("qlora_edu/reference/gpu-runs.md: no row of the form '| rows × cols | ms | ... |' under "
                         f"{_SECTION!r}")
    return table
