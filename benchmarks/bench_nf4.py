"""Speed of qlora_edu's NF4 quantize / dequantize next to bitsandbytes' CPU path.

    .venv/bin/python benchmarks/bench_nf4.py [--size 4096] [--repeats 9] [--strict]

On a size x size bf16 matrix (4096 x 4096 by default), in one process:

* ``quantize_nf4(x, double_quant=True)`` vs ``bitsandbytes.functional.quantize_4bit(x, quant_type="nf4",
  compress_statistics=True)``;
* ``dequantize_nf4(t)`` vs ``bitsandbytes.functional.dequantize_4bit(packed, quant_state)``.

For comparison (no target) it also times the lesson's one-pass ``quantize_4bit`` / ``dequantize_4bit``
(the functions a learner writes in exercise 2) against the same bitsandbytes calls without double
quantization: the gap between those rows and the first two is what ``qlora_edu/ch02_nf4/fast4bit.py`` buys.
The timing is ``qlora_edu.common.benchmarking.interleaved_medians``, the same as chapter 3's timing cell.

Each pair runs interleaved (ours, theirs, ours, theirs, ...) after a warm-up, so that a noisy neighbour
slows both alike; the table shows the medians and ratio = ours / bitsandbytes. Targets: quantize ratio
<= 1.0, dequantize ratio <= 2.0. Outputs are checked equal first (a fast wrong answer is no answer).
With --strict the exit status is 1 when a target is missed; without it the script only reports.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from qlora_edu.ch02_nf4.nf4 import nf4_code
from qlora_edu.ch02_nf4.quant4bit import dequantize_4bit, quantize_4bit
from qlora_edu.ch03_double_quant.nf4_tensor import dequantize_nf4, quantize_nf4
from qlora_edu.common.benchmarking import interleaved_medians

TARGETS = {"quantize": 1.0, "dequantize": 2.0}


def _bnb_functional():
    # bitsandbytes warns at import that the optional `kernels` package (a CPU gemm) is missing: irrelevant.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbf

    return bnbf


def _timed(ours, theirs, repeats: int, warmup: int) -> tuple[float, float]:
    return interleaved_medians(ours, theirs, repeats=repeats, warmup=warmup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="matrix side (default 4096)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats of each function (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    bnbf = _bnb_functional()
    torch.manual_seed(0)
    x = torch.randn(args.size, args.size, dtype=torch.bfloat16)

    # Same bytes first.
    ours_t = quantize_nf4(x, double_quant=True)
    packed, state = bnbf.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    same = (torch.equal(ours_t.packed, packed) and torch.equal(ours_t.absmax, state.absmax)
            and torch.equal(ours_t.offset, state.offset) and torch.equal(ours_t.absmax2, state.state2.absmax))
    same_deq = torch.equal(dequantize_nf4(ours_t), bnbf.dequantize_4bit(packed, state))
    if not (same and same_deq):
        print(f"outputs differ from bitsandbytes (quantize equal: {same}, dequantize equal: {same_deq})")
        return 1

    rows = []
    q_ours, q_bnb = _timed(lambda: quantize_nf4(x, double_quant=True),
                                 lambda: bnbf.quantize_4bit(x, quant_type="nf4", compress_statistics=True),
                                 args.repeats, args.warmup)
    rows.append(("quantize", q_ours, q_bnb))
    d_ours, d_bnb = _timed(lambda: dequantize_nf4(ours_t), lambda: bnbf.dequantize_4bit(packed, state),
                                 args.repeats, args.warmup)
    rows.append(("dequantize", d_ours, d_bnb))

    # the lesson's one-pass functions, without double quantization on either side (no target)
    code, plain_packed, plain_state = nf4_code(), *bnbf.quantize_4bit(x, quant_type="nf4")
    rows.append(("one-pass quantize_4bit", *_timed(
        lambda: quantize_4bit(x, code), lambda: bnbf.quantize_4bit(x, quant_type="nf4"), args.repeats, args.warmup)))
    rows.append(("one-pass dequantize_4bit", *_timed(
        lambda: dequantize_4bit(plain_packed, plain_state.absmax, code, x.shape, dtype=torch.bfloat16),
        lambda: bnbf.dequantize_4bit(plain_packed, plain_state), args.repeats, args.warmup)))

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"NF4 + double quantization, {args.size}x{args.size} bf16, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved repeats "
          f"(load average {load}: other processes slow both sides)")
    print(f"{'step':<26}{'qlora_edu ms':>14}{'bitsandbytes ms':>17}{'ratio':>8}{'target':>9}  ok")
    missed = []
    for name, ours, theirs in rows:
        ratio = ours / theirs
        if name in TARGETS:
            ok = ratio <= TARGETS[name]
            if not ok:
                missed.append(name)
            target, verdict = f"<= {TARGETS[name]}", "yes" if ok else "NO"
        else:
            target, verdict = "-", "(for comparison)"
        print(f"{name:<26}{ours * 1e3:>14.1f}{theirs * 1e3:>17.1f}{ratio:>8.2f}{target:>9}  {verdict}")
    if missed and args.strict:
        print(f"missed target(s): {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
