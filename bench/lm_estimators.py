"""Storing less of the teacher: bytes per token against the bias of the forward-KL loss and its gradient.

For one set of teacher and student logits [N, V], the exact T^2 * forward KL (hybridft.lm_losses.divergence_sum,
summed over rows) and its gradient w.r.t. the student logits are compared with what the loss becomes when the
teacher is stored sparsely:

    dense fp32 / bf16   all V logits (4 or 2 bytes each); bf16 only rounds the teacher
    top-k + tail        topk_summary, k fp16 log-probs + k int32 ids (+ an fp16 tail, as a store would keep it);
                        topk_divergence_sum(tail=True): k + 1 buckets
    top-k renorm        the same k entries, teacher renormalised over them (tail=False, DistillKit's "zero")
    sampled             sample_summary, `draws` ids drawn from the teacher; unique ids int32 + counts uint8
                        (uint16 above 255 draws) + fp16 log-probs; sampled_divergence_sum, Random-Sampling KD
                        (Anshumann et al., ACL 2025, arXiv:2503.16870), unbiased; mean over --seeds draws

Columns: bytes stored per token; relative bias of the loss, (estimate - exact) / exact (for sampling, the mean
over seeds, with the std of one draw); the gradient's cosine similarity to the exact gradient and its relative
L2 error ||g - g_exact|| / ||g_exact|| (mean over seeds); and for sampling, the cosine of the *seed-averaged*
gradient, which approaches 1 as seeds grow because the estimator is unbiased (top-k's does not: it is biased).
Stored log-probs are rounded to fp16 before use, as a store would keep them.

The default logits are synthetic but LM-shaped (`lm_like_logits`: a Zipfian teacher with a per-row exponent,
and a noisier, less confident student). The core is `estimator_table(student_logits, teacher_logits, ...)`, to
be called with real logits as well. Usage (repository root, venv active):

    python bench/lm_estimators.py                 # V=49152, 512 rows: about a minute on 2 CPU cores
    python bench/lm_estimators.py --quick         # V=4096, 64 rows, fewer budgets: seconds
    python bench/lm_estimators.py --out bench/results/lm_estimators.json
    python bench/lm_estimators.py --teacher RUN/teacher --student RUN/student     # real logits (see below)

With `--teacher` and `--student` (causal LM folders of a `task=causal_lm` run, e.g. bench/lm_kd_vs_ce.py's),
the logits are real: both models' next-token logits at the response tokens of the built-in `chatterbot_en`
test split (`--rows` of them), which neither model was trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from hybridft.lm_losses import (
    divergence_sum,
    sample_summary,
    sampled_divergence_sum,
    topk_divergence_sum,
    topk_summary,
)

CHUNK_ROWS = 256  # every loss runs chunked, so the table fits in memory at V = 49152


def lm_like_logits(rows: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic (student, teacher) float32 logits [rows, vocab] shaped like an LM's next-token distribution.

    Teacher: a Zipf law over a random permutation of the vocabulary, logit = -s log(rank) with a per-row
    exponent s ~ U(1, 2.5) (top-1 probability from ~0.1 to ~0.75), plus N(0, 0.3) noise. Student: a flatter and
    noisier copy, 0.8 x teacher + N(0, 1), as a smaller model's would be.
    """
    g = torch.Generator().manual_seed(seed)
    exponent = 1.0 + 1.5 * torch.rand(rows, 1, generator=g)
    profile = -exponent * torch.arange(1, vocab + 1, dtype=torch.float32).log()  # [rows, vocab], by rank
    order = torch.rand(rows, vocab, generator=g).argsort(dim=-1)  # a random token for each rank
    teacher = torch.empty(rows, vocab).scatter_(1, order, profile)
    teacher += 0.3 * torch.randn(rows, vocab, generator=g)
    student = 0.8 * teacher + torch.randn(rows, vocab, generator=g)
    return student, teacher


def _value_and_grad(loss_fn: Callable[[torch.Tensor], torch.Tensor],
                    student_logits: torch.Tensor) -> tuple[float, torch.Tensor]:
    leaf = student_logits.detach().clone().requires_grad_(True)
    loss = loss_fn(leaf)
    loss.backward()
    return loss.item(), leaf.grad


