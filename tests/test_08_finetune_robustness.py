"""Chapter 8's fine-tune under bad inputs, kills and faults (issue 20, items 1-6 and 10; issue 18, items 3 and 5).

Everything runs on the tiny random Llama of ``conftest.py`` (two layers, the course model's tokenizer), a few steps
of batch 2. Kills are real (``SIGKILL`` to a subprocess); a full disk is a writer that raises ``ENOSPC`` or torch's
own message on a file system reported full (mounting a small tmpfs needs privileges CI does not have).
"""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from qlora_edu.ch08_finetune import finetune
from qlora_edu.ch08_finetune.finetune import (
    CheckpointError,
    FinetuneConfig,
    FinetuneError,
    TrainingDiverged,
    atomic_directory,
    build_optimizer,
    check_output_dir,
    clean_leftovers,
    load_checkpoint,
    load_qlora_model,
    main,
    output_lock,
    read_trainer_state,
    run_finetune,
    save_checkpoint,
    train,
)
from qlora_edu.ch08_finetune.instruct_data import collate_examples, load_dataset

TINY = FinetuneConfig(steps=3, batch_size=2, lora_r=4, lora_alpha=8.0, learning_rate=1e-2, save_every=1,
                      max_new_tokens=4)
#: run_finetune's keywords for the tiny model: 2 held-out examples, 4 generated tokens, a few steps.
RUN = {"device": "cpu", "smoke": True, "progress": False, "steps": 2, "batch_size": 2, "eval_size": 2,
       "max_new_tokens": 4, "lora_r": 4}


@pytest.fixture(scope="module")
def cpu_compute():
    from qlora_edu.common.device import pick_compute

    return pick_compute("cpu")


@pytest.fixture(scope="module")
def few_examples():
    return load_dataset("train")[:40]


def _no_nan(text: str) -> dict:
    """json.loads that refuses NaN and Infinity (Python's accepts them; JSON has neither)."""
    def refuse(name):
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _adapter_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------------------------
# 1. A diverged run stops, non-zero, keeping the last good checkpoint and adapter


def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(tiny_model_dir, cpu_compute, few_examples,
                                                                       tmp_path):
    config = replace(TINY, steps=4, learning_rate=1e10, warmup_ratio=0.0, save_every=1)
    model, tok = load_qlora_model(tiny_model_dir, config=config, compute=cpu_compute, progress=False)
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: loss .*(nan|inf)") as caught:
        train(model, tok, few_examples, config, output_dir=tmp_path, sync_every=4, progress=False)
    state = read_trainer_state(tmp_path / "checkpoint")
    assert f"step {state['step']}) is kept" in str(caught.value)
    assert 1 <= state["step"] < 4
    assert all(math.isfinite(x) for x in state["history"]["losses"] + state["history"]["grad_norms"])
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint" / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())


def test_cli_divergence_exits_non_zero_and_keeps_the_previous_adapter(tiny_model_dir, tmp_path, capsys):
    """The issue's case: a good run, then ``--resume`` for one more step on a base whose cache went bad (a NaN
    weight): exit 1, one error line, no JSON, and the good run's checkpoint and adapter still there, byte for
    byte."""
    import shutil

    from transformers import LlamaForCausalLM

    run_finetune(model=str(tiny_model_dir), output_dir=tmp_path / "out", log=lambda line: None, **RUN)
    adapter, checkpoint = _adapter_files(tmp_path / "out" / "adapter"), _adapter_files(tmp_path / "out" / "checkpoint")
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(broken)
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        main(["--model", str(broken), "--device", "cpu", "--smoke", "--steps", "3", "--batch-size", "2",
              "--eval-size", "2", "--lora-r", "4", "--resume", "--output-dir", str(tmp_path / "out"), "--no-progress"])
    out = capsys.readouterr()
    assert caught.value.code == 1, out.err[-2000:]
    last = out.err.strip().splitlines()[-1]
    assert "training diverged at step 3: loss nan" in last and "step 2) is kept" in last, out.err[-2000:]
    assert "Traceback" not in out.err and not out.out.strip().splitlines()[-1].startswith("{")
    assert _adapter_files(tmp_path / "out" / "adapter") == adapter
    assert _adapter_files(tmp_path / "out" / "checkpoint") == checkpoint


