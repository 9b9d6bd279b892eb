"""Chapter 2: The NF4 lookup table.

The package holds the NF4, FP4 and Int4 code tables, packing, blockwise 4-bit quantization; ``CHAPTER`` declares the
chapter's facts (see :mod:`qlora_edu.common.chapters`).
"""

from qlora_edu.common.chapters import SAME_AS_CPU, Chapter

CHAPTER = Chapter(
    number=2,
    name='nf4',
    title='The NF4 lookup table',
    builds='`nf4_code`, `quantize_4bit`, `dequantize_4bit`, packing',
    checked_against='bitsandbytes, byte for byte',
    cpu_path='CPU: the perplexity of 5 weight formats',
    gpu_path=SAME_AS_CPU,
    cpu_minutes=3.5,
    workshop_minutes=50,
    exercise=True,
    gpu_tests=True,
    benchmarks=('benchmarks/bench_nf4.py',),
    workshop_note='start Run All first: the perplexity section is the longest run of the morning',
)
