"""Chapter 9: Labs: the seed notes' experiments, measured.

The package holds the seed notes' experiments, run by the lab runners, read from their results files; ``CHAPTER``
declares the chapter's facts (see :mod:`qlora_edu.common.chapters`).

One file a lab, each read top to bottom (its ``QUESTION``, its ``FULL`` and ``SMOKE`` budgets, its ``run``):
``lab1_methods`` (QLoRA vs LoRA vs full fine-tuning), ``lab2_rank``, ``lab3_targets``, ``lab4_quant`` (NF4 vs FP4
vs Int4 vs bf16 bases), ``lab5_hotswap``, ``lab6_merge_export``, ``lab7_dynamics``, ``lab8_activations``,
``lab9_sweeps``, ``lab10_seeds`` (labs 1-2 over seeds, on chapter 8's held-out templates too). Each also has
``verdicts(results)``: the sentences the notebook prints, computed from its results file. What they share:
:mod:`.common` (the budget, the context, the results file with its header, running a lab by name:
:func:`~.common.run_lab`, reading a file back: :func:`~.common.read_results`) and :mod:`.trials` (one
fine-tune as a trial, run once however many labs ask for it: labs 1, 2, 3, 7, 9 and 10). The command line::

    python -m qlora_edu.ch09_labs lab1 [--smoke] [--out DIR]     # or all; --help lists the options

writes ``notebooks/results/lab1_methods.json``, which ``notebooks/09_labs.ipynb`` reads.
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
    cpu_minutes=0.1,
    workshop_minutes=0,
    exercise=False,
    gpu_tests=False,
    benchmarks=(),
    workshop_note="the notebook reads the labs' results files; the lab runners re-measure them",
)
