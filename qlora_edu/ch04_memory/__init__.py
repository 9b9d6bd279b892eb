"""Chapter 4: Where the memory goes: the memory formula, validated.

The package holds the memory formula of a training step and the probes that measure it; ``CHAPTER`` declares the
chapter's facts (see :mod:`qlora_edu.common.chapters`).
"""

from qlora_edu.common.chapters import Chapter

CHAPTER = Chapter(
    number=4,
    name='memory',
    title='Where the memory goes: the memory formula, validated',
    builds='the memory formula of a training step',
    checked_against='memory measured on CPU and on an H100',
    cpu_path='CPU: memory measured by a dispatch probe',
    gpu_path="GPU: torch.cuda's allocator peaks",
    cpu_minutes=0.25,
    workshop_minutes=35,
    exercise=True,
    gpu_tests=True,
    benchmarks=('benchmarks/memory_validation.py',),
    workshop_note='predicted against measured memory',
)