def _grad_stats(grad: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    g, e = grad.flatten().double(), exact.flatten().double()
    return F.cosine_similarity(g, e, dim=0).item(), ((g - e).norm() / e.norm()).item()


def estimator_table(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ks: Sequence[int] = (8, 16, 64, 256),
    draws: Sequence[int] = (8, 16, 64, 256),
    temperature: float = 1.0,
    seed: int = 0,
    seeds: int = 5,
    store_dtype: Optional[torch.dtype] = torch.float16,
) -> list[dict]:
    """Bias and storage of each way to keep the teacher, against the exact forward KL.

    Args:
        student_logits (Tensor): [N, V] student logits (any float dtype).
        teacher_logits (Tensor): [N, V] teacher logits.
        ks (Sequence[int]): top-k sizes.
        draws (Sequence[int]): draws per row for Random-Sampling KD.
        temperature (float): T for the loss and for capture.
        seed (int): the first sampling seed; seeds seed, seed + 1, ... are used.
        seeds (int): independent samples per draws value.
        store_dtype (torch.dtype, optional): stored log-probs are rounded to this dtype (None: keep float32).

    Returns:
        list[dict]: one dict per row of the table, with keys method, budget (k or draws, V for dense),
        bytes_per_token, loss (the estimate; the mean over seeds for sampling), rel_bias, rel_bias_std (sampling:
        the std over seeds of one estimate; else 0), grad_cos, grad_rel_err, grad_cos_of_mean (sampling only),
        unique_ids (sampling: mean unique ids per row) and exact (the exact loss), all floats.
    """
    n_rows, vocab = student_logits.shape
    t = temperature

    def store(x: torch.Tensor) -> torch.Tensor:
        return x if store_dtype is None else x.to(store_dtype).float()

    exact, exact_grad = _value_and_grad(
        lambda s: divergence_sum(s, teacher_logits, temperature=t, chunk_rows=CHUNK_ROWS), student_logits)
    if not exact > 0:
        raise ValueError(f"the exact forward KL is {exact}: the relative bias needs student != teacher")
    table: list[dict] = []

    def add(method: str, budget: int, bytes_per_token: float, values: list[float], grads: list[torch.Tensor],
            unique_ids: Optional[float] = None) -> None:
        stats = [_grad_stats(g, exact_grad) for g in grads]
        mean_value = sum(values) / len(values)
        std = math.sqrt(sum((v - mean_value) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        table.append({
            "method": method,
            "budget": budget,
            "bytes_per_token": bytes_per_token,
            "loss": mean_value,
            "exact": exact,
            "rel_bias": (mean_value - exact) / exact,
            "rel_bias_std": std / exact,
            "grad_cos": sum(c for c, _ in stats) / len(stats),
            "grad_rel_err": sum(e for _, e in stats) / len(stats),
            "grad_cos_of_mean": _grad_stats(torch.stack(grads).mean(0), exact_grad)[0] if len(grads) > 1 else None,
            "unique_ids": unique_ids,
        })

    add("dense fp32", vocab, 4.0 * vocab, [exact], [exact_grad])
    value, grad = _value_and_grad(lambda s: divergence_sum(s, teacher_logits.bfloat16(), temperature=t,
                                                           chunk_rows=CHUNK_ROWS), student_logits)
    add("dense bf16", vocab, 2.0 * vocab, [value], [grad])

    for k in ks:
        logprobs, ids = topk_summary(teacher_logits, k, temperature=t)
        logprobs = store(logprobs)
        for tail, method, nbytes in ((True, "top-k + tail", k * (2 + 4) + 2), (False, "top-k renorm", k * (2 + 4))):
            value, grad = _value_and_grad(
                lambda s: topk_divergence_sum(s, logprobs, ids, temperature=t, tail=tail, chunk_rows=CHUNK_ROWS),
                student_logits)
            add(method, k, float(nbytes), [value], [grad])

    for n in draws:
        values, grads, uniques = [], [], []
        for i in range(seeds):
            generator = torch.Generator(device=teacher_logits.device).manual_seed(seed + i)
            ids, counts, logprobs = sample_summary(teacher_logits, n, temperature=t, generator=generator)
            logprobs = store(logprobs)
            value, grad = _value_and_grad(
                lambda s: sampled_divergence_sum(s, ids, counts, logprobs, temperature=t, chunk_rows=CHUNK_ROWS),
                student_logits)
            values.append(value)
            grads.append(grad)
            uniques.append((counts > 0).sum(dim=-1).double().mean().item())
        unique = sum(uniques) / len(uniques)
        count_bytes = 1 if n <= 255 else 2  # uint8 counts overflow at 256 draws on one id
        add("sampled", n, unique * (4 + count_bytes + 2), values, grads, unique_ids=unique)
    return table


def print_table(table: list[dict], header: str) -> None:
    print(header)
    print("| method | k / draws | bytes/token | unique ids | rel. bias | ± std (one sample) | grad cos "
          "| grad rel. err | cos(mean grad) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        unique = f"{r['unique_ids']:.1f}" if r["unique_ids"] is not None else ""
        std = f"{r['rel_bias_std']:.2%}" if r["method"] == "sampled" else ""
        of_mean = f"{r['grad_cos_of_mean']:.4f}" if r["grad_cos_of_mean"] is not None else ""
        print(f"| {r['method']} | {r['budget']} | {r['bytes_per_token']:.0f} | {unique} | {r['rel_bias']:+.2%} | {std} "
              f"| {r['grad_cos']:.4f} | {r['grad_rel_err']:.3f} | {of_mean} |")


def real_logits(teacher_dir: str, student_dir: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) float32 logits [n, V] at the held-out response tokens of the built-in test split."""
    from hybridft.config import load_config
    from hybridft.tasks import causal_lm as task

    cfg = load_config(None, ["task=causal_lm", "data.dataset=chatterbot_en"])
    test = task.load_splits(cfg, 0).test
    out = []
    for folder in (student_dir, teacher_dir):
        model, tok = task.load_model(folder, None, folder)  # type: ignore[arg-type]
        batch = task.make_collate(tok)(task.encode(test, tok, cfg.data.max_length))
        with torch.no_grad():
            out.append(task.target_logits(model.eval(), batch).float()[:rows])
    return out[0], out[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=512, help="token rows N")
    p.add_argument("--vocab", type=int, default=49152, help="V (SmolLM2: 49152)")
    p.add_argument("--ks", default="8,16,64,256", help="top-k sizes, comma-separated")
    p.add_argument("--draws", default="8,16,64,256", help="draws per row for sampling, comma-separated")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic logits and the first sampling seed")
    p.add_argument("--seeds", type=int, default=5, help="independent samples per draws value")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="V=4096, 64 rows, ks 8,64, draws 8,64, 3 seeds: seconds")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--teacher", default=None, help="a causal LM folder: real logits instead of synthetic ones")
    p.add_argument("--student", default=None, help="with --teacher: the student's folder")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.vocab, args.ks, args.draws, args.seeds = 64, 4096, "8,64", "8,64", 3
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(x) for x in args.ks.split(",") if x]
    draws = [int(x) for x in args.draws.split(",") if x]
    if args.teacher:
        student, teacher = real_logits(args.teacher, args.student, args.rows)
        args.rows, args.vocab = teacher.shape
        source = f"SmolLM2 teacher {args.teacher} and student {args.student} on held-out response tokens"
    else:
        student, teacher = lm_like_logits(args.rows, args.vocab, seed=args.seed)
        source = "synthetic LM-like logits"
    start = time.perf_counter()
    table = estimator_table(student, teacher, ks=ks, draws=draws, temperature=args.temperature, seed=args.seed,
                            seeds=args.seeds)
    seconds = time.perf_counter() - start
    q = F.softmax(teacher / args.temperature, dim=-1)
    entropy = -(q * F.log_softmax(teacher / args.temperature, dim=-1)).sum(-1).mean().item()
    top1 = q.max(dim=-1).values.mean().item()
    exact = table[0]["exact"]
    print_table(table, f"{source}: N = {args.rows} rows, V = {args.vocab}, T = {args.temperature}; "
                       f"teacher entropy {entropy:.2f} nats, top-1 prob {top1:.2f} (means); exact T^2 forward KL "
                       f"{exact / args.rows:.4f} nats/token; sampling over {args.seeds} seeds\n")
    print(f"\nestimator_table: {seconds:.2f} s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "teacher_entropy_nats": entropy, "teacher_top1": top1,
                       "exact_per_token": exact / args.rows, "seconds": seconds, "machine": platform.platform(),
                       "table": table}, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
