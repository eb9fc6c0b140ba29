"""`hybridft run | teacher | distill | evaluate | predict | generate`: parse arguments, call the pipeline,
print a table.

User errors (`HybridFTError`) print one line and exit with status 2; a full disk prints one line and exits with
status 1; nothing else is caught.
"""

from __future__ import annotations

import argparse
import errno
import sys
import time
from pathlib import Path
from typing import Any, Optional

from hybridft.errors import HybridFTError

# The demo: BBC News, MiniLM-L6 teacher, 2-layer student, the default precision (auto). It must finish in under
# 10 minutes on a 2-core CPU without bf16 instructions (17 min with the library defaults of 2026-12-03 on an AVX2
# EPYC): an article's first 64 tokens (headline and lead) name its topic, 1,779 articles need no generated transfer
# set (retention 100.2% without it, 100.3% with it; BENCHMARKS.md), and 3 student epochs keep 99.6%.
DEMO_OVERRIDES = ["data.dataset=bbc_news", "data.max_length=64", "augment.factor=0", "teacher.train.epochs=2",
                  "student.train.epochs=3"]
# `hybridft run task=causal_lm`: the ChatterBot exchanges, SmolLM2-135M-Instruct teacher, 8-layer student, fp32
# (SmolLM2 runs slower in bf16 than in fp32 on 2 CPU cores: 460 against 690 tokens/s, measured).
LM_DEMO_OVERRIDES = ["data.dataset=chatterbot_en"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridft", description="Hybrid fine-tuning: distil a fine-tuned "
                                     "teacher into a small student (alpha * KD + beta * CE).")
    sub = parser.add_subparsers(dest="command")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML config file")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. student.layers=[0,5] loss.temperature=4")
        p.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
        p.add_argument("--resume", action="store_true",
                       help="continue an interrupted run in output_dir from its latest checkpoint")
        p.add_argument("--force", action="store_true", help="with --resume: continue even if the config changed")
        p.add_argument("--quiet", action="store_true", help="no progress output")
        return p

    add("run", "the whole pipeline; with no config and no data it runs the BBC News demo")
    add("teacher", "fine-tune the teacher only (writes OUTPUT_DIR/teacher)")
    add("distill", "teacher outputs + student training, from teacher.model (a fine-tuned classifier) "
        "or from distill.teacher_logits")
    pr = sub.add_parser("predict", help="label a CSV, TSV, JSONL, JSON or Parquet file with a hybrid (or student) "
                                        "folder")
    pr.add_argument("--model", required=True, help="OUTPUT_DIR/hybrid of a run, or a classifier folder")
    pr.add_argument("--input", required=True, help=".csv, .tsv, .txt, .jsonl, .json or .parquet with a text column")
    pr.add_argument("--output", required=True, help=".csv, .tsv or .jsonl; written only when the whole file is done")
    pr.add_argument("--text-column", default=None,
                    help="default: the column the run trained on (a hybrid folder records it), else 'text'")
    pr.add_argument("--text-pair-column", default=None, help="default: the run's, for a sentence-pair hybrid")
    pr.add_argument("--delimiter", default=None, help="for delimited input; default from the suffix")
    pr.add_argument("--num-threads", type=int, default=None,
                    help="CPU threads (default: torch's, one per core); 1 is often faster where other processes "
                         "share the cores")
    pr.add_argument("--encoding", default="utf-8",
                    help="the input's text encoding (default utf-8; cp1252 for a CSV saved by Excel on Windows)")
    pr.add_argument("--quoting", choices=["csv", "none"], default=None,
                    help="csv: quoted fields; none: quotes are literal (default: none for .tsv/.txt, csv otherwise)")
    pr.add_argument("--batch-size", type=int, default=256, help="rows read, predicted and written at a time")
    pr.add_argument("--skip-bad-rows", action="store_true",
                    help="skip rows with empty text or bad encoding, and count them in OUTPUT.report.json")
    pr.add_argument("--student-onnx", default=None,
                    help="run the student from an exported ONNX file (OUTPUT_DIR/export/model_int8.onnx)")
    pr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    pr.add_argument("--no-prepack", action="store_true",
                    help="on a CPU, run the models' linear layers with torch's default kernels instead of weights "
                         "prepacked for oneDNN where faster (same labels up to rounding)")
    pr.add_argument("--quiet", action="store_true")
    ge = sub.add_parser("generate", help="greedy generations of a causal LM folder for a file of prompts")
    ge.add_argument("--model", required=True,
                    help="a causal LM folder (OUTPUT_DIR/student of a causal_lm run), or OUTPUT_DIR/hybrid: the "
                         "teacher's greedy output, drafted by the student (speculative decoding, batch 1)")
    ge.add_argument("--input", required=True, help=".jsonl, .json, .parquet, .csv, .tsv or .txt with a prompt column")
    ge.add_argument("--output", required=True, help=".jsonl, .csv or .tsv; written only when the whole file is done")
    ge.add_argument("--prompt-column", default="prompt",
                    help="the prompt's column; its cells may hold chat messages (a JSON list of {role, content}, "
                         "ending with the user's turn): --prompt-column messages")
    ge.add_argument("--delimiter", default=None, help="for delimited input; default from the suffix")
    ge.add_argument("--num-threads", type=int, default=None,
                    help="CPU threads (default: torch's, one per core); 1 is often faster where other processes "
                         "share the cores")
    ge.add_argument("--encoding", default="utf-8",
                    help="the input's text encoding (default utf-8; cp1252 for a CSV saved by Excel on Windows)")
    ge.add_argument("--quoting", choices=["csv", "none"], default=None,
                    help="csv: quoted fields; none: quotes are literal (default: none for .tsv/.txt, csv otherwise)")
    ge.add_argument("--max-new-tokens", type=int, default=64)
    ge.add_argument("--batch-size", type=int, default=None,
                    help="prompts generated, and rows written, at a time (default 8; the speculative hybrid "
                         "generates one prompt at a time whatever this says)")
    ge.add_argument("--skip-bad-rows", action="store_true",
                    help="skip rows with an empty prompt or bad encoding, and count them in OUTPUT.report.json")
    ge.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ge.add_argument("--no-prepack", action="store_true",
                    help="on a CPU, run the linear layers with torch's default kernels instead of weights prepacked "
                         "for oneDNN (eval.prepack_weights; same tokens up to rounding, about half the speed)")
    ge.add_argument("--quiet", action="store_true")
    ev = sub.add_parser("evaluate", help="evaluate the teacher and student of a finished run on its test split")
    ev.add_argument("--run", required=True, help="a run folder (holds config.yaml, teacher/, student/)")
    ev.add_argument("--quiet", action="store_true")
    return parser


