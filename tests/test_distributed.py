"""Two processes on CPU (gloo, launched with torchrun) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import checkpoint_steps, kill_when_checkpointed, tiny_overrides
from hybridft.teacher_outputs import read_store

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _accelerate(config: Path, args: list[str]) -> list[str]:
    """`accelerate launch --config_file CONFIG -m hybridft ARGS`, on a free port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(_free_port()), "-m", "hybridft", *args]


def _launch(procs: int, args: list[str], launcher: str = "torchrun", env_extra: dict[str, str] | None = None,
            accelerate_config: Path | None = None) -> str:
    env = _env(**(env_extra or {}))
    if procs == 1:
        cmd = [sys.executable, "-m", "hybridft", *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "hybridft", *args]
    else:
        cmd = _accelerate(accelerate_config, args)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _validation(run: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["accuracy"]) for r in rows if r["split"] == "validation"]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    common = ["hybrid.enabled=false", "export.enabled=false", "--quiet"]

    def run(name: str, procs: int) -> Path:
        out = tmp_path / name
        per_process = 8 // procs  # global batch 8 either way
        _launch(procs, ["run", *tiny_overrides(tiny_teacher_dir, tiny_data, out), *common,
                        f"teacher.train.batch_size={per_process}", f"student.train.batch_size={per_process}",
                        f"distill.cache_dir={tmp_path / name / 'cache'}"])
        return out

    one, two = run("one", 1), run("two", 2)
    a, b = _validation(one), _validation(two)
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 16
    # Tolerance: summation order differs between one and two processes (~1e-7 per step), so validation
    # accuracy may differ by at most one of the 16 validation examples at any evaluation.
    assert max(abs(x[2] - y[2]) for x, y in zip(a, b)) <= 1 / 16 + 1e-9
    from safetensors.torch import load_file

    wa, wb = load_file(str(one / "student" / "model.safetensors")), load_file(str(two / "student" / "model.safetensors"))
    # measured 2.6e-5 after teacher fine-tuning (teachers 1e-6 apart) and 48 student steps at lr 3e-3
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4
    assert not (two / "metrics.jsonl").read_text().count("\n") > (one / "metrics.jsonl").read_text().count("\n"), \
        "only the main process writes the metrics file"


def test_teacher_outputs_from_two_processes_equal_one(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    # the same (untrained) classifier as teacher in both runs, used as is: only the sharded computation differs
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    teacher = tmp_path / "teacher"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_teacher_dir, num_labels=2,
                                                               id2label={0: "neg", 1: "pos"},
                                                               label2id={"neg": 0, "pos": 1})
    model.save_pretrained(teacher)
    AutoTokenizer.from_pretrained(tiny_teacher_dir).save_pretrained(teacher)
    stores = []
    for procs in (1, 2):
        out = tmp_path / f"d{procs}"
        _launch(procs, ["distill", *tiny_overrides(teacher, tiny_data, out), "--quiet", "student.train.epochs=1",
                        f"distill.cache_dir={tmp_path / f'cache{procs}'}"])
        stores.append(read_store(out / "teacher_outputs.safetensors"))
    assert stores[0].keys == stores[1].keys and len(stores[0].keys) == 48
    torch.testing.assert_close(stores[0].logits, stores[1].logits, atol=1e-5, rtol=0)


SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "accelerate"  # the files the README points to


