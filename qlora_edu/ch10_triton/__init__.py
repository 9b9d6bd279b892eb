"""Chapter 10: Your own GPU kernel.

The package holds the fused NF4 dequantization kernel in Triton (``nf4_triton``), the memory-bound arithmetic that
says how fast it can be (``roofline``); ``CHAPTER`` declares the chapter's facts (see
:mod:`qlora_edu.common.chapters`).
"""

from qlora_edu.common.chapters import Chapter

CHAPTER = Chapter(
    number=10,
    name='triton',
    title='Your own GPU kernel: NF4 dequantization in Triton',
    builds='`nf4_dequantize_kernel`, a fused Triton kernel',
    checked_against='`dequantize_nf4` and bitsandbytes, bit for bit',
    cpu_path="CPU: the kernel in Triton's interpreter, small shapes",
    gpu_path='CUDA: the kernel compiled, timed against bitsandbytes (`benchmarks/bench_triton_nf4.py`)',
    cpu_minutes=0.5,
    workshop_minutes=0,  # take-home: the kernel is a GPU chapter (on a CPU it runs in the interpreter)
    exercise=True,
    gpu_tests=True,
    benchmarks=('benchmarks/bench_triton_nf4.py', ),
)
