"""Chapter 0: A tour of the course: the environment, the course map, are weights normal?.

The package holds the environment, the course map, the base model's weights; ``CHAPTER`` declares the chapter's facts
(see :mod:`qlora_edu.common.chapters`).
"""

from qlora_edu.common.chapters import SAME_AS_CPU, Chapter

CHAPTER = Chapter(
    number=0,
    name='tour',
    title='A tour of the course: the environment, the course map, are weights normal?',
    builds='— (environment, a first look at real weights)',
    checked_against='',
    cpu_path='CPU, float32',
    gpu_path=SAME_AS_CPU,
    cpu_minutes=0.15,  # with the converted model cached; the first run converts it (about a minute more)
    workshop_minutes=15,
    exercise=False,
    gpu_tests=False,
    benchmarks=(),
    tests=False,
)
