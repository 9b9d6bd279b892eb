"""Chapter 3: Double quantization.

The package holds quantizing the constants, a weight as QLoRA stores it, bits per parameter; ``CHAPTER`` declares the
chapter's facts (see :mod:`qlora_edu.common.chapters`).
"""

from qlora_edu.common.chapters import SAME_AS_CPU, Chapter

CHAPTER = Chapter(
    number=3,
    name='double_quant',
    title='Double quantization',
    builds='`dynamic_map`, `double_quantize`',
    checked_against='bitsandbytes, byte for byte',
    cpu_path='CPU, float32',
    gpu_path=SAME_AS_CPU,
    cpu_minutes=0.6,
    workshop_minutes=40,
    exercise=True,
    gpu_tests=True,
    benchmarks=('benchmarks/bench_nf4.py',),
)
