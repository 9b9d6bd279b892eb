"""One QLoRA training step, ours (qlora_edu.ch07_qlora.qlora.apply_qlora) next to peft + bitsandbytes, in one process.

    .venv/bin/python benchmarks/bench_qlora.py [--repeats 7] [--batch 8] [--seq 32] [--profile] [--strict]
    .venv/bin/python benchmarks/bench_qlora.py --gpu        # Llama-7B shape, needs a CUDA GPU

**CPU (default): the course model** (SmolLM2-135M-Instruct), both sides doing the same work, both set up by the
course's one model set-up (``qlora_edu.common.training_setup.load_for_training``, float32 weights, r=16, alpha=32,
dropout 0 on the seven projections, reentrant checkpointing):

* ours, ``"qlora_scratch"``: ``load_base_model()`` (float32), then ``apply_qlora(model, LLAMA_TARGETS, r=16,
  alpha=32, dropout=0, blocksize=64, double_quant=True, compute_dtype=torch.bfloat16)``, then
  ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})`` and
  ``model.enable_input_require_grads()``;
* peft + bitsandbytes, ``"qlora"``: ``load_base_model(quantization_config=bnb_config(torch.bfloat16))`` (NF4,
  double quantization), then ``prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant":
  True})`` (freezes everything, upcasts 16-bit dense parameters to float32 (here all are float32 already), calls
  ``enable_input_require_grads`` and turns checkpointing on), then ``get_peft_model(model, lora_config(16, 32, 0))``.

Either way: the 7 projections of the 30 layers in NF4 with double quantization (the same bytes), bf16 matmuls,
float32 adapters (peft's default), embeddings / norms / lm_head float32 and frozen, checkpointing on.

Step: one step of chapter 5's ``training_losses`` (``zero_grad(); loss = model(input_ids=t, labels=t).loss;
loss.backward(); AdamW(lr=2e-4).step()``) on a fixed batch of random token ids (``--batch`` x ``--seq``, default
8 x 32), train mode. Before timing, both sides' first losses are printed: they start from the same NF4 bytes
with B = 0, so they must be equal.

Reported: median step time of each over ``--repeats`` interleaved steps (ours, theirs, ours, ...) after 2 warm-up
steps each, and the ratio ours / theirs (target <= 1.5), also as process CPU time (steadier when other processes
share the cores); then the peak bytes autograd holds for backward during one
step (:class:`qlora_edu.ch07_qlora.tools.SavedTensorLog`, parameters excluded; target: ours no higher). Checkpointing is
reentrant on both sides because the non-reentrant kind hides the recomputed layer's saved tensors from hooks.
Then how much of our step is 4-bit dequantization (every ``dequantize_nf4`` call timed), and with ``--profile``
the top operators of one step of each side (``torch.profiler``).

**GPU (``--gpu``): a random-weight Llama-7B shape** (hidden 4096, MLP 11008, 32 layers, vocab 32000) in bf16,
r=64, alpha=16, dropout 0.05 on all seven projections (the settings of the GPU facts file), batch 1 x 512,
checkpointing on, ``torch.optim.AdamW``. Each side is built alone on the GPU (the other is freed first) by
``setup_training``: ours (``"qlora_scratch"``) = ``apply_qlora`` + the same upcast of the non-4-bit parameters to
float32 that ``prepare_model_for_kbit_training`` does; theirs (``"qlora"``) = ``apply_bnb_4bit`` (bitsandbytes
``Linear4bit`` from the same weights, ``is_loaded_in_4bit = True``) + ``prepare_model_for_kbit_training`` +
``get_peft_model``. Reported: median step time (target: ours <= 1.2x) and
``torch.cuda.max_memory_allocated`` over the steps (target: ours no higher).

``--strict`` exits 1 when a target is missed; without it the script only reports.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from qlora_edu.ch05_optimizers.optim import training_losses
from qlora_edu.ch06_lora.lora import LLAMA_TARGETS, count_parameters
from qlora_edu.ch07_qlora import qlora
from qlora_edu.ch07_qlora.tools import SavedTensorLog
from qlora_edu.common.training_setup import load_for_training, setup_training

CPU_TARGETS = {"time_ratio": 1.5}
GPU_TARGETS = {"time_ratio": 1.2}
MiB = 2**20


def _quiet() -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # the optional `kernels` package warning
    # transformers 5.2x renamed gradient checkpointing to activation checkpointing; peft (and this script, to run
    # on every 5.x) call the old names, which warn
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*")


def make_step(model: nn.Module, params: list[torch.Tensor], tokens: torch.Tensor) -> Callable[[], float]:
    """One training step as a closure returning its loss: chapter 5's loop, one step at a time."""
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    return lambda: training_losses(model, tokens[None], optimizer, 1, progress=False)[0]


