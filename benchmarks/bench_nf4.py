"""Speed of qlora_edu's NF4 quantize / dequantize next to bitsandbytes' CPU path.

    .venv/bin/python benchmarks/bench_nf4.py [--size 4096] [--repeats 9] [--strict] [--device cuda] [--json PATH]

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

With ``--device cuda`` both sides run on the GPU (each call followed by a synchronize). There bitsandbytes
rounds the constants' codes to the nearest (the CPU snaps to a grid first), so ours quantizes with
``rounding="nearest"``, and both dequantizations read bitsandbytes' stored bytes: the same input for both
kernels. ``--json PATH`` also writes the figures to PATH (scripts/gpu_check.py reads them).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from qlora_edu.ch02_nf4.nf4 import nf4_code
from qlora_edu.ch02_nf4.quant4bit import dequantize_4bit, quantize_4bit
from qlora_edu.ch03_double_quant.nf4_codec import dequantize_nf4, quantize_nf4
from qlora_edu.ch03_double_quant.nf4_tensor import NF4Tensor
from qlora_edu.common.benchmarking import interleaved_medians

TARGETS = {"quantize": 1.0, "dequantize": 2.0}


def _bnb_functional():
    # bitsandbytes warns at import that the optional `kernels` package (a CPU gemm) is missing: irrelevant.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnbf

    return bnbf


def _timed(ours, theirs, repeats: int, warmup: int, device: str = "cpu") -> tuple[float, float]:
    if device == "cuda":  # kernels run asynchronously: time each call to its end
        ours, theirs = (lambda f=f: (f(), torch.cuda.synchronize())[0] for f in (ours, theirs))
    return interleaved_medians(ours, theirs, repeats=repeats, warmup=warmup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="matrix side (default 4096)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats of each function (default 9)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both sides run (default cpu)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")

    bnbf = _bnb_functional()
    torch.manual_seed(0)
    x = torch.randn(args.size, args.size, dtype=torch.bfloat16).to(args.device)
    rounding = "nearest" if args.device == "cuda" else "grid"  # how bitsandbytes rounds the constants there

    # Same bytes first.
    ours_t = quantize_nf4(x, double_quant=True, rounding=rounding)
    packed, state = bnbf.quantize_4bit(x, quant_type="nf4", compress_statistics=True)
    same = {"packed": torch.equal(ours_t.packed, packed), "constants' codes": torch.equal(ours_t.absmax, state.absmax),
            "offset": torch.equal(ours_t.offset, state.offset),
            "second-level constants": torch.equal(ours_t.absmax2, state.state2.absmax)}
    # Both dequantizations read bitsandbytes' stored bytes (on the CPU those are ours too, as checked above).
    theirs_t = NF4Tensor(packed, state.absmax, x.shape, x.dtype, 64, True, state.offset, state.state2.absmax, 256)
    same["dequantized"] = torch.equal(dequantize_nf4(theirs_t), bnbf.dequantize_4bit(packed, state))
    # On CUDA the float32 mean (offset) may differ in its last bit (summation order): not a failure there.
    must_match = [k for k in same if not (args.device == "cuda" and k == "offset")]
    if not all(same[k] for k in must_match):
        print(f"outputs differ from bitsandbytes: {same}")
        return 1

    rows = []
    q_ours, q_bnb = _timed(lambda: quantize_nf4(x, double_quant=True, rounding=rounding),
                           lambda: bnbf.quantize_4bit(x, quant_type="nf4", compress_statistics=True),
                           args.repeats, args.warmup, args.device)
    rows.append(("quantize", q_ours, q_bnb))
    d_ours, d_bnb = _timed(lambda: dequantize_nf4(theirs_t), lambda: bnbf.dequantize_4bit(packed, state),
                           args.repeats, args.warmup, args.device)
    rows.append(("dequantize", d_ours, d_bnb))
    if args.device == "cuda":  # the one-pass comparison rows are the CPU lesson's
        return _report(args, rows, same)

    # the lesson's one-pass functions, without double quantization on either side (no target)
    code, plain_packed, plain_state = nf4_code(), *bnbf.quantize_4bit(x, quant_type="nf4")
    rows.append(("one-pass quantize_4bit", *_timed(
        lambda: quantize_4bit(x, code), lambda: bnbf.quantize_4bit(x, quant_type="nf4"), args.repeats, args.warmup)))
    rows.append(("one-pass dequantize_4bit", *_timed(
        lambda: dequantize_4bit(plain_packed, plain_state.absmax, code, x.shape, dtype=torch.bfloat16),
        lambda: bnbf.dequantize_4bit(plain_packed, plain_state), args.repeats, args.warmup)))
    return _report(args, rows, same)


def _report(args, rows, same) -> int:
    """Print the table (and write --json); the exit status."""
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"NF4 + double quantization, {args.size}x{args.size} bf16, torch {torch.__version__}, "
          f"{where}, median of {args.repeats} interleaved repeats "
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
        print(f"{name:<26}{ours * 1e3:>14.3f}{theirs * 1e3:>17.3f}{ratio:>8.2f}{target:>9}  {verdict}")
    if args.json:
        import bitsandbytes

        figures = {"device": args.device, "device_name": where, "torch": torch.__version__,
                   "bitsandbytes": bitsandbytes.__version__, "size": args.size, "dtype": "bfloat16",
                   "repeats": args.repeats, "same_as_bitsandbytes": same, "missed": missed,
                   "rows": [{"step": name, "ours_ms": ours * 1e3, "bitsandbytes_ms": theirs * 1e3,
                             "ratio": ours / theirs, "target": TARGETS.get(name)} for name, ours, theirs in rows]}
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    if missed and args.strict:
        print(f"missed target(s): {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
