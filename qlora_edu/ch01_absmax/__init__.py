"""Chapter 1: Absmax block quantization.

The package holds absmax block quantization to signed integers; ``CHAPTER`` declares the chapter's facts (see
:mod:`qlora_edu.common.chapters`).
"""

from qlora_edu.common.chapters import SAME_AS_CPU, Chapter

CHAPTER = Chapter(
    number=1,
    name='absmax',
    title='Absmax block quantization',
    builds='`absmax_quantize`, `absmax_dequantize`',
    checked_against="a float64 reference, the seed notes' worked example",
    cpu_path='CPU, float32',
    gpu_path=SAME_AS_CPU,
    cpu_minutes=0.3,
    workshop_minutes=35,
    exercise=True,
    gpu_tests=True,
    benchmarks=(),
)
