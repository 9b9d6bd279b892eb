"""The labs' command line: ``python -m qlora_edu.ch09_labs LAB [--smoke] [--out DIR]``.

    python -m qlora_edu.ch09_labs lab1     # QLoRA vs LoRA vs full fine-tuning          -> lab1_methods.json
    python -m qlora_edu.ch09_labs lab2     # rank ablation r in {8, ..., 128}           -> lab2_rank.json
    python -m qlora_edu.ch09_labs lab3     # target modules at equal budgets            -> lab3_targets.json
    python -m qlora_edu.ch09_labs lab4     # NF4 vs FP4 vs Int4 vs bf16 bases           -> lab4_quant.json
    python -m qlora_edu.ch09_labs lab5     # two adapters, one 4-bit base               -> lab5_hotswap.json
    python -m qlora_edu.ch09_labs lab6     # merging into 4 bits; safetensors and GGUF  -> lab6_merge_export.json
    python -m qlora_edu.ch09_labs lab7     # loss curves and the spectrum of dW         -> lab7_dynamics.json
    python -m qlora_edu.ch09_labs lab8     # the adapters' activations                  -> lab8_activations.json
    python -m qlora_edu.ch09_labs lab9     # trials per 24 GB GPU; an lr x rank sweep   -> lab9_sweeps.json
    python -m qlora_edu.ch09_labs lab10    # labs 1-4 over seeds; held-out templates      -> lab10_seeds.json
    python -m qlora_edu.ch09_labs all      # the ten, in order (later labs reuse earlier labs' trials)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qlora_edu.ch09_labs.common import LABS, RESULTS, Context, read_results, run_lab


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_edu.ch09_labs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab", choices=(*LABS, "all"))
    parser.add_argument("--smoke", action="store_true", default=None,
                        help="a few steps on a few orders (CI); also QLORA_EDU_SMOKE=1")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results files (default: %(default)s)")
    parser.add_argument("--model", help="a Llama-style folder or hub id instead of the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "qlora_edu_labs",
                        help="folder keeping finished trials, so an interrupted run resumes (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="keep finished trials in memory only")
    parser.add_argument("--work", type=Path, help="keep the adapters and exported models labs 5 and 6 write here "
                                                  "(default: a temporary folder)")
    args = parser.parse_args(argv)
    ctx = Context.create(args.model, smoke=args.smoke, progress=not args.no_progress,
                         log=lambda line: print(line, flush=True), cache_dir=None if args.no_cache else args.cache,
                         work=args.work)
    for lab in LABS if args.lab == "all" else (args.lab,):
        header = read_results(run_lab(lab, ctx, out=args.out))["header"]
        print(f"{lab}: wrote {args.out / (LABS[lab] + '.json')} in {header['wall_seconds']:.0f} s wall, "
              f"{header['cpu_seconds']:.0f} s CPU", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
