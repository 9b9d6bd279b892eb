"""Chapter 8: The full QLoRA fine-tune: recipe, data, before/after.

The package holds the fine-tune: data, recipe, training loop, before/after; ``CHAPTER`` declares the chapter's facts
(see :mod:`qlora_edu.common.chapters`).
"""

from qlora_edu.common.chapters import Chapter

CHAPTER = Chapter(
    number=8,
    name='finetune',
    title='The full QLoRA fine-tune: recipe, data, before/after',
    builds='a QLoRA fine-tune of a real pretrained model',
    checked_against='transformers + peft + bitsandbytes',
    cpu_path='CPU: 60 steps of 8 orders',
    gpu_path="GPU: the paper's values, 500 steps of 16",
    cpu_minutes=15.0,
    workshop_minutes=40,
    exercise=True,
    gpu_tests=True,
    benchmarks=(),
    workshop_note='start Run All, explain while it runs (on slow laptops, start it at lunch)',
)
