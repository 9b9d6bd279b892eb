"""Chapter 9: Labs: the seed notes' experiments, measured.

The package holds the seed notes' experiments, run by the lab runners, read from their results files; ``CHAPTER``
declares the chapter's facts (see :mod:`qlora_edu.common.chapters`).
"""

from qlora_edu.common.chapters import SAME_AS_CPU, Chapter

CHAPTER = Chapter(
    number=9,
    name='labs',
    title="Labs: the seed notes' experiments, measured",
    builds="the seed notes' experiments, measured",
    checked_against="the seed notes' figures, the QLoRA paper",
    cpu_path="CPU: reads the labs' results files",
    gpu_path=SAME_AS_CPU,
    cpu_minutes=1.0,
    workshop_minutes=0,
    exercise=False,
    gpu_tests=False,
    benchmarks=(),
)