def test_accelerate_launch_follows_its_mixed_precision_and_accumulation(tmp_path: Path, tiny_teacher_dir: Path,
                                                                        tiny_data):
    """`accelerate launch` with a config file: 2 processes, bf16 and accumulation 2 come from Accelerate
    (the run config says fp32 and 1), and the result matches one process run with those settings."""
    config = tmp_path / "accelerate.yaml"
    config.write_text((SHIPPED / "ddp.yaml").read_text().replace("mixed_precision: 'no'", "mixed_precision: bf16"))
    common = ["hybrid.enabled=false", "export.enabled=false", "--quiet"]

    def args(name: str, per_process: int, *extra: str) -> list[str]:
        return ["run", *tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / name), *common,
                f"teacher.train.batch_size={per_process}", f"student.train.batch_size={per_process}",
                f"distill.cache_dir={tmp_path / name / 'cache'}", *extra]

    err = _launch(2, args("launched", 2), launcher="accelerate", accelerate_config=config,
                  env_extra={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"})
    assert "following the Accelerate config: precision=bf16" in err and "student.train.grad_accum=2" in err
    saved = yaml.safe_load((tmp_path / "launched" / "config.yaml").read_text())
    launched = json.loads((tmp_path / "launched" / "summary.json").read_text())["launch"]
    assert launched["processes"] == 2 and launched["distributed_type"] == "MULTI_CPU"
    assert launched["mixed_precision"] == "bf16"
    assert saved["precision"] == "bf16" and saved["student"]["train"]["grad_accum"] == 2
    _launch(1, args("one", 4, "precision=bf16", "teacher.train.grad_accum=2", "student.train.grad_accum=2"))
    a, b = _validation(tmp_path / "one"), _validation(tmp_path / "launched")
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 16
    # bf16 rounds differently for batches of 2 and 4 rows; allow one example in 16 at any evaluation
    assert max(abs(x[2] - y[2]) for x, y in zip(a, b)) <= 1 / 16 + 1e-9
    # the logged loss is the whole step's, summed over both processes (measured within 1% in bf16)
    la, lb = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "launched")
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    assert all(abs(x[2] - y[2]) <= 0.03 * abs(x[2]) + 1e-3 for x, y in zip(la, lb)), (la, lb)


def _train_losses(run: Path) -> list[tuple[str, int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], r["loss"]) for r in rows if r["split"] == "train"]


