"""Chapter 6: LoRA.

The package holds the LoRA layer, merging, parameter counts; ``CHAPTER`` declares the chapter's facts (see
:mod:`qlora_edu.common.chapters`).
"""

from qlora_edu.common.chapters import Chapter

CHAPTER = Chapter(
    number=6,
    name='lora',
    title='LoRA',
    builds='a LoRA layer',
    checked_against='peft',
    cpu_path='CPU, float32',
    gpu_path='GPU, bf16',
    cpu_minutes=16.0,
    workshop_minutes=40,
    exercise=True,
    gpu_tests=False,
    benchmarks=(),
    workshop_note='checked against peft',
)
