"""Chapter 4's memory model (qlora_edu.ch04_memory.memory), predicted vs measured.

    .venv/bin/python benchmarks/memory_validation.py [--course] [--no-cpu] [--write]

1. Every training row of qlora_edu/reference/gpu-facts.md (one H100, PagedAdamW32bit, LoRA r=64 on the
   seven projections): predicted total (= torch peak + optimizer states, as the file defines it) and torch
   peak next to the measured ones. Nothing in the model is fitted to these rows.
2. On this machine's CPU, a small random Llama set up as gpu_probe.py does: frozen + trainable weights,
   gradients and optimizer states after real steps, the bytes autograd saves for backward
   (saved_tensors_hooks), and the peak of torch's CPU allocations over two steps, each next to
   ``training_memory(..., device="cpu")``.
3. With --course, the same for the course model (SmolLM2-135M; ~10 minutes on two cores), and its saved
   activations over several batch x sequence settings with and without checkpointing.
4. Where CUDA is available, the small random Llama again, measured with torch.cuda.max_memory_allocated.

With --write the tables also go to benchmarks/memory_validation_results.json (chapter 4 prints them).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import platform
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from transformers import LlamaConfig

from qlora_edu.ch04_memory.memory import llama_config, training_memory
from qlora_edu.ch04_memory.memory_probe import (
    build_training_model,
    course_training_model,
    gpu_facts_config,
    gpu_facts_rows,
    measure_training_step,
    random_batch,
    saved_activation_bytes,
)
from qlora_edu.common.training_setup import make_optimizer

MiB = 2**20
PARTS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states")
RESULTS = Path(__file__).with_name("memory_validation_results.json")
#: every table row, by section, for --write
TABLES: dict[str, list[dict]] = {"gpu_facts": [], "cpu_small": [], "cpu_course": [], "course_activations": [],
                                 "cuda_small": []}


def pct(pred: float, meas: float) -> str:
    return f"{100 * (pred / meas - 1):+6.2f}%" if meas else "   n/a "


def gpu_rows() -> None:
    print("1. gpu-facts.md rows (H100). total = torch peak + optimizer states; tolerance 5% (10% no checkpointing)")
    print(f"{'model':5} {'method':6} {'batch x seq':>11} {'ckpt':5} {'prep':5} | {'total MiB pred':>14} "
          f"{'meas':>6} {'err':>8} | {'torch peak pred':>15} {'meas':>6} {'err':>8} | peak at")
    for row in gpu_facts_rows():
        kw = {"prepare_kbit": row["prepare"]} if row["method"] == "qlora" else {}
        p = training_memory(gpu_facts_config(row), row["method"], batch_size=row["batch"], seq_len=row["seq"],
                            lora_r=row["lora_r"], gradient_checkpointing=row["ckpt"], optimizer="paged_adamw", **kw)
        total, peak = p.total / MiB, p.torch_peak / MiB
        TABLES["gpu_facts"].append({**{k: row[k] for k in ("model", "method", "batch", "seq", "ckpt", "prepare")},
                                    "total_mib": row["total_mib"], "predicted_total_mib": round(total, 1),
                                    "torch_peak_mib": row["torch_peak_mib"], "predicted_torch_peak_mib": round(peak, 1),
                                    "peak_phase": p.peak_phase})
        print(f"{row['model']:5} {row['method']:6} {row['batch']:>4} x {row['seq']:<4} {row['ckpt']!s:5} "
              f"{row['prepare']!s:5} | {total:14.0f} {row['total_mib']:6d} {pct(total, row['total_mib'])}"
              f" | {peak:15.0f} {row['torch_peak_mib']:6d} "
              f"{pct(peak, row['torch_peak_mib'])} | {p.peak_phase}")


def small_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def report(label: str, pred, meas: dict, table: str) -> None:
    TABLES[table].append({"setup": label.strip(), **{f"{k}_bytes": meas[k] for k in PARTS},
                          **{f"predicted_{k}_bytes": getattr(pred, "all_gradients" if k == "gradients" else k)
                             for k in PARTS},
                          "saved_bytes": meas["saved_activations"], "predicted_saved_bytes": pred.saved_activations,
                          "peak_bytes": meas["peak"], "predicted_peak_bytes": pred.total,
                          "peak_phase": pred.peak_phase, "peak_op": meas["peak_op"]})
    cells = " ".join(f"{pct(getattr(pred, 'all_gradients' if k == 'gradients' else k), meas[k])}" for k in PARTS)
    saved = meas["saved_activations"]
    print(f"{label:34} | {cells} | {saved / MiB:8.2f} {pct(pred.saved_activations, saved)}"
          f" | {meas['peak'] / MiB:8.2f} {pct(pred.total, meas['peak'])} | {pred.peak_phase} / {meas['peak_op']}",
          flush=True)


def header(title: str) -> None:
    print(f"\n{title}")
    print(f"{'set-up':34} | {'frozen':>7} {'train':>7} {'grads':>7} {'states':>7} | {'saved MiB':>8} {'err':>8} | "
          f"{'peak MiB':>8} {'err':>8} | peak at (predicted / measured op)")


def cpu_small() -> None:
    header("2. CPU, small random Llama (h256 i704 L3, 4/2 heads, V2048), LoRA r=8; errors are predicted / measured - 1")
    config = small_config()
    for method, ckpt, prepare in [("qlora", True, True), ("qlora", False, True), ("qlora", True, False),
                                  ("lora", True, False), ("lora", False, False), ("full", True, False),
                                  ("full", False, False)]:
        wd = torch.float32 if method == "full" else torch.bfloat16  # full: float32, so torch AdamW has fp32 states
        model, trainable = build_training_model(config, method, lora_r=8, gradient_checkpointing=ckpt,
                                                prepare_kbit=prepare, weight_dtype=wd)
        optimizer = make_optimizer(trainable, "adamw", fused=True)
        for b, s in [(2, 64), (4, 128)]:
            meas = measure_training_step(model, optimizer, random_batch(config, b, s), steps=2)
            pred = training_memory(config, method, batch_size=b, seq_len=s, lora_r=8, gradient_checkpointing=ckpt,
                                   device="cpu", weight_dtype=wd,
                                   **({"prepare_kbit": prepare} if method != "full" else {}))
            report(f"{method} ckpt={ckpt!s:5} prep={prepare!s:5} {b}x{s}", pred, meas, "cpu_small")


def _course_setup(method: str, ckpt: bool) -> dict[str, list]:
    """One course-model set-up, measured in a child process (its memory goes back when it exits)."""
    config = llama_config("course")
    model, trainable = course_training_model(method, gradient_checkpointing=ckpt)
    optimizer = make_optimizer(trainable, "adamw", fused=True)
    meas = measure_training_step(model, optimizer, random_batch(config, 2, 32), steps=2)
    pred = training_memory(config, method, batch_size=2, seq_len=32, lora_r=16, gradient_checkpointing=ckpt,
                           device="cpu", weight_dtype=torch.float32)
    report(f"{method} ckpt={ckpt!s:5} 2x32", pred, meas, "cpu_course")
    for b, n in [(1, 16), (2, 64), (4, 128), (1, 512)]:  # what autograd saves, several batch x seq
        saved = saved_activation_bytes(model, random_batch(config, b, n))
        pred = training_memory(config, method, batch_size=b, seq_len=n, lora_r=16, gradient_checkpointing=ckpt,
                               device="cpu", weight_dtype=torch.float32)
        TABLES["course_activations"].append({"method": method, "ckpt": ckpt, "batch": b, "seq": n,
                                             "saved_bytes": saved, "predicted_saved_bytes": pred.saved_activations})
        print(f"  saved for backward, {b} x {n:<4}: measured {saved / MiB:8.2f} MiB, "
              f"predicted {pred.saved_activations / MiB:8.2f} MiB ({pct(pred.saved_activations, saved)})", flush=True)
    return {k: TABLES[k] for k in ("cpu_course", "course_activations")}


def cpu_course() -> None:
    header("3. CPU, the course model (SmolLM2-135M, float32 weights, NF4 for QLoRA), LoRA r=16")
    # each set-up in a forked child: the profiler and peft's reference cycles otherwise keep gigabytes alive
    # from one set-up to the next (a 24 GiB machine ran out of memory)
    fork = multiprocessing.get_context("fork")
    for method in ("qlora", "lora", "full"):
        for ckpt in (True, False):
            print(end="", flush=True)  # nothing buffered for the child to print again
            with ProcessPoolExecutor(max_workers=1, mp_context=fork) as pool:
                rows = pool.submit(_course_setup, method, ckpt).result()
            for key, table in rows.items():
                TABLES[key] = table  # the child's copy: the parent's rows so far plus its own


def cuda_small() -> None:
    header("4. CUDA, random Llama (h1024 i2816 L4, V32000), LoRA r=16, PagedAdamW32bit; peak = max_memory_allocated")
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda")  # cuBLAS workspace out of the way
    for method, ckpt in [("qlora", True), ("qlora", False), ("lora", True)]:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        model, trainable = build_training_model(config, method, device="cuda", lora_r=16, gradient_checkpointing=ckpt)
        optimizer = make_optimizer(trainable, "paged_adamw")
        meas = measure_training_step(model, optimizer, random_batch(config, 2, 512, device="cuda"),
                                     baseline_bytes=base)
        pred = training_memory(config, method, batch_size=2, seq_len=512, lora_r=16, gradient_checkpointing=ckpt,
                               optimizer="paged_adamw")
        report(f"{method} ckpt={ckpt!s:5} 2x512 (total)", pred, {**meas, "peak": meas["total"]}, "cuda_small")
        del model, trainable, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--course", action="store_true", help="also measure the course model (minutes)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU measurements")
    parser.add_argument("--write", action="store_true", help=f"write the tables to {RESULTS.name}")
    args = parser.parse_args()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    gpu_rows()
    if not args.no_cpu:
        cpu_small()
        if args.course:
            cpu_course()
    if torch.cuda.is_available():
        cuda_small()
    seconds = time.perf_counter() - start
    print(f"\n({seconds:.0f} s; torch {torch.__version__})")
    if args.write:
        import bitsandbytes
        import peft
        import transformers

        meta = {"command": "python benchmarks/memory_validation.py" + (" --course" if args.course else "")
                + (" --no-cpu" if args.no_cpu else "") + " --write",
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "seconds": round(seconds),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}}
        RESULTS.write_text(json.dumps({"meta": meta, **TABLES}, indent=1) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
