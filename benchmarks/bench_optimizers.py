"""Step time and state bytes of qlora_edu's AdamW / AdamW8bit next to torch's and bitsandbytes' on the CPU.

    .venv/bin/python benchmarks/bench_optimizers.py [--layers 30] [--rank 16] [--repeats 7]

The parameters are the LoRA adapters of the course model (SmolLM2-135M: hidden 576, 3 KV heads of 64,
MLP 1536) at rank ``--rank`` on all seven projections of ``--layers`` layers (30 layers at r = 16:
4.88 M parameters, as in the chapter's training run). Pairs, timed interleaved after a warm-up
(``qlora_edu.common.benchmarking.compare_timings``):

* ``qlora_edu.ch05_optimizers.optim.AdamW`` vs ``torch.optim.AdamW(foreach=False)`` (ratio = ours / torch);
* ``qlora_edu.ch05_optimizers.optim.AdamW8bit`` vs ``bitsandbytes.optim.AdamW8bit`` (ratio = ours / bitsandbytes).

Before timing, one step of each pair is checked to give the same parameters (bit for bit for 8-bit,
within 1e-6 for AdamW); then the state bytes of all four are printed from their real tensors
(``qlora_edu.ch05_optimizers.optim.state_bytes``). No targets: this reports, it does not gate.
"""

from __future__ import annotations

import argparse
import logging

import torch

from qlora_edu.ch05_optimizers.optim import AdamW, AdamW8bit, first_difference, state_bytes, state_bytes_per_param
from qlora_edu.common.benchmarking import compare_timings


def lora_shapes(layers: int, rank: int, hidden: int = 576, kv: int = 192, mlp: int = 1536) -> list[tuple[int, int]]:
    """(out, in) of every LoRA A (r x in) and B (out x r) on q, k, v, o, gate, up, down of each layer."""
    projections = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden),
                   (hidden, mlp)]
    return [shape for _ in range(layers) for out, inp in projections for shape in ((rank, inp), (out, rank))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=30, help="layers with adapters (default 30)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps of each optimizer (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    args = parser.parse_args(argv)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # the optional `kernels` package: irrelevant
    import bitsandbytes as bnb

    shapes = lora_shapes(args.layers, args.rank)
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    n = sum(t.numel() for t in init)
    print(f"{len(shapes)} LoRA tensors, {n / 1e6:.2f} M parameters (float32), {torch.get_num_threads()} threads")

    def make(cls, **kw):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone()
        return cls(params, lr=1e-3, **kw), params

    (ours, p_ours), (torch_opt, p_torch) = make(AdamW), make(torch.optim.AdamW, foreach=False)
    (ours8, p_ours8), (bnb8, p_bnb8) = make(AdamW8bit), make(bnb.optim.AdamW8bit)
    for opt in (ours, torch_opt, ours8, bnb8):
        opt.step()
    assert all(first_difference(a, b, atol=1e-6) is None for a, b in zip(p_ours, p_torch, strict=True))
    assert all(first_difference(a, b) is None for a, b in zip(p_ours8, p_bnb8, strict=True)), "8-bit differs"

    compare_timings({"AdamW step": (ours.step, torch_opt.step)}, repeats=args.repeats, warmup=args.warmup,
                    reference="torch")
    compare_timings({"AdamW8bit step": (ours8.step, bnb8.step)}, repeats=args.repeats, warmup=args.warmup)

    print("\nstate bytes (real tensors)        bytes/param   formula")
    for name, opt, formula in (("qlora_edu AdamW", ours, "adamw"), ("torch AdamW", torch_opt, "adamw"),
                               ("qlora_edu AdamW8bit", ours8, "adamw8bit"),
                               ("bitsandbytes AdamW8bit", bnb8, "adamw8bit")):
        expected = sum(state_bytes_per_param(formula, t.numel()) * t.numel() for t in init) / n
        print(f"{name:<24} {state_bytes(opt):>12,}  {state_bytes(opt) / n:>8.4f}  {expected:>8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
