"""task: causal_lm through the shared loop's hard parts: 2 processes equal 1 with the same global batch (token
counts normalised globally), and a SIGKILL at a random step then --resume equals an uninterrupted run."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import checkpoint_steps, kill_when_checkpointed
from test_causal_lm import lm_rows, make_llama, make_lm_tokenizer, write_jsonl
from test_distributed import _env, _launch

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")


@pytest.fixture
def lm_files(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "tiny-lm"
    tok = make_lm_tokenizer(folder, template=True)  # prompts through a chat template, as with SmolLM2
    make_llama(len(tok)).save_pretrained(folder)
    return {"teacher": folder, "train": write_jsonl(tmp_path / "train.jsonl", lm_rows(32, seed=1)),
            "validation": write_jsonl(tmp_path / "val.jsonl", lm_rows(8, seed=2))}


def _args(files: dict[str, Path], out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["run", "task=causal_lm", f"data.train={files['train']}", f"data.validation={files['validation']}",
            f"teacher.model={files['teacher']}", "student.num_layers=2", "data.max_length=32",
            "student.train.epochs=3", f"student.train.batch_size={batch_size}", "student.train.lr=3e-3",
            "student.train.eval_every=2", "distill.top_k=8", "eval.generate_examples=1", "eval.max_new_tokens=2",
            f"distill.cache_dir={out.parent / 'cache'}", f"output_dir={out}", "--quiet", "precision=fp32", *extra]


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "validation"]


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def test_two_processes_equal_one_for_a_causal_lm(tmp_path: Path, lm_files):
    _launch(2, _args(lm_files, tmp_path / "two", 4))  # 2 x 4 rows per step
    _launch(1, _args(lm_files, tmp_path / "one", 8))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] and len(one) >= 5
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two)) < 1e-4, (one, two)
    # the same weights: per-token loss divided by the global count of response tokens on both processes
    assert _max_diff(tmp_path / "one" / "student", tmp_path / "two" / "student") < 1e-4


def test_sigkill_then_resume_equals_uninterrupted_for_a_causal_lm(tmp_path: Path, lm_files):
    extra = ("student.train.epochs=8", "student.train.checkpoint_every=1", "student.train.log_every=1")
    _launch(1, _args(lm_files, tmp_path / "whole", 8, *extra))
    total = max(checkpoint_steps(tmp_path / "whole" / "checkpoints" / "student"))
    kill_at = random.Random().randint(3, total - 6)  # a different step on every run of the suite
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "hybridft", *_args(lm_files, out, 8, *extra)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when_checkpointed(proc, out / "checkpoints" / "student", kill_at, lambda p: p.send_signal(signal.SIGKILL))
    assert proc.returncode == -signal.SIGKILL and not (out / "student").exists()
    resumed = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for part in (f"checkpoints/student/step-{total:06d}", "student"):
        assert _max_diff(tmp_path / "whole" / part, out / part) <= 1e-6, part
    whole, resumed_log = _losses(tmp_path / "whole"), _losses(out)
    assert [s for s, _ in whole] == [s for s, _ in resumed_log]
    assert max(abs(a - b) for (_, a), (_, b) in zip(whole, resumed_log)) <= 1e-6