def interleaved_wall_and_cpu(ours: Callable[[], object], theirs: Callable[[], object], repeats: int,
                             warmup: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """``((wall, cpu) of ours, (wall, cpu) of theirs)``: median seconds over ``repeats`` interleaved runs after
    ``warmup`` each. CPU time is ``time.process_time`` (all threads of this process)."""
    for _ in range(warmup):
        ours()
        theirs()
    times: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    for _ in range(repeats):
        for side, fn in enumerate((ours, theirs)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[side].append((time.perf_counter() - wall, time.process_time() - cpu))
    return tuple((statistics.median(w for w, _ in times[side]), statistics.median(c for _, c in times[side]))
                 for side in (0, 1))


def saved_peak_bytes(model: nn.Module, step: Callable[[], float]) -> int:
    with SavedTensorLog(exclude=model) as log:
        step()
    return log.peak_bytes


def dequantize_time(step: Callable[[], float]) -> tuple[int, float, float]:
    """(calls, seconds in dequantize_nf4, seconds of the whole step) for one of our steps."""
    original, spent = qlora.dequantize_nf4, []

    def timed(t):
        start = time.perf_counter()
        out = original(t)
        spent.append(time.perf_counter() - start)
        return out

    qlora.dequantize_nf4 = timed
    try:
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start
    finally:
        qlora.dequantize_nf4 = original
    return len(spent), sum(spent), total


def profile(step: Callable[[], float], label: str, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n-- top operators by self CPU time, one step, {label}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ----------------------------------------------------------------------------------------------
# CPU: the course model


def build_cpu(side: str, r: int, alpha: float):
    model, _ = load_for_training("qlora_scratch" if side == "ours" else "qlora", dtype=torch.float32,
                                 compute_dtype=torch.bfloat16, progress=False, r=r, alpha=alpha, dropout=0.0)
    return model, [p for p in model.parameters() if p.requires_grad]


def bench_cpu(args) -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; course model, r={args.rank} on "
          f"{len(LLAMA_TARGETS)} projections, batch {args.batch} x {args.seq}, bf16 compute, checkpointing on")
    ours, ours_params = build_cpu("ours", args.rank, 2 * args.rank)
    theirs, theirs_params = build_cpu("theirs", args.rank, 2 * args.rank)
    print(f"trainable parameters: ours {count_parameters(ours)[0]:,}, "
          f"peft {theirs.get_nb_trainable_parameters()[0]:,}")
    tokens = torch.randint(ours.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    step_ours = make_step(ours, ours_params, tokens)
    step_theirs = make_step(theirs, theirs_params, tokens)
    first = step_ours(), step_theirs()
    print(f"first-step loss: ours {first[0]:.6f}, peft + bitsandbytes {first[1]:.6f} (same NF4 bytes, B = 0)")

    (t_ours, c_ours), (t_theirs, c_theirs) = interleaved_wall_and_cpu(step_ours, step_theirs, args.repeats, 2)
    ratio = t_ours / t_theirs
    print(f"\nmedian step time over {args.repeats} interleaved steps: ours {t_ours * 1e3:.0f} ms, "
          f"peft + bitsandbytes {t_theirs * 1e3:.0f} ms, ratio {ratio:.2f} (target <= {CPU_TARGETS['time_ratio']})")
    print(f"median CPU time of a step (all threads of this process): ours {c_ours * 1e3:.0f} ms, "
          f"peft + bitsandbytes {c_theirs * 1e3:.0f} ms, ratio {c_ours / c_theirs:.2f} (less sensitive to other "
          "processes on a shared machine)")

    mem_ours, mem_theirs = saved_peak_bytes(ours, step_ours), saved_peak_bytes(theirs, step_theirs)
    print(f"peak bytes held for backward (saved tensors, one step): ours {mem_ours / MiB:.2f} MiB, "
          f"peft + bitsandbytes {mem_theirs / MiB:.2f} MiB (target: ours no higher)")

    calls, spent, total = dequantize_time(step_ours)
    print(f"our step: {calls} dequantize_nf4 calls, {spent * 1e3:.0f} ms of {total * 1e3:.0f} ms "
          f"({100 * spent / total:.0f}%)")
    if args.profile:
        profile(step_ours, "ours")
        profile(step_theirs, "peft + bitsandbytes")
    missed = ratio > CPU_TARGETS["time_ratio"] or mem_ours > mem_theirs
    return 1 if args.strict and missed else 0


# ----------------------------------------------------------------------------------------------
# GPU: a Llama-7B shape


def llama7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def build_gpu(side: str, r: int, alpha: float, dropout: float, config=None, device: str = "cuda"):
    """One side of the GPU run: a random-weight bf16 Llama (``config``, default the 7B shape) on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config or llama7b_config(), dtype=torch.bfloat16)
    model = setup_training(model, "qlora_scratch" if side == "ours" else "qlora", r=r, alpha=alpha, dropout=dropout,
                           compute_dtype=torch.bfloat16)
    return model, [p for p in model.parameters() if p.requires_grad]


def run_gpu_side(side: str, args) -> tuple[float, int]:
    """(median step seconds, peak bytes allocated over the steps) of one side, built alone on the GPU."""
    model, params = build_gpu(side, args.gpu_rank, 16, 0.05)
    tokens = torch.randint(32000, (1, args.gpu_seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    step = make_step(model, params, tokens)
    step()  # warm-up (allocator, kernels); the optimizer states exist from here on
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated()
    del model, params, step
    gc.collect()
    torch.cuda.empty_cache()
    return statistics.median(times), peak


def bench_gpu(args) -> tuple[float, float, int, int]:
    """Returns (ours s, theirs s, ours peak bytes, theirs peak bytes) and prints them."""
    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device: torch.cuda.is_available() is False")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; Llama-7B shape, r={args.gpu_rank}, batch 1 x "
          f"{args.gpu_seq}, bf16 compute, checkpointing on")
    t_ours, m_ours = run_gpu_side("ours", args)
    t_theirs, m_theirs = run_gpu_side("theirs", args)
    print(f"median step: ours {t_ours * 1e3:.0f} ms, peft + bitsandbytes {t_theirs * 1e3:.0f} ms, ratio "
          f"{t_ours / t_theirs:.2f} (target <= {GPU_TARGETS['time_ratio']})")
    print(f"peak allocated: ours {m_ours / MiB:,.0f} MiB, peft + bitsandbytes {m_theirs / MiB:,.0f} MiB "
          "(target: ours no higher)")
    return t_ours, t_theirs, m_ours, m_theirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps of each side (default 7)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch on the CPU (default 8)")
    parser.add_argument("--seq", type=int, default=32, help="tokens per sequence on the CPU (default 32)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank on the CPU (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one step of each side")
    parser.add_argument("--gpu", action="store_true", help="the Llama-7B-shaped run on a CUDA GPU instead")
    parser.add_argument("--gpu-rank", type=int, default=64, help="LoRA rank of the GPU run (default 64)")
    parser.add_argument("--gpu-seq", type=int, default=512, help="tokens of the GPU run's one sequence (default 512)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    _quiet()
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # this script's process only: a knob for shared machines
    if args.gpu:
        t_ours, t_theirs, m_ours, m_theirs = bench_gpu(args)
        missed = t_ours / t_theirs > GPU_TARGETS["time_ratio"] or m_ours > m_theirs
        return 1 if args.strict and missed else 0
    return bench_cpu(args)


if __name__ == "__main__":
    sys.exit(main())
