"""Chapter 11: When one GPU is not enough: sharded QLoRA on PyTorch FSDP, modelled and measured.

The package holds the per-GPU memory model of a sharded QLoRA step (:mod:`qlora_edu.ch11_fsdp.sharding`, used by
chapter 4's ``training_memory(..., world_size=N, sharding="fsdp")``) and a real sharded run on FSDP2 with
bitsandbytes + peft and with the course's own layer (:mod:`qlora_edu.ch11_fsdp.fsdp_run`); ``CHAPTER`` declares
the chapter's facts (see :mod:`qlora_edu.common.chapters`).
"""

from qlora_edu.common.chapters import Chapter

CHAPTER = Chapter(
    number=11,
    name='fsdp',
    title='When one GPU is not enough: sharded QLoRA on FSDP',
    builds='the per-GPU memory formula of a sharded step',
    checked_against='per-rank bytes of a real 2-process FSDP2 run (bitsandbytes + peft)',
    cpu_path='CPU: 2 processes, gloo, a tiny random Llama',
    gpu_path='GPU: torchrun, one process a GPU (nccl); not run by the course yet',
    cpu_minutes=0.7,
    workshop_minutes=0,
    exercise=True,
    gpu_tests=False,
    benchmarks=(),
)
