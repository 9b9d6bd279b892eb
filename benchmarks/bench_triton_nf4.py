"""Chapter 10's kernel on a CUDA GPU: NF4 dequantization, ours in Triton vs bitsandbytes vs the course's lesson path.

    python benchmarks/bench_triton_nf4.py [--repeats 50] [--json results.json]

For each of 576 x 576, 1536 x 576, 4096 x 4096 and 11008 x 4096 bf16 weights (the shapes of
``qlora_edu/reference/gpu-runs.md``), bitsandbytes' CUDA ``quantize_4bit(..., quant_type="nf4",
compress_statistics=True)`` stores the weight once, and the three dequantizations read those same stored bytes:

* ``dequantize_nf4_triton`` (chapter 10's fused kernel, compiled by Triton);
* bitsandbytes' ``dequantize_4bit`` (its CUDA kernels);
* the course's ``dequantize_nf4`` without the kernel (chapter 3: the constants, then a torch.compile'd lookup).

Their outputs are first checked equal bit for bit (a fast wrong answer is no answer), then each call is timed with
CUDA events around it (median of ``--repeats``, after a warm-up; the same method as gpu-runs.md), and the table shows
the ratios to bitsandbytes, next to the issue's targets (<= 1.0 on every shape, <= 0.5 aimed for on the two large
ones) and the bandwidth bound (the bytes a one-pass kernel must move, at the H200's 4.8 TB/s). ``--json PATH`` also
writes every figure to PATH. Without a CUDA device it says so and exits 0 (``make bench`` runs it on every machine).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys

import torch

SHAPES = [(576, 576), (1536, 576), (4096, 4096), (11008, 4096)]
TARGET, AIM, AIM_SHAPES = 1.0, 0.5, {(4096, 4096), (11008, 4096)}


def cuda_median_ms(fn, repeats: int, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()``, each call between two CUDA events (its launch overhead included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed calls of each function (default 50)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_triton_nf4: needs a CUDA device (torch {torch.__version__} sees none); chapter 10's kernel "
              "runs on a CPU only in Triton's interpreter, which is not worth timing. Nothing measured.")
        return 0

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes
    import bitsandbytes.functional as bnbf
    import triton

    try:  # the course's torch path by name, once dequantize_nf4 itself calls the kernel on CUDA
        from qlora_edu.ch03_double_quant.nf4_codec import dequantize_nf4_torch as dequantize_nf4
    except ImportError:
        from qlora_edu.ch03_double_quant.nf4_codec import dequantize_nf4
    from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor
    from qlora_edu.ch10_triton.nf4_triton import dequantize_nf4_triton
    from qlora_edu.ch10_triton.roofline import H200_BANDWIDTH, dequantize_traffic_bytes, roofline_seconds

    device = torch.cuda.get_device_name()
    print(f"NF4 dequantization to bf16 on {device}: torch {torch.__version__}, triton {triton.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}; median of {args.repeats} calls, CUDA events")
    rows, all_equal = [], True
    torch.manual_seed(0)
    for shape in SHAPES:
        x = torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.02
        packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
        weight = NF4Tensor(packed, state.absmax, x.shape, torch.bfloat16, state.blocksize, True, state.offset,
                           state.state2.absmax, state.state2.blocksize)
        ours, theirs = dequantize_nf4_triton(weight), bnbf.dequantize_4bit(packed, state)
        lesson = dequantize_nf4(weight)
        equal = torch.equal(ours.view(torch.int16), theirs.view(torch.int16)) and torch.equal(
            ours.view(torch.int16), lesson.view(torch.int16))
        all_equal &= equal
        ms = {"triton": cuda_median_ms(lambda w=weight: dequantize_nf4_triton(w), args.repeats),
              "bitsandbytes": cuda_median_ms(lambda p=packed, s=state: bnbf.dequantize_4bit(p, s), args.repeats),
              "dequantize_nf4": cuda_median_ms(lambda w=weight: dequantize_nf4(w), args.repeats)}
        bound_ms = roofline_seconds(dequantize_traffic_bytes(shape), H200_BANDWIDTH) * 1e3
        rows.append({"shape": list(shape), "bit_identical": equal, "ms": ms, "bandwidth_bound_ms": bound_ms,
                     "triton_over_bitsandbytes": ms["triton"] / ms["bitsandbytes"],
                     "dequantize_nf4_over_bitsandbytes": ms["dequantize_nf4"] / ms["bitsandbytes"]})

    print(f"{'shape':>14}{'triton ms':>11}{'bnb ms':>9}{'lesson ms':>11}{'triton/bnb':>12}{'lesson/bnb':>12}"
          f"{'bound ms':>10}  equal  target <= {TARGET}")
    for r in rows:
        shape, ratio = tuple(r["shape"]), r["triton_over_bitsandbytes"]
        verdict = "met" if ratio <= TARGET else "MISSED"
        if shape in AIM_SHAPES:
            verdict += f", aim <= {AIM}: {'met' if ratio <= AIM else 'not yet'}"
        print(f"{shape[0]:>7} x {shape[1]:<5}{r['ms']['triton']:>10.3f}{r['ms']['bitsandbytes']:>9.3f}"
              f"{r['ms']['dequantize_nf4']:>11.3f}{ratio:>12.2f}{r['dequantize_nf4_over_bitsandbytes']:>12.2f}"
              f"{r['bandwidth_bound_ms']:>10.4f}  {str(r['bit_identical']):5}  {verdict}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": device, "torch": torch.__version__, "triton": triton.__version__,
                       "bitsandbytes": bitsandbytes.__version__, "repeats": args.repeats, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    if not all_equal:
        print("the outputs are NOT bit-identical: the timings above compare different results")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
