"""Prompts without responses for sequence-level KD (`data.unlabeled`): the sentences of emotion's and SST-2's
training files in ../shared/data, shuffled with a seed, as a .jsonl with a `prompt` column. The teacher answers them
once (through the store) and the student trains on its answers, which is what makes it a better draft model.

    python bench/lm_prompts.py --emotion 10000 --sst2 6000 --out bench/results/lm_prompts.jsonl   # 16,000 prompts
    python bench/lm_prompts.py --split test --emotion 38 --sst2 26 --out bench/results/lm_test_prompts.jsonl

`--split test` reads the two test files instead, whose sentences no training prompt file holds: prompts like the
ones a draft was distilled on, but not those prompts (`bench/speculative.py --prompt-file`).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--emotion", type=int, default=10000, help="sentences from emotion/train.txt")
    p.add_argument("--sst2", type=int, default=6000, help="sentences from sst2/sentence/stsa.binary.train")
    p.add_argument("--split", default="train", choices=("train", "test"),
                   help="which files: the training files (prompts to distil on) or the test files (held-out prompts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=str(DATA), help="the folder with emotion/ and sst2/")
    p.add_argument("--out", default="bench/results/lm_prompts.jsonl")
    args = p.parse_args(argv)
    emotion = Path(args.data) / "emotion" / f"{args.split}.txt"
    sst2 = Path(args.data) / "sst2" / "sentence" / f"stsa.binary.{args.split}"
    missing = [str(f) for f in (emotion, sst2) if not f.is_file()]
    if missing:
        print(f"missing {', '.join(missing)}: give --data, the folder holding emotion/ and sst2/", file=sys.stderr)
        return 2
    # emotion: "text;label" after a header line; SST-2: "label text"
    em = [line.rsplit(";", 1)[0].strip() for line in emotion.read_text(encoding="utf-8").splitlines()[1:]]
    ss = [line[2:].strip() for line in sst2.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(args.seed)
    rng.shuffle(em)
    rng.shuffle(ss)
    prompts = [t for t in em[:args.emotion] + ss[:args.sst2] if t]
    rng.shuffle(prompts)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in prompts), encoding="utf-8")
    print(f"wrote {len(prompts)} prompts to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
