"""The speculative hybrid of a finished causal_lm run, for several draft lengths: the distilled student and the
same layers before distillation as the teacher's draft model, same prompts, same process.

    python bench/speculative.py --run runs/causal_lm_demo                    # draft lengths 1, 2, 3, 4, 6
    python bench/speculative.py --run runs/causal_lm_demo --vocabularies 0,8192 --confidences 0,0.4
    python bench/speculative.py --run runs/causal_lm_demo --draft-precisions fp32,bf16,int8 --padding off,on
    python bench/speculative.py --run runs/causal_lm_demo --prepack off,on   # oneDNN-prepacked weights on a CPU
    python bench/speculative.py --run runs/causal_lm_demo --adaptive off,on  # drafting only while it pays
    python bench/speculative.py --run runs/causal_lm_demo --quick            # a smoke run of the same code
    python bench/speculative.py --run RUN --prompt-file held_out.jsonl       # other prompts than the test split's

Per draft length k, draft vocabulary size, confidence threshold, draft precision, verification padding and
prepacked weights (hybrid.draft_vocabulary, draft_confidence, draft_precision, verify_padding, eval.prepack_weights)
and adaptive drafting (hybrid.adaptive_drafting; off by default here, so that the earlier commands measure what they did):
acceptance rate, tokens per teacher pass, tokens/s and speed-up over the teacher alone, for both drafts; and whether
every hybrid output equals the teacher's greedy output. Batch 1, greedy, fp32, the first `--prompts` test prompts of
the run (or of `--prompt-file`), `--max-new-tokens` each; the teacher in fp32; on `--device` (a CUDA GPU when one
is visible). With padding on, the report also holds the timed cost of a teacher pass per width. Writes
bench/results/speculative.json (or --out), rewritten after every row. Compare ratios within one run: seconds depend
on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_report.py, also when a test imports this file
from _report import device_from, prompts_from_file, speculative_run, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a finished causal_lm run folder (config.yaml, hybrid/)")
    p.add_argument("--draft-tokens", default="1,2,3,4,6", help="comma-separated draft lengths")
    p.add_argument("--vocabularies", default="0",
                   help="comma-separated draft vocabulary sizes (hybrid.draft_vocabulary; 0 = the whole vocabulary)")
    p.add_argument("--confidences", default="0", help="comma-separated hybrid.draft_confidence values")
    p.add_argument("--draft-precisions", default="fp32",
                   help="comma-separated hybrid.draft_precision values (auto, fp32, bf16, int8)")
    p.add_argument("--padding", default="off", help="comma-separated hybrid.verify_padding values (off, on)")
    p.add_argument("--prepack", default="off",
                   help="comma-separated eval.prepack_weights values (off, on): the teacher (alone and verifying) and "
                        "the fp32/bf16 drafts from weights prepacked for oneDNN")
    p.add_argument("--adaptive", default="off",
                   help="comma-separated hybrid.adaptive_drafting values (off, on): draft only while drafting is "
                        "measured faster than the teacher's plain steps")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-file", default=None,
                   help="a .jsonl with a prompt column to take the prompts from (default: the run's test split)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the teacher and drafts run (auto: a CUDA GPU when one is visible, else the CPU)")
    p.add_argument("--quick", action="store_true", help="2 prompts, 8 new tokens, draft lengths 1 and 3, prepacked")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "speculative.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens, args.draft_tokens = 2, 8, "1,3"
        args.vocabularies, args.confidences = "0,12", "0,0.3"
        args.draft_precisions, args.padding, args.prepack = "fp32,int8", "off", "on"

    import torch
    import transformers

    device = device_from(args.device)
    if device.type == "cuda" and args.quick:
        args.draft_precisions = "fp32,bf16"  # int8 (dynamic quantization) is a CPU kernel

    from hybridft import speculative
    from hybridft.tasks import causal_lm

    run = Path(args.run)
    loaded = speculative_run(run)
    if loaded is None:
        return 2
    cfg, splits, examples = loaded
    if args.prompt_file:
        prompts = prompts_from_file(args.prompt_file, args.prompts)
    else:
        prompts = examples.texts[:args.prompts] if examples.pairs is not None else \
            [t[:200] for t in examples.texts[:args.prompts]]
    hybrid = speculative.load_hybrid(run / "hybrid")
    teacher, draft, tokenizer = hybrid.teacher, hybrid.draft, hybrid.tokenizer
    undistilled = causal_lm.build_student(cfg, teacher, tokenizer, splits)[0].eval()
    responses = causal_lm.response_tokens(splits.train, tokenizer, cfg.data.max_length)
    vocab = speculative.output_vocabulary_size(teacher)  # the row name of the whole vocabulary
    rows = {}
    for option, given in (("--padding", args.padding), ("--prepack", args.prepack), ("--adaptive", args.adaptive)):
        bad = [x for x in given.split(",") if x not in ("off", "on")]
        if bad:
            print(f"{option} takes off and on, got {bad}", file=sys.stderr)
            return 2
    settings = [(k, size, confidence, precision, padding, prepack, adaptive)
                for prepack in args.prepack.split(",")
                for adaptive in args.adaptive.split(",")
                for k in [int(x) for x in args.draft_tokens.split(",")]
                for size in [int(x) for x in args.vocabularies.split(",")]
                for confidence in [float(x) for x in args.confidences.split(",")]
                for precision in args.draft_precisions.split(",")
                for padding in args.padding.split(",")]
    vocabularies = {size: speculative.frequent_token_vocabulary(teacher, tokenizer, responses, size)
                    for size in {s[1] for s in settings}}  # built once per size, not once per row
    # what the drafts could be accepted on, alone (top-1) and in a tree of candidates (top-2..4), fp32
    agreement = {name: speculative.draft_top_k_agreement(teacher.to(device), model.to(device), tokenizer, prompts,
                                                         args.max_new_tokens, device)
                 for name, model in (("distilled", draft), ("undistilled", undistilled))}
    for name, a in agreement.items():
        print(f"{name} draft: the teacher's greedy token is its top-1 {a['top_1']:.1%}, in its top-2 {a['top_2']:.1%}, "
              f"top-4 {a['top_4']:.1%} of {a['tokens']} tokens", flush=True)
    report = {"run": str(run), "prompts": len(prompts), "prompt_file": args.prompt_file, "max_new_tokens": args.max_new_tokens,
              "draft_top_k_agreement": agreement,
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "device": str(device),
                          **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {})},
              "rows": rows}
    out = write_report(report, args.out)
    for k, size, confidence, precision, padding, prepack, adaptive in settings:
        r = speculative.measure(teacher, draft, undistilled, tokenizer, prompts, args.max_new_tokens, k, device,
                                vocabularies[size], confidence, precision, padding == "on", prepack == "on",
                                adaptive == "on")
        name = f"k={k} vocabulary={size or vocab} confidence={confidence} draft={precision} padding={padding}" \
            + (f" prepack={prepack}" if args.prepack != "off" else "") \
            + (f" adaptive={adaptive}" if args.adaptive != "off" else "")
        rows[name] = r
        coverage = r.get("draft_vocabulary", {}).get("teacher_token_coverage", 1.0)
        widths = f", widths {r['verify_padding']['pad_to']}" if "verify_padding" in r else ""
        print(f"{name} (covers {coverage:.1%} of the teacher's tokens{widths}): "
              f"teacher {r['teacher']['tokens_per_s']}/s; distilled draft: acceptance "
              f"{r['hybrid']['acceptance_rate']:.1%}, {r['hybrid']['tokens_per_s']}/s "
              f"({r['hybrid']['speedup_vs_teacher']}x){speculative.drafting_note(r['hybrid'])}; undistilled draft: "
              f"acceptance {r['undistilled_hybrid']['acceptance_rate']:.1%}, {r['undistilled_hybrid']['tokens_per_s']}/s "
              f"({r['undistilled_hybrid']['speedup_vs_teacher']}x){speculative.drafting_note(r['undistilled_hybrid'])}; outputs equal to the teacher's: "
              f"{r['matches_teacher']}/{r['prompts']} and "
              f"{r['undistilled_hybrid']['matches_teacher']}/{r['prompts']}", flush=True)
        # after every row, so that a run stopped at a time limit keeps the rows it finished
        write_report(report, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
