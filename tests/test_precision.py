"""`precision: auto` (issue 10): bf16 where it is faster on this machine, fp32 where it is not, said and kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import tiny_overrides
from hybridft import precision as pr
from hybridft.cli import main
from hybridft.config import load_config
from hybridft.models import read_config
from hybridft.pipeline import resolve_precision


@pytest.fixture
def timed(monkeypatch):
    """A CPU with AVX512-BF16 and no AMX, idle, whose probe times are set by the test."""
    calls = []
    monkeypatch.setattr(pr, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(pr, "machine_busy", lambda: None)

    def probe(ms):
        def fake(config, tokens):
            calls.append(tokens)
            return dict(ms)
        monkeypatch.setattr(pr, "time_probe", fake)
    return probe, calls


def test_capabilities_decide_without_timing(monkeypatch):
    monkeypatch.setattr(pr, "cpu_flags", lambda: {"avx512f", "amx_bf16", "avx512_bf16"})
    assert pr.choose("cpu", {"model_type": "bert"}, 128).precision == "bf16"
    monkeypatch.setattr(pr, "cpu_flags", lambda: {"avx2"})
    choice = pr.choose("cpu", {"model_type": "bert"}, 128)
    assert choice.precision == "fp32" and "without bf16 instructions" in choice.reason
    monkeypatch.setattr(pr, "cpu_flags", lambda: {"avx512_bf16"})
    assert pr.choose("cpu", {"model_type": "bert"}, 128, processes=2).precision == "fp32"


def test_a_timed_choice_takes_bf16_only_when_clearly_faster_and_is_remembered(timed):
    probe, calls = timed
    probe({"fp32": 100.0, "bf16": 95.0})  # 5% is within timing noise: fp32 keeps exact arithmetic
    config = {"model_type": "bert", "hidden_size": 32}
    first = pr.choose("cpu", config, 128)
    assert first.precision == "fp32" and "0.95x the time of fp32" in first.reason and calls == [64]
    probe({"fp32": 100.0, "bf16": 10.0})  # would flip the choice, but the machine's answer is remembered
    again = pr.choose("cpu", config, 128)
    assert again.precision == "fp32" and "timed earlier" in again.reason and calls == [64]
    other = pr.choose("cpu", {"model_type": "bert", "hidden_size": 64}, 128)  # another architecture is timed
    assert other.precision == "bf16" and "10.00x faster" in other.reason and calls == [64, 64]
    assert len(json.loads(pr.cache_file().read_text())) == 2


def test_the_probe_times_both_precisions_on_the_real_architecture(tiny_teacher_dir: Path):
    ms = pr.time_probe(read_config(str(tiny_teacher_dir)), tokens=16, batch=4)
    assert set(ms) == {"fp32", "bf16"} and all(v > 0 for v in ms.values())


def test_a_run_says_what_auto_chose_and_why_and_a_resume_keeps_it(tmp_path: Path, tiny_teacher_dir: Path, tiny_data,
                                                                  timed, capsys):
    probe, calls = timed
    probe({"fp32": 100.0, "bf16": 50.0})
    out = tmp_path / "run"
    args = [*(o for o in tiny_overrides(tiny_teacher_dir, tiny_data, out) if not o.startswith("precision=")),
            "progress=true", "hybrid.enabled=false", "device=cpu",  # the CPU's rule (a GPU machine says "CUDA")
            "export.enabled=false", "teacher.train.epochs=1", "student.train.epochs=1"]
    assert main(["run", *args]) == 0
    printed = capsys.readouterr()
    assert "precision: bf16 (CPU without AMX, bf16 timed 2.00x faster than fp32)" in printed.out
    assert "\r" not in printed.err  # stderr is no terminal here: no progress bar redrawn into it (hybridft.progress)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"]["chosen"] == "bf16" and summary["launch"]["mixed_precision"] == "bf16"
    assert yaml.safe_load((out / "config.yaml").read_text())["precision"] == "bf16"
    probe({"fp32": 50.0, "bf16": 100.0})
    pr.cache_file().unlink()  # even a new timing would say fp32: the resumed run keeps its own choice
    cfg, choice = resolve_precision(load_config(None, args), out)
    assert cfg.precision == "bf16" and "resumed" in choice.reason
    named, none = resolve_precision(load_config(None, [*args, "precision=fp32"]), None)
    assert named.precision == "fp32" and none is None


def test_a_choice_timed_on_a_busy_machine_serves_that_run_only(timed, monkeypatch):
    probe, calls = timed
    monkeypatch.setattr(pr, "machine_busy", lambda: 5.2)
    probe({"fp32": 100.0, "bf16": 220.0})  # under load bf16 loses
    busy = pr.choose("cpu", {"model_type": "bert"}, 64)
    assert busy.precision == "fp32" and "load 5.2" in busy.reason and not pr.cache_file().exists()
    monkeypatch.setattr(pr, "machine_busy", lambda: None)
    probe({"fp32": 100.0, "bf16": 46.0})  # idle, it wins, and that is remembered
    assert pr.choose("cpu", {"model_type": "bert"}, 64).precision == "bf16" and pr.cache_file().exists()


def test_an_explicit_bf16_on_a_cpu_that_would_emulate_it_warns(monkeypatch: pytest.MonkeyPatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, ["precision=bf16", "device=cpu"])
    for flags, warned in (({"avx2", "fma"}, True), ({"avx2", "avx512bw", "avx512_bf16"}, False), (set(), False)):
        monkeypatch.setattr(pr, "cpu_flags", lambda f=flags: f)
        out, choice = resolve_precision(cfg, None)
        assert out.precision == "bf16" and choice is None  # the user's choice stands
        assert ("emulated" in capsys.readouterr().err) is warned, flags
