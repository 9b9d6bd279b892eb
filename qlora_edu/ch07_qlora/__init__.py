"""Chapter 7: QLoRA from scratch.

The package holds the 4-bit linear layer with adapters and its backward; ``CHAPTER`` declares the chapter's facts (see
:mod:`qlora_edu.common.chapters`).
"""

from qlora_edu.common.chapters import Chapter

CHAPTER = Chapter(
    number=7,
    name='qlora',
    title='QLoRA from scratch',
    builds='a 4-bit linear layer with adapters, its own backward',
    checked_against='bitsandbytes `Linear4bit` + peft',
    cpu_path='CPU QLoRA training steps, bf16 compute',
    gpu_path='GPU, bf16 (fp16 on T4/V100)',
    cpu_minutes=4.0,
    workshop_minutes=40,
    exercise=True,
    gpu_tests=True,
    benchmarks=('benchmarks/bench_qlora.py',),
)