# ----------------------------------------------------------------------------------------------
# 2. --output-dir: nothing foreign replaced, no previous run overwritten unless asked


def test_output_dir_with_foreign_files_is_refused_before_loading(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "notes.txt").write_text("mine")
    lines = []
    with pytest.raises(FinetuneError, match=r"did not write \(adapter/notes.txt\).*another --output-dir"):
        run_finetune(model=str(tmp_path / "no-model-needed"), output_dir=tmp_path, log=lines.append, **RUN)
    assert lines == [] and (tmp_path / "adapter" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # not even a lock file was made
    (tmp_path / "results.csv").write_text("1,2")
    with pytest.raises(FinetuneError, match="results.csv"):
        check_output_dir(tmp_path, overwrite=True)  # --overwrite never deletes what is not the fine-tune's


def test_a_previous_run_is_kept_unless_overwrite(tiny_model_dir, tmp_path):
    lines = []
    first = run_finetune(model=str(tiny_model_dir), output_dir=tmp_path, log=lines.append, **RUN)
    adapter = _adapter_files(tmp_path / "adapter")
    with pytest.raises(FinetuneError, match=r"previous run's results \(adapter, checkpoint\); pass --resume .* "
                                            r"--overwrite"):
        run_finetune(model=str(tiny_model_dir), output_dir=tmp_path, log=lines.append, **RUN)
    assert _adapter_files(tmp_path / "adapter") == adapter
    again = run_finetune(model=str(tiny_model_dir), output_dir=tmp_path, overwrite=True, log=lines.append, **RUN)
    assert any(line.startswith("--overwrite: removed") for line in lines)
    assert again["loss_last"] == first["loss_last"] and again["resumed_from"] == 0  # a fresh run, same seed


# ----------------------------------------------------------------------------------------------
# 3. One run at a time on a folder; a killed run's lock does not block


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from qlora_edu.ch08_finetune.finetune import output_lock
with output_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_a_locked_folder_stops_and_a_killed_holder_does_not_block(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        lines = []
        with pytest.raises(FinetuneError, match=rf"in use by another fine-tune \(pid {holder.pid},"):
            run_finetune(model=str(tmp_path / "never-loaded"), output_dir=tmp_path, log=lines.append, **RUN)
        assert lines == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").read_text().strip() == str(holder.pid)  # the stale lock is still on disk
    with output_lock(tmp_path):  # and does not block: the kernel released the dead process's flock
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())


# ----------------------------------------------------------------------------------------------
# 4. Resuming: the settings are compared, a finished run says so, a corrupt file is named


def test_resume_compares_settings_and_a_finished_run_gives_valid_json(tiny_model_dir, tmp_path):
    lines = []
    first = run_finetune(model=str(tiny_model_dir), output_dir=tmp_path, resume=True, log=lines.append, **RUN)
    assert f"--resume: no checkpoint in {tmp_path}, so this run starts fresh" in lines
    _check_memory_fields(first, tmp_path)
    assert read_trainer_state(tmp_path / "checkpoint")["config"] == FinetuneConfig(
        **{**first["config"], "target_modules": tuple(first["config"]["target_modules"])}).to_dict()
    for change, named in (({"lora_r": 8}, r"lora_r \(--lora-r\): checkpoint 4, now 8"),
                          ({"learning_rate": 5e-3, "seed": 1}, r"learning_rate \(--lr\): .*; seed \(--seed\)"),
                          ({"steps": 1}, r"holds 2 steps done, more than steps \(--steps\) = 1")):
        lines.clear()
        with pytest.raises(CheckpointError, match=named):
            run_finetune(model=str(tiny_model_dir), output_dir=tmp_path, resume=True, log=lines.append,
                         **{**RUN, **change})
        assert not any(line.startswith("before:") for line in lines)  # refused before loading the model
    lines.clear()
    finished = run_finetune(model=str(tiny_model_dir), output_dir=tmp_path, resume=True, log=lines.append, **RUN)
    assert any("2 of 2 steps done; finished" in line for line in lines)
    assert any("already finished" in line for line in lines)
    text = json.dumps(finished, allow_nan=False)  # raises on NaN
    assert _no_nan(text)["tokens_per_s"] is None and finished["after"] == first["after"]
    more = run_finetune(model=str(tiny_model_dir), output_dir=tmp_path, resume=True, log=lines.append,
                        **{**RUN, "steps": 3})
    assert more["resumed_from"] == 2 and len(read_trainer_state(tmp_path / "checkpoint")["history"]["losses"]) == 3


@pytest.mark.parametrize(("name", "damage"), [("optimizer.pt", lambda b: b[:len(b) // 2]),
                                              ("trainer_state.json", lambda b: b[:20]),
                                              ("adapter_model.safetensors", lambda b: b[:100]),
                                              ("rng_state.pt", lambda b: b"")])
def test_a_corrupt_checkpoint_file_is_named(tiny_model_dir, cpu_compute, tmp_path, name, damage):
    model, _ = load_qlora_model(tiny_model_dir, config=TINY, compute=cpu_compute, progress=False)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], TINY)
    path = save_checkpoint(tmp_path / "checkpoint", model, opt, 1, {"losses": [1.0]}, config=TINY)
    (path / name).write_bytes(damage((path / name).read_bytes()))
    with pytest.raises(CheckpointError, match=rf"checkpoint file {path / name} is (truncated or corrupt|corrupt)"):
        load_checkpoint(path, model, opt)


# ----------------------------------------------------------------------------------------------
# 5. The folder is checked before training; a full disk is named


def test_an_unusable_output_dir_fails_before_anything_is_loaded(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad, why in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "cannot be created")):
        lines = []
        with pytest.raises(FinetuneError, match=why):
            run_finetune(model=str(tmp_path / "never-loaded"), output_dir=bad, log=lines.append, **RUN)
        assert lines == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only (0o500) folder anyway: the check "
                                              "cannot be shown as root; the 'is a file' and full-disk tests still run")
