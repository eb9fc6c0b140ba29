"""Peak memory and time of the token-level KD loss on one LM batch: naive dense against chunked.

Forward + backward of T^2 * sum of KL(teacher_T || student_T) over B*T token rows and a V-word vocabulary,
on the same bf16 logits of both models (default B=4, T=256, V=49152, SmolLM2's vocabulary):

    naive     the usual formula on full tensors: float32 log_softmax of both models, exp, product, sum
              (what hybridft.losses.kd_loss_sum does for classification)
    dense     hybridft.lm_losses.divergence_sum(..., chunk_rows=None): the same work, also unchunked
    chunked   hybridft.lm_losses.divergence_sum(..., chunk_rows=256): 256 rows at a time, checkpointed

Each variant runs in its own fresh subprocess, so peaks do not mix. Memory is the peak *above the inputs*
(the two bf16 logit tensors), so it includes the bf16 gradient of the student logits (unavoidable, the same
for all variants) and whatever float32 temporaries the loss makes:

- CUDA (when available, or --device cuda): torch.cuda.max_memory_allocated() minus the allocated memory
  after building the inputs;
- CPU: the process's peak resident set (resource.getrusage ru_maxrss) minus its resident set after building
  the inputs (built in small blocks so that building them leaves no higher peak). Large tensors are mmap'd by
  glibc and returned on free, so RSS follows tensor memory closely; still, take the numbers to ~10 MB.

Time is the median wall time of --repeats forward+backward passes after the first (which is the one measured
for memory). Usage (repository root, venv active):

    python bench/lm_loss_memory.py                 # the default batch: about 1 to 2 minutes on 2 CPU cores
    python bench/lm_loss_memory.py --quick         # a small batch, a few seconds: checks that it works
    python bench/lm_loss_memory.py --out bench/results/lm_loss_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("naive", "dense", "chunked")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="B, sequences per batch")
    p.add_argument("--seq", type=int, default=256, help="T, token rows per sequence")
    p.add_argument("--vocab", type=int, default=49152, help="V (SmolLM2: 49152)")
    p.add_argument("--chunk-rows", type=int, default=256)
    p.add_argument("--divergence", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"),
                   help="for dense/chunked (naive is always forward KL)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3, help="timed passes after the measured one")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each subprocess")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--quick", action="store_true", help="B=1, T=512, V=8192, chunk_rows 64: seconds")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.vocab, args.repeats = 1, 512, 8192, 3
        args.chunk_rows = min(args.chunk_rows, 64)  # so the quick batch (512 rows) is chunked 8 ways, like the default
    return args


# ---------------------------------------------------------------------------------------------------
# one variant, in a fresh process


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _worker(args: argparse.Namespace) -> dict:
    import torch

    from hybridft.lm_losses import divergence_sum

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, v, t = args.batch * args.seq, args.vocab, args.temperature

    def naive(student, teacher):
        log_p = torch.log_softmax(student.float() / t, dim=-1)
        log_q = torch.log_softmax(teacher.float() / t, dim=-1)
        return (log_q.exp() * (log_q - log_p)).sum() * (t * t)

    def ours(chunk_rows):
        return lambda student, teacher: divergence_sum(student, teacher, temperature=t, divergence=args.divergence,
                                                       chunk_rows=chunk_rows)

    loss_fn = {"naive": naive, "dense": ours(None), "chunked": ours(args.chunk_rows)}[args.worker]

    # Warm-up on a tiny batch: lazy imports and one-time initialisation (torch.utils.checkpoint pulls in
    # torch._dynamo on its first call, ~tens of MB) must not count as the loss's memory.
    tiny = torch.randn(2 * args.chunk_rows + 1, 64, device=device)
    loss_fn(tiny.clone().requires_grad_(True), tiny).backward()
    del tiny

    # Inputs: bf16 logits, filled a few rows at a time so building them leaves no float32 [N, V] peak behind.
    generator = torch.Generator(device=device).manual_seed(0)
    student = torch.empty(n, v, dtype=torch.bfloat16, device=device)
    teacher = torch.empty(n, v, dtype=torch.bfloat16, device=device)
    for start in range(0, n, 8):
        block = torch.randn(min(8, n - start), v, generator=generator, device=device) * 3
        teacher[start:start + 8] = block
        student[start:start + 8] = block.add_(torch.randn(block.shape, generator=generator, device=device))
        del block
    student.requires_grad_(True)
    notes = []

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _current_rss_bytes()
        if _peak_rss_bytes() > base + 16 * 2**20:
            notes.append(f"{args.worker}: building the inputs peaked {(_peak_rss_bytes() - base) / 2**20:.0f} MB "
                         "above them; if the loss peaks lower, its number is overstated")

    times, value, peak = [], None, 0
    for i in range(1 + args.repeats):
        student.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn(student, teacher)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if i == 0:
            value = loss.item()
            peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()) - base
        if i > 0 or args.repeats == 0:  # the first pass also pays for page faults: time it only if it is alone
            times.append(elapsed)
        del loss
    return {
        "variant": args.worker,
        "peak_extra_mb": peak / 2**20,
        "seconds": statistics.median(times),
        "loss": value,
        "grad_dtype": str(student.grad.dtype),
        "threads": torch.get_num_threads(),
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------------
# the parent: one subprocess per variant, then the table


def _run_variant(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--batch", str(args.batch),
           "--seq", str(args.seq), "--vocab", str(args.vocab), "--chunk-rows", str(args.chunk_rows),
           "--divergence", args.divergence, "--temperature", str(args.temperature), "--repeats", str(args.repeats),
           "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"variant {variant} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    if done.stderr.strip():
        print(done.stderr.strip(), file=sys.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    variants = [x for x in args.variants.split(",") if x]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")

    n, v = args.batch * args.seq, args.vocab
    results = [_run_variant(args, variant) for variant in variants]
    reference = next((r for r in results if r["variant"] == "naive"), results[0])
    f32_nv_mb = n * v * 4 / 2**20
    print(f"rows N = B*T = {args.batch}*{args.seq} = {n}, V = {v}, {args.device}, bf16 logits, T = {args.temperature}, "
          f"{args.divergence} (naive: forward_kl), chunk_rows = {args.chunk_rows}")
    print(f"for scale: one float32 [N, V] tensor = {f32_nv_mb:.0f} MB; "
          f"the bf16 student gradient = {f32_nv_mb / 2:.0f} MB\n")
    print(f"| variant | peak extra MB | vs {reference['variant']} | seconds fwd+bwd | loss |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        r["ratio_vs_" + reference["variant"]] = r["peak_extra_mb"] / reference["peak_extra_mb"]
        print(f"| {r['variant']}{' (' + str(args.chunk_rows) + ' rows)' if r['variant'] == 'chunked' else ''} "
              f"| {r['peak_extra_mb']:.0f} | {r['ratio_vs_' + reference['variant']]:.2f}x | {r['seconds']:.3f} "
              f"| {r['loss']:.6g} |")
    for note in (note for r in results for note in r["notes"]):
        print(f"\nnote: {note}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"settings": {k: val for k, val in vars(args).items() if k != "worker"},
                       "rows": n, "float32_NV_mb": f32_nv_mb, "machine": platform.platform(),
                       "python": sys.version.split()[0], "results": results}, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