def test_launch_settings_take_precision_and_accumulation_from_accelerate(monkeypatch, capsys):
    from hybridft.config import load_config
    from hybridft.pipeline import launch_settings

    cfg = load_config(None, ["precision=bf16", "student.train.grad_accum=4"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch's default: leaves it to us
    assert launch_settings(cfg) == cfg and capsys.readouterr().err == ""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    out = launch_settings(cfg)
    assert out.precision == "fp16" and out.teacher.train.grad_accum == 3 and out.student.train.grad_accum == 3
    assert out.student.train.lr == cfg.student.train.lr  # nothing else changes
    err = capsys.readouterr().err
    assert "precision=fp16 (the config said bf16)" in err and "student.train.grad_accum=3 (the config said 4)" in err




def _fsdp_args(tmp_path: Path, teacher_dir: Path, data, name: str, per_process: int, *extra: str) -> list[str]:
    return ["run", *tiny_overrides(teacher_dir, data, tmp_path / name), "hybrid.enabled=false",
            "export.enabled=false", "--quiet", f"teacher.train.batch_size={per_process}",
            f"student.train.batch_size={per_process}", f"distill.cache_dir={tmp_path / name / 'cache'}", *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_fsdp_through_an_accelerate_config_matches_one_process(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    """FSDP2 from an Accelerate config (2 CPU processes, gloo): the weights are sharded during training, and
    the teacher, the student and the metrics match one process with the same global batch."""
    config = SHIPPED / "fsdp.yaml"
    _launch(2, _fsdp_args(tmp_path, tiny_teacher_dir, tiny_data, "fsdp", 4), launcher="accelerate",
            accelerate_config=config)
    _launch(1, _fsdp_args(tmp_path, tiny_teacher_dir, tiny_data, "one", 8))
    launched = json.loads((tmp_path / "fsdp" / "summary.json").read_text())["launch"]
    assert launched["processes"] == 2 and launched["distributed_type"] == "FSDP"
    a, b = _validation(tmp_path / "one"), _validation(tmp_path / "fsdp")
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 16
    assert max(abs(x[2] - y[2]) for x, y in zip(a, b)) <= 1 / 16 + 1e-9
    for part in ("teacher", "student"):
        wa, wb = _weights(tmp_path / "one" / part), _weights(tmp_path / "fsdp" / part)
        assert wa.keys() == wb.keys(), f"{part}: FSDP saves the model's own parameter names"
        # measured: teacher 1.5e-6, student 3.1e-5 (reduce-scatter sums in another order than one process)
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4, part


def test_fsdp_sigkill_then_resume_equals_uninterrupted(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    """Kill every process of an FSDP run at a random student step; `--resume` under the same launch ends
    with the same student as an uninterrupted FSDP run (checkpoints hold whole weights and optimizer state)."""
    import random
    import signal
    import time

    config = SHIPPED / "fsdp.yaml"
    extra = ("student.train.epochs=12", "student.train.checkpoint_every=1")
    _launch(2, _fsdp_args(tmp_path, tiny_teacher_dir, tiny_data, "whole", 4, *extra), launcher="accelerate",
            accelerate_config=config)
    ckpts = tmp_path / "killed" / "checkpoints" / "student"
    total = 12 * 6  # 48 rows / global batch 8 = 6 steps per epoch
    kill_at = random.Random().randint(3, total - 10)  # a different step on every run of the suite
    args = _fsdp_args(tmp_path, tiny_teacher_dir, tiny_data, "killed", 4, *extra)
    proc = subprocess.Popen(_accelerate(config, args), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # the launcher and both training processes (torchrun starts them in new sessions)
    kill_when_checkpointed(proc, ckpts, kill_at, lambda p: _kill_tree(p.pid))
    time.sleep(1)  # nothing may still be writing
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "student").exists()
    killed_at = max(checkpoint_steps(ckpts))
    assert kill_at <= killed_at < total

    _launch(2, [*args, "--resume"], launcher="accelerate", accelerate_config=config)
    # the weights after the last step (the saved student holds the best epoch's, which may predate the kill)
    last = f"checkpoints/student/step-{total:06d}"
    for part in (last, "student"):
        a, b = _weights(tmp_path / "whole" / part), _weights(tmp_path / "killed" / part)
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff <= 1e-6, f"{part}: killed at step {killed_at} of {total}: max |difference| {diff}"
    # it continued from the checkpoint rather than starting over: the log reads as one uninterrupted run
    whole, resumed = (_train_losses(tmp_path / run) for run in ("whole", "killed"))
    assert [x[:2] for x in resumed] == [x[:2] for x in whole]


def _kill_tree(pid: int) -> None:
    import psutil  # installed with accelerate

    parent = psutil.Process(pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_fsdp_version_1_is_refused_with_one_line(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    config = tmp_path / "fsdp1.yaml"
    config.write_text((SHIPPED / "fsdp.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    out = tmp_path / "run"
    cmd = _accelerate(config, _fsdp_args(tmp_path, tiny_teacher_dir, tiny_data, "run", 4))
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "hybridft: error: the Accelerate config asks for FSDP version 1" in done.stderr
    assert not out.exists() or not any(out.iterdir()), "refused before writing anything"


FROM_MAIN = """
import os
from hybridft import dist
from hybridft.errors import HybridFTError

dist.accelerator("fp32", cpu=True)
assert dist.from_main(lambda: os.environ["RANK"]) == "0"  # run on the main process, shared with all

def fails_on_main():
    raise HybridFTError("only main saw this")

try:
    dist.from_main(fails_on_main)
except HybridFTError as e:  # one file per process: their stdout lines would interleave
    with open(os.path.join(os.path.dirname(__file__), f"rank{os.environ['RANK']}.txt"), "w") as f:
        f.write(str(e))
dist.shutdown()
"""


def test_from_main_shares_the_main_process_result_and_its_errors(tmp_path: Path):
    script = tmp_path / "from_main.py"
    script.write_text(FROM_MAIN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "only main saw this", f"rank {rank} raised it"


def test_two_machines_with_their_own_caches(tmp_path: Path, tiny_teacher_dir: Path, tiny_data):
    """Two "machines" (two `accelerate launch` calls, one process each, rendezvous over localhost), each with
    its own teacher-output cache, as $HOME caches are on a cluster. The second run finds the stored outputs
    only on the main machine's disk; the main process decides and shares them, and the run matches the first."""
    port = _free_port()

    def run(name: str) -> None:
        args = ["run", *tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / name), "hybrid.enabled=false",
                "export.enabled=false", "teacher.train.batch_size=4", "student.train.batch_size=4"]
        procs = []
        for machine in (0, 1):
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                   "--num_processes", "2", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--dynamo_backend", "no", "--mixed_precision", "no",
                   "-m", "hybridft", *args]
            env = _env(HYBRIDFT_CACHE=str(tmp_path / f"cache-machine-{machine}"))
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]

    run("first")
    stores = [list((tmp_path / f"cache-machine-{m}" / "teacher_outputs").glob("*.safetensors")) for m in (0, 1)]
    assert len(stores[0]) == 1 and stores[1] == [], "only the main process writes the store"
    written = stores[0][0].stat().st_mtime_ns
    run("second")  # before the fix, machine 1 computed (a collective) while machine 0 read: a hang
    assert stores[0][0].stat().st_mtime_ns == written, "reused, not computed again"
    assert not (tmp_path / "cache-machine-1").exists() or not any((tmp_path / "cache-machine-1").rglob("*.safetensors"))
    assert _validation(tmp_path / "first") == _validation(tmp_path / "second")