def test_a_read_only_output_dir_fails_before_anything_is_loaded(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(FinetuneError, match="cannot be created or written|not writable"):
            run_finetune(model=str(tmp_path / "never-loaded"), output_dir=folder, log=lambda line: None, **RUN)
    finally:
        folder.chmod(0o700)


def test_too_little_free_space_fails_before_training(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(finetune.shutil, "disk_usage", lambda path: real(path)._replace(free=10_000))
    lines = []
    with pytest.raises(FinetuneError, match=r"no space left .* 0.0 MiB free, the checkpoint and adapter need about"):
        run_finetune(model=str(tiny_model_dir), output_dir=tmp_path, log=lines.append, **RUN)
    assert not any(line.startswith("before:") for line in lines)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                                                  "1348032 vs 1347920")])
def test_a_full_disk_while_saving_is_named_and_keeps_the_checkpoint(tiny_model_dir, cpu_compute, tmp_path,
                                                                    monkeypatch, failure):
    model, _ = load_qlora_model(tiny_model_dir, config=TINY, compute=cpu_compute, progress=False)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], TINY)
    path = save_checkpoint(tmp_path / "checkpoint", model, opt, 1, {"losses": [1.0]}, config=TINY)
    before = _adapter_files(path)
    real_save, real_usage = torch.save, finetune.shutil.disk_usage

    def full_disk_save(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        raise failure  # torch's own message does not say why; the file system, reported full, does

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(finetune.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0))
    with pytest.raises(OSError, match="no space left on the device") as caught:
        save_checkpoint(path, model, opt, 2, {"losses": [1.0, 0.5]}, config=TINY)
    assert caught.value.errno == errno.ENOSPC
    assert _adapter_files(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


# ----------------------------------------------------------------------------------------------
# 6. Leftovers of interrupted saves: recovery by step, cleaning under the lock, a kill -9 mid-save


def _fake_checkpoint(folder: Path, step: int) -> None:
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "config": None, "history": {}}))


