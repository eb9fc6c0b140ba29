"""Generation on a CPU with torch's default linear kernels against weights prepacked for oneDNN
(`eval.prepack_weights`, `hybridft.packed_linear`), the same model in the same process.

    python bench/packed_linear.py                                   # SmolLM2-135M-Instruct, as it ships
    python bench/packed_linear.py --model runs/x/teacher --prompts 16
    python bench/packed_linear.py --quick                           # a tiny in-process Llama: a smoke run

Reported for both: the cost of one forward pass over 1..8 new tokens after 32 cached ones (what a decoding step
and a speculative verification cost), greedy tokens/s at batch 1 (`speculative.greedy_generate`) and at batch 8
(transformers `generate`, every sequence forced to --max-new-tokens), the largest difference of the logits on
one prompt, and how many greedy generations are token for token the same. Writes bench/results/packed_linear.json
(or --out). Compare ratios within one run: seconds depend on the machine and what else runs on it.
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
from _report import write_report  # noqa: E402
PROMPTS = ["What is Japanese sake made from?", "Can you write a Python class with a property?",
           "Tell me a joke about computers.", "What country is bordered by Germany and Poland?",
           "Explain what a neural network is.", "Write a haiku about autumn.", "How do I boil an egg?",
           "What is the capital of Australia?"]


def _tiny() -> tuple[object, object]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                         tie_word_embeddings=True))
    return model, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="a causal LM folder or a built-in name")
    p.add_argument("--prompts", type=int, default=8, help="prompts generated at batch 1 (cycled from a fixed list)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--quick", action="store_true", help="a tiny random Llama, 2 prompts, 6 new tokens")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "packed_linear.json"))
    args = p.parse_args(argv)

    import torch
    import transformers

    from hybridft import speculative
    from hybridft.packed_linear import packed_for_inference, packing_available
    from hybridft.tasks import causal_lm

    ok, why = packing_available()
    if not ok:
        print(f"nothing to compare: {why}", file=sys.stderr)
        return 2
    cpu = torch.device("cpu")
    if args.quick:
        model, tokenizer = _tiny()
        args.prompts, args.max_new_tokens = 2, 6
        inputs = [torch.randint(3, 64, (1, 5 + i), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    else:
        model, tokenizer = causal_lm.load_model(causal_lm.resolve_model_path(args.model), None, "--model")  # type: ignore[arg-type]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
        inputs = [speculative.prompt_tensor(tokenizer, t, cpu) for t in prompts]
    model.eval()
    # plain batch-8 ids: the prompts left-padded to one width would need a tokenizer; the same prompt 8 times does not
    batch8 = inputs[0].repeat(8, 1)
    eos = speculative.eos_ids(model, tokenizer) if tokenizer is not None else set()

    def measure() -> dict:
        outs, total = [], speculative.SpeculativeStats()
        speculative.greedy_generate(model, inputs[0], args.max_new_tokens, eos)  # warm-up
        for ids in inputs:
            out, st = speculative.greedy_generate(model, ids, args.max_new_tokens, eos)
            outs.append(out[0, ids.shape[1]:].tolist())
            total.add(st)
        import time

        model.generate(input_ids=batch8, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        model.generate(input_ids=batch8, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                       do_sample=False, pad_token_id=0)
        batch8_s = time.perf_counter() - start
        return {"pass_ms": speculative.teacher_pass_ms(model, 8), "outputs": outs,
                "logits": model(input_ids=inputs[-1]).logits[0],
                "tokens_per_s_batch1": round(total.new_tokens / total.seconds, 2),
                "tokens_per_s_batch8": round(8 * args.max_new_tokens / batch8_s, 2)}

    with torch.no_grad():
        plain = measure()
        with packed_for_inference(model, cpu) as layers:
            packed = measure()
    report = {"model": "tiny random Llama" if args.quick else args.model, "prompts": len(inputs),
              "max_new_tokens": args.max_new_tokens, "packed_layers": layers,
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "transformers": transformers.__version__}}
    for name, r in (("plain", plain), ("packed", packed)):
        report[name] = {k: r[k] for k in ("pass_ms", "tokens_per_s_batch1", "tokens_per_s_batch8")}
    report["speedup_batch1"] = round(packed["tokens_per_s_batch1"] / plain["tokens_per_s_batch1"], 3)
    report["speedup_batch8"] = round(packed["tokens_per_s_batch8"] / plain["tokens_per_s_batch8"], 3)
    report["pass_ratio_by_width"] = [round(a / b, 3) for a, b in zip(plain["pass_ms"], packed["pass_ms"])]
    report["max_logit_difference"] = float((plain["logits"] - packed["logits"]).abs().max())
    report["same_greedy_outputs"] = sum(a == b for a, b in zip(plain["outputs"], packed["outputs"]))
    print(f"{report['model']}, {layers} linear layers packed: batch 1 {plain['tokens_per_s_batch1']} -> "
          f"{packed['tokens_per_s_batch1']} tokens/s ({report['speedup_batch1']}x), batch 8 "
          f"{plain['tokens_per_s_batch8']} -> {packed['tokens_per_s_batch8']} ({report['speedup_batch8']}x); a pass "
          f"over 1..8 tokens {plain['pass_ms']} -> {packed['pass_ms']} ms; logits differ by at most "
          f"{report['max_logit_difference']:.2g}; {report['same_greedy_outputs']}/{len(inputs)} greedy outputs the same")
    print(f"wrote {write_report(report, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
