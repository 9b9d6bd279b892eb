"""Chapter 5: Optimizers and paging.

The package holds AdamW and 8-bit AdamW from scratch, the paging simulator; ``CHAPTER`` declares the chapter's facts
(see :mod:`qlora_edu.common.chapters`).
"""

from qlora_edu.common.chapters import Chapter

CHAPTER = Chapter(
    number=5,
    name='optimizers',
    title='Optimizers and paging',
    builds='AdamW, 8-bit AdamW; paging',
    checked_against='`torch.optim.AdamW`, `bitsandbytes.optim.AdamW8bit`, bit for bit',
    cpu_path='CPU: paging simulated',
    gpu_path='GPU: paging shown with a capped memory pool',
    cpu_minutes=10.0,
    workshop_minutes=45,
    exercise=True,
    gpu_tests=True,
    benchmarks=('benchmarks/bench_optimizers.py',),
    workshop_note='paging needs a GPU: on a CPU bitsandbytes runs the paged optimizers unpaged',
)