def saved_run_config(overrides: list[str]) -> Optional[str]:
    """OUTPUT_DIR/config.yaml when the overrides name an output_dir that holds one, else None."""
    from hybridft.config import parse_override

    for item in overrides:
        keys, value = parse_override(item)
        if keys == ["output_dir"] and (Path(str(value)) / "config.yaml").is_file():
            return str(Path(str(value)) / "config.yaml")
    return None


def _is_demo(args: argparse.Namespace) -> bool:
    """No config file and no data named: run the built-in BBC News demo."""
    keys = {o.split("=", 1)[0].strip() for o in args.overrides}
    return args.config is None and not keys & {"data.train", "data.dataset"}


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    # KEY=VALUE overrides may sit before or after the flags: argparse leaves those after a flag unparsed
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_help()
        return 0
    try:
        code = _dispatch(args)
        from hybridft import dist

        dist.shutdown()  # with several processes, leave the process group together
        return code
    except HybridFTError as e:
        print(f"hybridft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        trains = getattr(args, "command", None) in ("run", "teacher", "distill")
        print("hybridft: interrupted" + ("; the same command with --resume continues it (from its last checkpoint, "
                                         "if one was written)" if trains else ""), file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"hybridft: error: the disk is full ({e.filename or 'writing a file'}); free space and run again "
              f"(a training run continues from its last checkpoint with --resume)", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    from hybridft.config import load_config

    if args.command == "evaluate":
        return _evaluate(Path(args.run), quiet=args.quiet)
    if args.command == "predict":
        return _predict(args)
    if args.command == "generate":
        return _generate(args)
    if args.force and not args.resume:
        raise HybridFTError("--force only applies with --resume (to continue a run whose config changed)")
    if args.resume and args.config is None:  # `run output_dir=RUN --resume` continues RUN under its own config
        args.config = saved_run_config(args.overrides)
    overrides = list(args.overrides)
    if args.command == "run" and _is_demo(args):
        lm = any(o.replace(" ", "") == "task=causal_lm" for o in overrides)
        overrides = (LM_DEMO_OVERRIDES if lm else DEMO_OVERRIDES) + overrides
    if args.quiet:
        overrides.append("progress=false")
    cfg = load_config(args.config, overrides)
    output = Path(cfg.output_dir)
    created = not output.exists()
    try:
        return _train_command(args, cfg)
    except HybridFTError:
        if created and output.is_dir() and not any(output.iterdir()):
            output.rmdir()  # bad input leaves nothing behind, not even the empty folder made to test writing
        raise


def _train_command(args: argparse.Namespace, cfg: Any) -> int:
    from hybridft import pipeline

    if args.command == "run":
        if args.resume and args.overwrite:
            raise HybridFTError("--resume continues a run and --overwrite replaces it; pass only one")
        summary = pipeline.run(cfg, overwrite=args.overwrite, resume=args.resume, force=args.force)
        if summary:  # empty on the non-main processes of a multi-process run
            print_table(summary, cfg.output_dir)
    elif args.command == "teacher":
        ctx = pipeline.prepare(cfg, args.overwrite, stage="teacher")
        pipeline.train_teacher(ctx)
        print(f"teacher saved to {ctx.run_dir / 'teacher'}")
    elif args.command == "distill":
        ctx = pipeline.prepare(cfg, args.overwrite, stage="distill")
        if cfg.distill.teacher_logits:
            store = pipeline.read_store(cfg.distill.teacher_logits)
            ctx.store_path = Path(cfg.distill.teacher_logits)
            teacher, tok = (None, None) if cfg.student.model else pipeline.load_teacher(ctx)[:2]
        else:
            teacher, tok, needs_finetune = pipeline.load_teacher(ctx)
            if needs_finetune:
                what = (f"is not a classifier for labels {ctx.splits.label_names} (if it was fine-tuned with unnamed "
                        f"labels LABEL_0, LABEL_1, ..., pass teacher.finetune=never to read output i as label i)"
                        if cfg.task == "classification" else "is to be fine-tuned first (teacher.finetune=always)")
                raise HybridFTError(f"teacher.model {cfg.teacher.model} {what}; run `hybridft teacher` first or use "
                                    f"`hybridft run`")
            pipeline.augment(ctx, teacher, tok)
            store = None if cfg.distill.online else pipeline.teacher_outputs(ctx, teacher, tok)
        pipeline.distill(ctx, store, teacher, tok)
        print(f"student saved to {ctx.run_dir / 'student'}")
    return 0


PREPACK_MIN_ROWS = 2000
"""`predict` prepacks weights for files of at least this many lines. Deciding times a few passes of each model,
plain and packed (about 3 s for the MiniLM teacher and its student on 2 cores, far more on a loaded machine),
which 20 rows never win back: a fresh user measured 26 s with prepacking against 7 s without for 20 rows. At the
1.8-2x it gives MiniLM, the timing pays for itself from about 2,000 rows."""


GENERATE_TIMING_MIN_PASSES = 400
"""`generate` times its setup choices (prepacked weights; the hybrid's verification widths) only for inputs of at
least this many teacher passes (prompts x --max-new-tokens, divided by the batch for a plain model). Deciding costs
about 3.6 s for SmolLM2-135M on 2 idle cores, some 70 decoding passes, and prepacking saves about 30% of a pass:
a fresh user's 6 prompts of 20 tokens spent 100 s deciding on a loaded machine and generated in 89 s."""


def worth_timing_setup(path: str, max_new_tokens: int, prompts_per_pass: int) -> bool:
    """Whether `path` holds enough prompts for `generate`'s timed setup to pay back (GENERATE_TIMING_MIN_PASSES)."""
    batches = -(-GENERATE_TIMING_MIN_PASSES // max(max_new_tokens, 1))  # of max_new_tokens passes each
    needed = (batches - 1) * prompts_per_pass + 1
    header = 0 if path.lower().endswith((".jsonl", ".json", ".parquet")) else 1
    return not fewer_lines_than(path, needed + header)


def fewer_lines_than(path: str, limit: int) -> bool:
    """Whether the file at `path` has fewer than `limit` lines; reads no further than `limit` line breaks, so a
    large file costs little. A Parquet file has no lines: its rows (from the footer) count instead. False for a
    path that cannot be read (predict_file then says why)."""
    if path.lower().endswith(".parquet"):
        try:
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows < limit
        except Exception:  # pyarrow raises several unrelated types for a broken file; predict_file says why
            return False
    try:
        with open(path, "rb") as f:
            count = 0
            while chunk := f.read(1 << 20):
                count += chunk.count(b"\n")
                if count >= limit:
                    return False
    except OSError:
        return False
    return True


def _machine_options(args: argparse.Namespace) -> None:
    """--encoding and --num-threads of predict and generate, checked before anything loads."""
    from hybridft.rowfiles import check_encoding

    problem = check_encoding(args.encoding)
    if problem:
        raise HybridFTError(f"--encoding: {problem}")
    if args.num_threads is not None:
        if args.num_threads < 1:
            raise HybridFTError(f"--num-threads must be at least 1, got {args.num_threads}")
        import torch

        torch.set_num_threads(args.num_threads)


def _predict(args: argparse.Namespace) -> int:
    _machine_options(args)
    from hybridft.hybrid import load_predictor, saved_text_columns
    from hybridft.predict import check_input, predict_file
    from hybridft.rowfiles import line_unit

    saved = saved_text_columns(args.model)
    if saved is not None:  # the file's mistakes are found before the models load
        check_input(args.input, args.output, text_column=args.text_column or saved[0],
                    text_pair_column=args.text_pair_column or saved[1], delimiter=args.delimiter,
                    skip_bad_rows=args.skip_bad_rows, quoting=args.quoting, encoding=args.encoding)
    model = load_predictor(args.model, _device_option(args.device))
    if args.student_onnx:
        from hybridft.export import OnnxClassifier

        onnx_student = OnnxClassifier(args.student_onnx)
        labels = [onnx_student.config.id2label[i] for i in range(onnx_student.config.num_labels)]
        if labels != model.label_names:
            raise HybridFTError(f"--student-onnx {args.student_onnx} predicts labels {labels}, but {args.model} "
                                f"has {model.label_names}; export the student of the same run")
        model.student = onnx_student
    if not args.no_prepack:
        if fewer_lines_than(args.input, PREPACK_MIN_ROWS):
            summary = (f"linear weights: plain (under {PREPACK_MIN_ROWS:,} input {line_unit(args.input)}s, timing prepacked weights "
                       f"would cost more than they save)")
        else:  # after the ONNX swap: an ONNX student is left to onnxruntime
            summary = model.prepack_summary(model.prepack())
        if not args.quiet:
            print(summary, file=sys.stderr)
    report = predict_file(model.predict_batch, args.input, args.output,
                          text_column=args.text_column or model.text_column,
                          text_pair_column=args.text_pair_column or model.text_pair_column, delimiter=args.delimiter,
                          quoting=args.quoting, batch_size=args.batch_size, skip_bad_rows=args.skip_bad_rows,
                          progress=not args.quiet, encoding=args.encoding)
    print(report.summary(with_teacher=model.teacher is not model.student))  # a single classifier has no teacher
    return 0


def _generate(args: argparse.Namespace) -> int:
    _machine_options(args)
    from hybridft.predict import check_input, predict_file
    from hybridft import speculative
    from hybridft.tasks import causal_lm

    batch_size_given = args.batch_size is not None
    args.batch_size = 8 if args.batch_size is None else args.batch_size
    if args.max_new_tokens < 1 or args.batch_size < 1:
        bad = [f"{name} {value}" for name, value in (("--max-new-tokens", args.max_new_tokens),
                                                        ("--batch-size", args.batch_size)) if value < 1]
        raise HybridFTError(f"{' and '.join(bad)}: must be at least 1")
    if not Path(args.model).is_dir():
        raise HybridFTError(f"--model {args.model} is not a folder; give a causal LM folder (e.g. OUTPUT_DIR/student "
                            f"of a causal_lm run)")
    # the file's mistakes are found before the models load (15 s for SmolLM2 and its draft)
    check_input(args.input, args.output, text_column=args.prompt_column, delimiter=args.delimiter,
                skip_bad_rows=args.skip_bad_rows, text_option="prompt_column", quoting=args.quoting,
                chat_messages=True, encoding=args.encoding)
    device = _device_option(args.device)
    folder = Path(args.model)
    if (folder / "hybrid.json").is_file() and not speculative.is_speculative_folder(folder):
        raise HybridFTError(f"--model {folder} is a classification hybrid; label texts with `hybridft predict --model "
                            f"{folder}`. generate takes a causal LM folder or the hybrid of a causal_lm run")
    speculative_hybrid = speculative.is_speculative_folder(folder)
    timed = worth_timing_setup(args.input, args.max_new_tokens, 1 if speculative_hybrid else args.batch_size)
    if not timed and not args.no_prepack and not args.quiet:
        print(f"setup: not timed (under {GENERATE_TIMING_MIN_PASSES} teacher passes of work: prepacked weights"
              f"{' and verification widths' if speculative_hybrid else ''} would cost more to time than they save)",
              file=sys.stderr)
    if speculative_hybrid:  # OUTPUT_DIR/hybrid: the teacher's greedy output, drafted
        hybrid = speculative.load_hybrid(folder).to(device)
        if args.no_prepack or not timed:
            hybrid.prepack_weights = False
        if not timed:
            hybrid.verify_padding = False
        tokenizer, stats = hybrid.tokenizer, speculative.SpeculativeStats()
        if batch_size_given and args.batch_size > 1 and not args.quiet:
            print(f"--batch-size {args.batch_size}: the speculative hybrid generates one prompt at a time (each "
                  f"accepts its own number of drafts); {args.batch_size} rows are written at a time", file=sys.stderr)
        started = time.perf_counter()
        hybrid.prepare()  # the draft's precision, prepacking, the timed verification widths: once, before row 1
        setup_s = time.perf_counter() - started

        def generate_batch(prompts: list[str], _pairs: Any) -> list[dict[str, Any]]:
            rows = []
            for p in prompts:  # batch 1: the accepted length differs per sequence
                ids = speculative.prompt_tensor(tokenizer, p, device)
                out, st = hybrid.generate(ids, args.max_new_tokens)
                stats.add(st)
                text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
                rows.append({"generation": text, "acceptance_rate": round(st.acceptance_rate, 4)})
            return rows
    else:
        stats = None
        model, tokenizer = causal_lm.load_model(args.model, None, "--model")  # type: ignore[arg-type]
        model.to(device).eval()
        if not args.no_prepack and timed:
            from hybridft.packed_linear import prepack_if_faster

            decision = prepack_if_faster(model, device)  # this model only generates from here on
            if not args.quiet:
                print(f"linear weights: {decision['reason']}", file=sys.stderr)

        def generate_batch(prompts: list[str], _pairs: Any) -> list[dict[str, Any]]:
            outputs = causal_lm.generate(model, tokenizer, prompts, args.max_new_tokens, device, args.batch_size)
            return [{"generation": o} for o in outputs]

    report = predict_file(generate_batch, args.input, args.output, text_column=args.prompt_column,
                          delimiter=args.delimiter, quoting=args.quoting,
                          batch_size=args.batch_size, skip_bad_rows=args.skip_bad_rows, progress=not args.quiet,
                          columns=("generation",) if stats is None else ("generation", "acceptance_rate"),
                          text_option="prompt_column", chat_messages=True, encoding=args.encoding)
    print(report.summary())
    if stats is not None and stats.drafted == 0:
        print("speculative decoding: nothing was drafted (every answer ended at its first token, which the "
              "teacher's pass over the prompt emits)")
    elif stats is not None:
        print(f"speculative decoding: {stats.acceptance_rate:.1%} of {stats.drafted} drafted tokens accepted, "
              f"{stats.tokens_per_teacher_pass:.2f} tokens per teacher pass"
              f"{speculative.drafting_note(stats.to_dict())}, "
              f"{stats.new_tokens / stats.seconds if stats.seconds else 0:.1f} tokens/s while generating "
              f"(after {setup_s:.1f} s of setup)"
              + (f"; the draft ran in {hybrid.prepared['precision']}; prepacked linear weights: teacher "
                 f"{'yes' if hybrid.prepared['packed']['teacher'] else 'no'}, draft "
                 f"{'yes' if hybrid.prepared['packed']['draft'] else 'no'}" if hybrid.prepared else ""))
    return 0


def _evaluate(run_dir: Path, quiet: bool) -> int:
    from dataclasses import replace

    from hybridft import pipeline
    from hybridft.config import load_config

    # a `run` writes config.yaml; `teacher` then `distill` into one folder write config.teacher.yaml and
    # config.distill.yaml, whose data section is the run's
    config = next((run_dir / n for n in ("config.yaml", "config.distill.yaml") if (run_dir / n).is_file()), None)
    if config is None:
        raise HybridFTError(f"{run_dir} is not a run folder (no config.yaml or config.distill.yaml); pass the "
                            f"output_dir of a run")
    cfg = load_config(config, ["progress=false"] if quiet else [])
    # The folder named here, not the output_dir its config.yaml recorded: a run that was moved or copied must not
    # write its report into the original.
    cfg = replace(cfg, output_dir=str(run_dir))
    ctx = pipeline.prepare(cfg, stage="evaluate", fresh=False)
    models: dict[str, Any] = {}
    for name in ("teacher", "student"):
        folder = run_dir / name
        if folder.is_dir():
            models[name] = ctx.task.load_model(str(folder), ctx.splits, name)
    if not models:
        raise HybridFTError(f"{run_dir} has neither teacher/ nor student/ to evaluate")
    previous = pipeline.read_summary(run_dir)
    saved_data = ctx.saved_data
    changed = pipeline.data_changes(saved_data, pipeline.data_record(ctx.splits)) if saved_data else []
    if changed:  # the kept entries (hybrid, export) were measured on the old data: they go, and the user is told
        print(f"hybridft: evaluate: {', '.join(changed)} changed since the run; summary.json now holds this "
              f"evaluation only", file=sys.stderr, flush=True)
        previous = {}
    summary = pipeline.evaluate(ctx, models, keep=previous)
    print_table(summary, str(run_dir))
    kept = [name for name in ("hybrid", "export") if name in previous]
    if kept:  # measured by the run, not again here: the table must not pass them off as this evaluation's
        print(f"({' and '.join(kept)}: the run's own numbers; evaluate measured the teacher and the student again)")
    return 0


def print_table(summary: dict[str, Any], run_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    if summary.get("task") == "causal_lm":
        return print_lm_table(summary, run_dir)

    table = Table(title=f"hybridft: {summary['split']} split, {summary['examples']} examples")
    for col in ("model", "accuracy", "macro-F1", "params", "non-emb. params", "samples/s (b=32)", "latency b=1"):
        table.add_column(col, justify="right")
    for name in ("teacher", "student"):
        if name in summary:
            r = summary[name]
            table.add_row(name, f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}", f"{r['params'] / 1e6:.1f}M",
                          f"{r['params_non_embedding'] / 1e6:.2f}M", f"{r['throughput_samples_per_s']:.0f}",
                          f"{r['latency_ms_batch1']:.1f} ms")
    for name, r in summary.get("export", {}).items():
        if name != "pytorch":
            table.add_row(f"student {name.replace('_', ' ')}", f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}",
                          f"{r['size_mb']} MB", "", f"{r['throughput_samples_per_s']:.0f}",
                          f"{r['latency_ms_batch1']:.1f} ms")
    if "hybrid" in summary:
        h = summary["hybrid"]
        table.add_row(f"hybrid ({h['teacher_fraction']:.0%} to teacher)", f"{h['accuracy']:.4f}", f"{h['macro_f1']:.4f}",
                      "both", "", f"{h['throughput_samples_per_s']:.0f}*", "")
    console = Console()
    console.print(table)
    if "comparison" in summary:
        c = summary["comparison"]
        # None when the teacher scores 0 (a broken or tiny test set): nothing to divide by
        kept = "n/a" if c.get("accuracy_retained") is None else f"{c['accuracy_retained']:.1%}"
        console.print(f"student keeps {kept} of the teacher's accuracy, is {c['speedup']:.1f}x "
                      f"faster at batch 32 and {c['latency_speedup']:.1f}x at batch 1, with "
                      f"{c['non_embedding_param_ratio']:.0%} of its non-embedding parameters")
    if "hybrid" in summary:
        h = summary["hybrid"]
        closed = f", closing {h['gap_closed']:.0%} of the student-teacher gap" if h.get("gap_closed") is not None else ""
        alone = (h.get("validation") or {}).get("teacher_fraction") == 0
        choice = ("the student answers every validation row alone" if alone else
                  f"threshold {h['threshold']:.4f} chosen on validation")  # a threshold below every confidence
        console.print(f"hybrid: {choice} for {_goal_words(h.get('goal') or {})}{closed}; "
                      f"* hybrid speed includes tokenisation and the teacher calls")
    folders = "teacher/, student/, hybrid/" if "hybrid" in summary else "teacher/, student/"
    console.print(f"outputs: {run_dir}/ (summary.json, {folders}, metrics.jsonl)")


def _device_option(name: str) -> Any:
    from hybridft.dist import pick_device

    return pick_device(name, option="--device")  # its errors name the option, not the config key


def _goal_words(goal: dict[str, Any]) -> str:
    """summary.json's hybrid goal in words: "a teacher budget of 30%" or "accuracy within 0.01 of the teacher"."""
    if goal.get("target_accuracy_within") is not None:
        return f"accuracy within {goal['target_accuracy_within']} of the teacher's"
    if goal.get("teacher_budget") is not None:
        spend = ", spent whole" if goal.get("spend_whole_budget") else ""
        return f"a teacher budget of {goal['teacher_budget']:.0%}{spend}"
    return str(goal)


def print_lm_table(summary: dict[str, Any], run_dir: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from rich import box

    # seven columns fit an 80-column terminal; parameters and size go on the line below the table
    table = Table(title=f"hybridft causal LM: {summary['split']} split, {summary['examples']} examples",
                  caption="next-token acc.: the share of the true response tokens each model predicts (agreement "
                          "with the teacher is below)", box=box.SIMPLE_HEAD)
    for col in ("model", "loss", "perplexity", "next-token\nacc.", "non-emb.\nparams", "tokens/s\nb=1",
                "tokens/s\nb=8"):
        table.add_column(col, justify="right", no_wrap=True)
    sizes = []
    for name in ("teacher", "student"):
        if name in summary:
            r = summary[name]
            table.add_row(name, f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['token_accuracy']:.4f}",
                          f"{r['params_non_embedding'] / 1e6:.1f}M", f"{r['generate_tokens_per_s_batch1']:.1f}",
                          f"{r['generate_tokens_per_s_batch8']:.1f}")
            sizes.append(f"{name} {r['params'] / 1e6:.1f}M parameters, {r['size_mb']} MB")
    console = Console()
    console.print(table)
    console.print("; ".join(sizes))
    c = summary.get("comparison")
    if c:
        console.print(f"student: perplexity {c['perplexity_ratio']:.2f}x the teacher's, agrees with its next token "
                      f"{c['next_token_agreement']:.1%} of the time, generates {c['generate_speedup_batch1']:.1f}x "
                      f"faster at batch 1 and {c['generate_speedup_batch8']:.1f}x at batch 8, with "
                      f"{c['non_embedding_param_ratio']:.0%} of its non-embedding parameters")
        for g in c["generations"]:
            console.print(f"[bold]prompt[/bold] {escape(repr(g['prompt']))}\n  teacher: {escape(repr(g['teacher']))}\n"
                          f"  student: {escape(repr(g['student']))}", markup=True, highlight=False)
    from hybridft.speculative import drafting_note

    h = summary.get("hybrid")
    if h and "unmeasured" in h:
        console.print(f"speculative hybrid: saved to {run_dir}/hybrid, not measured: {h['unmeasured']}")
    elif h and "skipped" not in h:
        hy, u = h["hybrid"], h.get("undistilled_hybrid")
        line = (f"speculative hybrid (the student drafts {h['draft_tokens']} token{'s' if h['draft_tokens'] != 1 else ''} per teacher pass, batch 1, "
                f"{h['prompts']} prompts): {h['matches_teacher']}/{h['prompts']} outputs equal the teacher's greedy "
                f"ones; {hy['acceptance_rate']:.1%} of drafts accepted; {hy['tokens_per_s']:.1f} tokens/s against "
                f"the teacher's {h['teacher']['tokens_per_s']:.1f} ({hy['speedup_vs_teacher']:.2f}x)"
                f"{drafting_note(hy)}")
        if u:
            line += (f"; undistilled draft: {u['acceptance_rate']:.1%} accepted, {u['tokens_per_s']:.1f} tokens/s "
                     f"({u['speedup_vs_teacher']:.2f}x){drafting_note(u)}")
        console.print(line)
    folders = "teacher/, student/, hybrid/" if h and "skipped" not in h else "teacher/, student/"
    console.print(f"outputs: {run_dir}/ (summary.json, {folders}, teacher_outputs.safetensors, metrics.jsonl)")