def test_recovery_of_old_folders_is_by_step_not_by_name(tmp_path):
    _fake_checkpoint(tmp_path / ".checkpoint.old-0000aaaa", 4)  # sorts first by name
    _fake_checkpoint(tmp_path / ".checkpoint.old-ffffffff", 2)
    assert read_trainer_state(tmp_path / "checkpoint")["step"] == 4
    assert clean_leftovers(tmp_path) == [".checkpoint.old-ffffffff"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_kill_while_deleting_the_old_folder_leaves_nothing_that_recovery_would_restore(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("old")
        (tmp / "b").write_text("old")
    real_rmtree = finetune.shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        files = sorted(Path(path).iterdir()) if Path(path).is_dir() else []
        if files and ".old-" in str(path) or ".trash-" in str(path):
            files[0].unlink()  # half deleted, then the kill
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(finetune.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "a").write_text("new")
        (tmp / "b").write_text("new")
    monkeypatch.setattr(finetune.shutil, "rmtree", real_rmtree)
    assert (target / "a").read_text() == "new"
    assert not list(tmp_path.glob(".checkpoint.old-*"))  # a half-deleted folder never carries a recoverable name
    real_rmtree(target)  # the user deletes the checkpoint: nothing half-deleted may come back
    finetune._recover(target)
    assert not target.exists()
    assert clean_leftovers(tmp_path) and sorted(p.name for p in tmp_path.iterdir()) == []


_SAVE_FOREVER = """
import sys, time
from pathlib import Path
from qlora_edu.ch08_finetune.finetune import atomic_directory
target, step = Path(sys.argv[1]), 0
while True:
    step += 1
    with atomic_directory(target) as tmp:
        for i in range(20):
            (tmp / f"part{i}").write_bytes(str(step).encode() * 5000)
        (tmp / "trainer_state.json").write_text('{"step": %d, "config": null, "history": {}}' % step)
        print(step, flush=True)
"""


def test_kill_9_mid_save_keeps_a_whole_folder_and_the_leftovers_are_cleaned(tmp_path):
    target = tmp_path / "checkpoint"
    saver = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        done = 0
        while done < 30:  # saves under way, folders coming and going
            line = saver.stdout.readline()
            assert line, "the saving process ended early"
            done = int(line)
        time.sleep(0.01)
    finally:
        saver.send_signal(signal.SIGKILL)
        saver.wait()
    clean_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    step = read_trainer_state(target)["step"]
    assert step >= 30 and len(list(target.glob("part*"))) == 20
    assert all(p.read_bytes() == str(step).encode() * 5000 for p in target.glob("part*"))


# ----------------------------------------------------------------------------------------------
# 10. The command line: one line naming the flag, exit status 2


def _run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "qlora_edu.ch08_finetune.finetune", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _cli_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as caught:
        main(list(argv))
    err = capsys.readouterr().err
    assert caught.value.code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m qlora_edu.ch08_finetune.finetune: error: "), err
    return last.split(": error: ", 1)[1]


@pytest.mark.parametrize(("argv", "expected"), [
    (("--lr", "-1"), r"^--lr must be a finite number in \(0.0, inf\], got -1"),
    (("--steps", "0"), r"^--steps must be in \[1, inf\], got 0"),
    (("--batch-size", "0"), r"^--batch-size must be"),
    (("--lora-dropout", "2"), r"^--lora-dropout must be"),
    (("--eval-size", "100000"), r"^--eval-size must be at most 200, .* got 100000"),
    (("--resume", "--overwrite"), r"--resume and --overwrite exclude each other"),
])
def test_cli_bad_values_name_the_flag(capsys, argv, expected):
    import re

    assert re.search(expected, _cli_error(capsys, "--device", "cpu", *argv))


def test_cli_model_that_is_not_there_or_not_a_model(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    began = time.perf_counter()
    assert "no such folder" in _cli_error(capsys, "--device", "cpu", "--model", "models/missing-model/v1")
    assert "no such folder" in _cli_error(capsys, "--device", "cpu", "--model", "./missing")
    assert time.perf_counter() - began < 10  # no hub retries
    (tmp_path / "empty").mkdir()
    assert "is a folder but not a model: it holds no config.json" in _cli_error(capsys, "--device", "cpu", "--model",
                                                                                "empty")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: --device cuda is valid here")
def test_cli_cuda_without_a_gpu_is_one_line(capsys):
    message = _cli_error(capsys, "--device", "cuda")
    assert message.startswith("--device cuda: no CUDA device here") and "is_available() is False" in message
    assert "prefer" not in message  # the internal argument's name


# ----------------------------------------------------------------------------------------------
# Issue 18: no host work inside the step, a profile (the memory fields: _check_memory_fields)


def _check_memory_fields(summary: dict, output_dir: Path) -> None:
    """Issue 18: the training steps' peak, chapter 4's prediction for the widest batch, the signed error in %."""
    assert "memory_prediction_error" not in summary and "memory_prediction_failure" in summary
    widths = read_trainer_state(output_dir / "checkpoint")["history"]["widths"]
    assert summary["predicted_memory_batch"] == [summary["config"]["batch_size"], max(widths)]
    if summary["predicted_memory_bytes"] is None:
        assert summary["memory_prediction_failure"]
    if summary["peak_memory_bytes"] is None:  # a CPU: nothing measured, no error to give
        assert summary["memory_error_percent"] is None
    else:
        measured, predicted = summary["peak_memory_bytes"], summary["predicted_memory_bytes"]
        assert summary["memory_error_percent"] == pytest.approx(100 * (predicted - measured) / measured)


def test_the_step_does_no_tokenizing_and_its_batches_are_the_collated_ones(tiny_model_dir, cpu_compute,
                                                                           few_examples, monkeypatch):
    from qlora_edu.ch08_finetune.finetune import batch_indices

    config = replace(TINY, steps=4, save_every=0)
    model, tok = load_qlora_model(tiny_model_dir, config=config, compute=cpu_compute, progress=False)
    table, rows, widths, tokens = finetune._token_batches(tok, few_examples, config, 1, torch.device("cpu"))
    config = replace(config, steps=2)
    for k, step in enumerate(range(1, 4)):
        batch = collate_examples(tok, [few_examples[i] for i in batch_indices(len(few_examples), 2, step, 0)])
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(table[key][rows[k], :widths[k]], batch[key])
        assert tokens[k] == int(batch["attention_mask"].sum())
    calls = []
    real = finetune.collate_examples
    monkeypatch.setattr(finetune, "collate_examples", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    result = train(model, tok, few_examples, config, progress=False, sync_every=10)
    assert len(calls) == 1 and len(result.losses) == 2  # one collation for the whole run, not one a step


def test_sync_interval_and_profiling_do_not_change_the_numbers(tiny_model_dir, cpu_compute, few_examples):
    """Losses read back every step (and two steps profiled) or once at the end: the same numbers, bit for bit; the
    profile is torch.profiler's table of operators."""
    config = replace(TINY, steps=3, save_every=0)
    runs = []
    for sync_every, profile_steps in ((1, 2), (10, 0)):
        model, tok = load_qlora_model(tiny_model_dir, config=config, compute=cpu_compute, progress=False)
        runs.append(train(model, tok, few_examples, config, progress=False, sync_every=sync_every,
                          profile_steps=profile_steps))
    assert runs[0].losses == runs[1].losses and runs[0].grad_norms == runs[1].grad_norms
    assert runs[0].tokens == runs[1].tokens and runs[0].widths == runs[1].widths
    assert "Self CPU" in runs[0].profile and "aten::" in runs[0].profile and runs[1].profile is None
