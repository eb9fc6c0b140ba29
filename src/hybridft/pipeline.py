"""The hybrid fine-tuning pipeline, stage by stage:

    teacher          fine-tune the pretrained model on the labeled split (or use a fine-tuned one as is)
    teacher outputs  run the teacher once over labeled + unlabeled training text; store the logits on disk
    distill          train the student on alpha * KD + beta * CE from the stored logits (joint or sequential)
    evaluate         teacher and student on the test split: quality, size and speed, into summary.json

`run` chains them; the CLI exposes each one for users who already have a teacher or stored logits.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from hybridft import dist
from hybridft.config import RunConfig, from_dict, save_config, student_best_metric, student_num_layers, to_dict
from hybridft.data import Examples, Splits, split_path_spec
from hybridft.dist import pick_device, seed_everything
from hybridft.errors import HybridFTError
from hybridft.losses import IGNORE_INDEX, LossWeights
from hybridft.models import check_max_length, check_student, read_config, set_dropout
from hybridft import precision as precision_module
from hybridft.precision import PrecisionChoice
from hybridft.precision import choose as choose_precision
from hybridft.runlog import MetricsWriter
from hybridft.tasks import TASKS
from hybridft.teacher_outputs import compute, default_cache_dir, fingerprint, read_store
from hybridft.train import fit

RUN_MARKERS = ("config.yaml", "summary.json", "teacher", "student", "metrics.jsonl", "data.json")
# What each stage writes into output_dir (with the temporary names of interrupted saves): what --overwrite clears
# before the new run writes anything, so that a finished or interrupted new run never sits beside the old run's
# hybrid/, export/ or checkpoints, which `predict` and `--resume` would otherwise take for the new run's.
STUDENT_OUTPUTS = ("student", "student.tmp", "config.distill.yaml", "checkpoints/student", "teacher_outputs.safetensors",
                   "summary.json", "summary.json.tmp", "hybrid", "hybrid.tmp", "export", "hybrid_curve.json",
                   "hybrid_curve.png")
RUN_OUTPUTS = ("config.yaml", "config.before-resume.yaml", "config.teacher.yaml", "data.json", "metrics.jsonl",
               "teacher", "teacher.tmp", "checkpoints", *STUDENT_OUTPUTS)


@dataclass
class Context:
    cfg: RunConfig
    run_dir: Path
    device: torch.device
    splits: Splits
    writer: MetricsWriter
    stage: str = "run"
    fresh: bool = True
    resume: bool = False
    overwrite: bool = False
    """--overwrite: `commit` first clears what an earlier run wrote here (`clear_previous_run`)."""
    store_path: Optional[Path] = None
    """The teacher-output store the student learns from, copied into the run once it is committed."""
    committed: bool = False
    precision: Optional[PrecisionChoice] = None
    """How `precision: auto` was settled (None when the config or the Accelerate config named a precision)."""
    saved_data: Optional[dict[str, Any]] = None
    """The run's data.json, read once by `prepare` for --resume and `evaluate` (None otherwise, or without one)."""

    @property
    def task(self) -> Any:
        """The task module, `TASKS[cfg.task]`: the only place the pipeline learns which task it runs."""
        return TASKS[self.cfg.task]

    def log(self, message: str) -> None:
        if self.cfg.progress:  # off on all but the main process (prepare)
            print(f"[hybridft] {message}", flush=True)

    def commit(self) -> None:
        """Mark the folder as a run, once every input has been checked and real work is about to start: an
        input error never leaves a half-made run behind, and never touches an existing one."""
        if self.committed or not self.fresh or not dist.is_main():
            return
        if self.overwrite:
            removed, kept = clear_previous_run(self.run_dir, self.stage, paths_read(self.cfg))
            # said even with --quiet, as the data notes are: files were deleted
            if removed:
                print(f"hybridft: --overwrite: removed the previous run's {', '.join(removed)} from {self.run_dir}",
                      file=sys.stderr, flush=True)
            for name, key in kept:
                print(f"hybridft: --overwrite: kept {name}, which {key} reads", file=sys.stderr, flush=True)
            if self.stage == "distill":  # metrics.jsonl keeps the teacher's history, not the replaced student's
                self.writer.drop_after("student", -1)
        save_config(self.cfg, self.run_dir / ("config.yaml" if self.stage == "run" else f"config.{self.stage}.yaml"))
        if self.stage == "run":  # what --resume checks the data against, and where relative data paths start
            record = {**data_record(self.splits), "cwd": os.getcwd()}
            (self.run_dir / DATA_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")
        self.committed = True


DATA_RECORD = "data.json"


def paths_read(cfg: RunConfig) -> dict[str, Path]:
    """The files and folders a run reads, by config key (models, stores, data): --overwrite never removes them."""
    keys = {"teacher.model": cfg.teacher.model, "student.model": cfg.student.model,
            "distill.teacher_logits": cfg.distill.teacher_logits, "distill.cache_dir": cfg.distill.cache_dir,
            "data.train": cfg.data.train,
            "data.validation": cfg.data.validation, "data.test": cfg.data.test, "data.unlabeled": cfg.data.unlabeled}
    return {key: split_path_spec(value)[0] if key.startswith("data.") else Path(value)
            for key, value in keys.items() if isinstance(value, str) and value}


def clear_previous_run(run_dir: Path, stage: str, reads: dict[str, Path]) -> tuple[list[str], list[tuple[str, str]]]:
    """Remove what an earlier run wrote into `run_dir`: every output for a run or teacher stage (a new teacher makes
    the old student stale), the student stage's outputs for `hybridft distill` (the teacher stays). Anything a
    config key reads (`reads`), or holds it, is kept. Files hybridft does not write are never touched.
    Returns (the names removed, [(a name kept, the key that reads it)])."""
    removed, kept = [], []
    resolved = {key: p.resolve() for key, p in reads.items()}
    for name in (STUDENT_OUTPUTS if stage == "distill" else RUN_OUTPUTS):
        target = run_dir / name
        if not (target.exists() or target.is_symlink()):
            continue
        full = target.resolve()
        readers = [key for key, p in resolved.items() if p == full or full in p.parents]
        if readers:
            kept.append((name, readers[0]))
            continue
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
        removed.append(name)
    return removed, kept


def data_record(splits: Splits) -> dict[str, Any]:
    """The label names and a digest of every split's rows (texts, pairs and labels), in order."""
    import hashlib

    record: dict[str, Any] = {"labels": splits.label_names}
    for name in ("train", "validation", "test", "unlabeled"):
        examples = getattr(splits, name)
        if examples is not None:
            h = hashlib.sha256()
            for key, label in zip(examples.keys(), examples.labels):
                h.update(f"{key}:{label};".encode())
            record[name] = {"rows": len(examples), "sha256": h.hexdigest()}
    return record


def check_resume_data(saved: Optional[dict[str, Any]], splits: Splits) -> None:
    """A resume keeps the finished stages, so the data must be the data they were trained on (`saved`, the run's
    data.json): a class added to the training file would otherwise meet a teacher with a fresh random head, and
    the summary would compare the student with it."""
    if saved is None:
        return  # a run from before this record existed: nothing to compare with
    now = data_record(splits)
    if saved.get("labels") != now["labels"]:
        raise HybridFTError(f"--resume: the data's labels are now {now['labels']}, but the run was trained on "
                            f"{saved.get('labels')}; start a new run (another output_dir, or --overwrite)")
    changed = data_changes(saved, now)
    if changed:
        raise HybridFTError(f"--resume: the rows of {', '.join(changed)} differ from the ones the run started "
                            f"with; resume with the same data, or start a new run")


def saved_data_record(run_dir: Path) -> Optional[dict[str, Any]]:
    """The run's data.json (what `data_record` wrote when it started), or None for a run without one."""
    saved_file = run_dir / DATA_RECORD
    return json.loads(saved_file.read_text(encoding="utf-8")) if saved_file.is_file() else None


DATA_PATH_KEYS = ("dataset", "train", "validation", "test", "unlabeled")


def data_paths_from_run_folder(cfg: RunConfig, saved: Optional[dict[str, Any]]) -> RunConfig:
    """`cfg` (a run's saved config) with each relative data path that is missing from the current folder read
    from the folder the run started in (`saved`, the run's data.json: its `cwd`), where it is there: `hybridft
    evaluate --run DIR` and `hybridft run output_dir=DIR --resume` from another folder then find the run's files.
    The rows are still checked against data.json."""
    started = (saved or {}).get("cwd")
    if not started:
        return cfg
    moved = {}
    for key in DATA_PATH_KEYS:
        value = getattr(cfg.data, key)
        if value and not Path(value).is_absolute() and not Path(value).exists() and (Path(started) / value).exists():
            moved[key] = str(Path(started) / value)
    return replace(cfg, data=replace(cfg.data, **moved)) if moved else cfg


def data_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The splits whose rows differ between two data records, as "data.test (80 -> 70 rows)"."""
    return [f"data.{name} ({saved.get(name, {}).get('rows', 0)} -> {now.get(name, {}).get('rows', 0)} rows)"
            for name in ("train", "validation", "test", "unlabeled") if saved.get(name) != now.get(name)]


def config_changes(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


_ABSENT = object()


def _lookup(tree: Any, dotted: str) -> Any:
    """The value at a dotted key of a nested dict, or `_ABSENT`."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


MACHINE_SETTINGS = ("progress", "num_threads", "output_dir")
"""Config keys a resumed run may change freely: how it shows progress, how many CPU threads it uses, and the
folder it lives in (a run moved or copied elsewhere resumes there)."""


def check_resume(cfg: RunConfig, run_dir: Path, force: bool) -> list[str]:
    """The keys in which `cfg` differs from the run's config.yaml (machine settings aside). Raises HybridFTError
    when there is no run to resume, or when keys differ and not `force`."""
    import yaml

    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file():
        raise HybridFTError(f"--resume: {run_dir} holds no run to resume (no config.yaml); drop --resume to start one")
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8"))
    now = to_dict(cfg)
    changed = [k for k in config_changes(saved, now) if k not in MACHINE_SETTINGS]
    # A run begun by an earlier hybridft lacks the settings added since: at their defaults they are no change
    # (an upgrade mid-run must not block --resume), set to anything else they are one.
    defaults = to_dict(from_dict({"task": cfg.task}))
    added = [k for k in changed if _lookup(saved, k) is _ABSENT and _lookup(now, k) == _lookup(defaults, k)]
    if added and dist.is_main():
        print(f"hybridft: --resume: {run_dir} was begun by a hybridft without {', '.join(added)}; "
              f"{'they take their defaults' if len(added) > 1 else 'it takes its default'}", file=sys.stderr,
              flush=True)
    changed = [k for k in changed if k not in added]
    if changed and not force:
        raise HybridFTError(f"--resume: the config differs from the run's config.yaml in {', '.join(changed)}; "
                            f"resume with the same settings, or pass --force to continue anyway")
    return changed


def record_forced_resume(cfg: RunConfig, run_dir: Path, changed: list[str]) -> None:
    """A resume forced past changed settings continues under them, so config.yaml must say so (a later --resume
    or `evaluate` reads it): the previous file is kept beside it as config.before-resume.yaml."""
    os.replace(run_dir / "config.yaml", run_dir / "config.before-resume.yaml")
    save_config(cfg, run_dir / "config.yaml")
    print(f"hybridft: --resume --force: continuing with changed {', '.join(changed)}; config.yaml now records "
          f"them (the previous one is config.before-resume.yaml)", file=sys.stderr, flush=True)


def launch_settings(cfg: RunConfig) -> RunConfig:
    """Under `accelerate launch`, the Accelerate config decides mixed precision and gradient accumulation.

    `accelerate launch` passes them as ACCELERATE_MIXED_PRECISION (always set; "no" means the config leaves
    it to us) and ACCELERATE_GRADIENT_ACCUMULATION_STEPS (DeepSpeed configs, or set by hand). The effective
    values are written into the run's config.yaml, so a resume under another setting is caught.
    """
    wanted = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    notes = []
    if wanted not in ("no", "bf16", "fp16"):
        raise HybridFTError(f"the Accelerate config asks for mixed_precision={wanted}; hybridft supports no, bf16 "
                            f"and fp16: change it with `accelerate config` or --mixed_precision")
    precision = {"no": cfg.precision, "bf16": "bf16", "fp16": "fp16"}[wanted]
    if precision != cfg.precision:
        notes.append(f"precision={precision} (the config said {cfg.precision})")
    cfg = replace(cfg, precision=precision)
    steps = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if steps is not None:
        if not steps.isdigit() or int(steps) < 1:
            raise HybridFTError(f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS={steps!r} is not a positive whole number; "
                                f"fix it in the Accelerate config or the environment")
        for name in ("teacher", "student"):
            stage_cfg = getattr(cfg, name)
            if stage_cfg.train.grad_accum != int(steps):
                notes.append(f"{name}.train.grad_accum={steps} (the config said {stage_cfg.train.grad_accum})")
            cfg = replace(cfg, **{name: replace(stage_cfg, train=replace(stage_cfg.train, grad_accum=int(steps)))})
    if notes and int(os.environ.get("RANK", "0")) == 0:
        print(f"hybridft: following the Accelerate config: {'; '.join(notes)}", file=sys.stderr)
    return cfg


def resolve_precision(cfg: RunConfig, resumed_run: Optional[Path], timed: bool = True
                      ) -> tuple[RunConfig, Optional[PrecisionChoice]]:
    """Settle `precision: auto` before the Accelerator is made (it fixes the precision for the process)."""
    if cfg.precision != "auto":
        if cfg.precision == "bf16" and cfg.device != "cuda" and not torch.cuda.is_available() and \
                precision_module.emulates_bf16():
            print("hybridft: warning: precision=bf16 on a CPU without bf16 instructions is emulated and several "
                  "times slower than fp32; use precision=auto or fp32", file=sys.stderr, flush=True)
        return cfg, None
    saved = resumed_run / "config.yaml" if resumed_run is not None else None
    if saved is not None and saved.is_file():
        import yaml

        before = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("precision")
        if before in ("fp32", "bf16", "fp16"):
            return replace(cfg, precision=before), PrecisionChoice(before, "the run being resumed chose it")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    model_config = None
    if timed and not cuda:
        try:
            model_config = read_config(TASKS[cfg.task].teacher_path(cfg))
        except HybridFTError:
            model_config = None  # a bad teacher.model is reported where it is loaded, in one line
    choice = choose_precision("cuda" if cuda else "cpu", model_config, cfg.data.max_length,
                              processes=dist.world_size_from_env())
    return replace(cfg, precision=choice.precision), choice


def prepare(cfg: RunConfig, overwrite: bool = False, stage: str = "run", fresh: bool = True,
            resume: bool = False, force: bool = False) -> Context:
    """Check the output folder and read the data before any work starts, so bad input fails in seconds and
    an existing run is never overwritten by accident."""
    cfg = launch_settings(cfg)
    run_dir = Path(cfg.output_dir)
    cfg, precision = resolve_precision(cfg, run_dir if resume else None, timed=stage != "evaluate")
    device = pick_device(cfg.device, cfg.precision)  # creates the Accelerator: joins the process group
    if not dist.is_main():
        cfg = replace(cfg, progress=False)
    if resume:
        forced = check_resume(cfg, run_dir, force)
        fresh = False
    # `hybridft distill` into the folder of `hybridft teacher` is that run's second stage: only a student is replaced
    markers = ("student", "summary.json") if stage == "distill" else RUN_MARKERS
    if fresh and run_dir.exists() and any((run_dir / m).exists() for m in markers) and not overwrite:
        held = "a student" if stage == "distill" else "a run"
        # a `run` writes summary.json last (the stage commands write none): a run folder without it was interrupted
        if stage == "run" and (run_dir / "config.yaml").is_file() and not (run_dir / "summary.json").exists():
            raise HybridFTError(f"output_dir {run_dir} holds an unfinished run; continue it with --resume, or choose "
                                f"another output_dir, or pass --overwrite to replace it")
        raise HybridFTError(f"output_dir {run_dir} already holds {held}; choose another output_dir or pass "
                            f"--overwrite to replace it")
    if run_dir.exists() and not run_dir.is_dir():
        raise HybridFTError(f"output_dir {run_dir} is a file; choose a folder path")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise HybridFTError(f"output_dir {run_dir} is not writable ({e.strerror}); choose a writable folder") from None
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    task = TASKS[cfg.task]
    # a run resumed or evaluated from another folder reads its relative data paths from where it started
    saved_data = saved_data_record(run_dir) if resume or stage == "evaluate" else None
    splits = task.load_splits(data_paths_from_run_folder(cfg, saved_data), cfg.seed)
    if dist.is_main():  # what reading the data changed is said even with --quiet
        for note in splits.notes:
            print(f"hybridft: {note}", file=sys.stderr, flush=True)
    if resume:
        check_resume_data(saved_data, splits)
        if forced and dist.is_main():
            record_forced_resume(cfg, run_dir, forced)
    if fresh and stage != "evaluate":  # the student's settings fail now, not after the teacher stage wrote files
        student, teacher_path = cfg.student, task.teacher_path(cfg)
        student_path = task.resolve_model_path(student.model) if student.model else None
        check_student(student.layers, student_num_layers(cfg), teacher_path, student_path)
        if not cfg.distill.teacher_logits or not student_path:  # the teacher's weights will be loaded
            check_max_length(cfg.data.max_length, teacher_path, "teacher.model")
        if student_path:
            check_max_length(cfg.data.max_length, str(Path(student_path).parent) if student_path.endswith(".json")
                             else student_path, "student.model")
    if precision is not None and dist.is_main() and cfg.progress:
        print(f"[hybridft] precision: {precision.precision} ({precision.reason})", flush=True)
    return Context(cfg=cfg, run_dir=run_dir, device=device, splits=splits, precision=precision,
                   writer=MetricsWriter(run_dir / "metrics.jsonl" if dist.is_main() else None), stage=stage,
                   fresh=fresh, resume=resume, overwrite=overwrite and fresh, saved_data=saved_data)


# ---------------------------------------------------------------------------------------------------
# stage 1: the teacher


def load_teacher(ctx: Context) -> tuple[nn.Module, Any, bool]:
    """The teacher, its tokenizer, and whether it still needs fine-tuning."""
    return ctx.task.load_teacher(ctx.cfg, ctx.splits)


def check_test_split(ctx: Context, tokenizer: Any) -> None:
    """Tokenise the test split before training, so a bad test row fails now rather than after training."""
    if ctx.splits.test is not None:
        ctx.task.encode(ctx.splits.test, tokenizer, ctx.cfg.data.max_length)


def check_splits(ctx: Context, tokenizer: Any) -> None:
    """Tokenise every split before the run folder is written (a teacher used as it is trains nothing first)."""
    s = ctx.splits
    for examples in (s.train, s.validation, s.unlabeled):
        if examples is not None:
            ctx.task.encode(examples, tokenizer, ctx.cfg.data.max_length)
    check_test_split(ctx, tokenizer)


def train_teacher(ctx: Context) -> tuple[nn.Module, Any]:
    cfg, s, task = ctx.cfg, ctx.splits, ctx.task
    done = ctx.run_dir / "teacher"
    if ctx.resume and (done / "model.safetensors").is_file():
        ctx.log(f"resuming: the teacher stage is done ({done})")
        teacher, tokenizer = task.load_model(str(done), s, "teacher")
        return teacher.eval().requires_grad_(False), tokenizer
    teacher, tokenizer, needs_finetune = load_teacher(ctx)
    if needs_finetune:
        ctx.log(f"fine-tuning the teacher on {len(s.train)} labeled examples")
        train_items = task.encode(s.train, tokenizer, cfg.data.max_length)
        val_items = task.encode(s.validation, tokenizer, cfg.data.max_length)
        check_test_split(ctx, tokenizer)
        ctx.commit()
        result = fit(teacher, train_items, val_items, task=task, collate=task.make_collate(tokenizer),
                     tc=cfg.teacher.train, weights=task_weights(cfg, alpha=0.0, beta=1.0), device=ctx.device,
                     precision=cfg.precision, seed=cfg.seed, writer=ctx.writer, stage="teacher",
                     progress=cfg.progress, checkpoint_dir=ctx.run_dir / "checkpoints" / "teacher",
                     resume=ctx.resume)
        teacher = result.model  # a fresh unwrapped copy under FSDP
        ctx.log(f"teacher: validation {result.best_key} {result.best_metric:.4f}, the weights of step {result.best_step} of "
                f"{result.steps} kept ({result.describe()})")
    else:
        ctx.log("the teacher is used as it is (teacher.finetune)")
        check_splits(ctx, tokenizer)
        ctx.commit()
    teacher.eval().requires_grad_(False)
    if dist.is_main():
        task.save_model(teacher, tokenizer, ctx.run_dir / "teacher")
    dist.barrier()
    return teacher, tokenizer


# ---------------------------------------------------------------------------------------------------
# stage 2: teacher outputs


def augment(ctx: Context, teacher: nn.Module, tokenizer: Any) -> None:
    """Once the teacher is ready, let it extend the transfer set: classification adds generated texts
    (`cfg.augment`) to the unlabeled pool; causal_lm trains on the teacher's responses (`distill.sequence`)."""
    ctx.splits = ctx.task.augment(ctx.splits, teacher, tokenizer, ctx.cfg, ctx.log, device=ctx.device,
                                  teacher_folder=teacher_folder(ctx), cache_dir=store_dir(ctx.cfg))


def store_dir(cfg: RunConfig) -> Path:
    """Where teacher outputs (and teacher generations) are stored and reused across runs."""
    return Path(cfg.distill.cache_dir) if cfg.distill.cache_dir else default_cache_dir()


def teacher_outputs(ctx: Context, teacher: nn.Module, tokenizer: Any) -> Any:
    """Stored teacher outputs for the transfer set: reused when teacher, data and settings are unchanged."""
    cfg, task = ctx.cfg, ctx.task
    examples = task.transfer_set(ctx.splits)
    keys = examples.keys()
    # The main process decides, and its store is shared: the default cache is under $HOME, which on several
    # machines is a different folder on each. The teacher folder was saved on the main process.
    fp = dist.from_main(lambda: fingerprint(teacher_folder(ctx), tokenizer, task.store_settings(cfg), keys))
    cached = store_dir(cfg) / f"{fp}.safetensors"
    if dist.from_main(cached.is_file):
        ctx.log(f"reusing stored teacher outputs {cached}")
    else:
        start = time.perf_counter()
        items = task.encode(examples, tokenizer, cfg.data.max_length)
        rows = compute(teacher, items, task.make_collate(tokenizer), ctx.device, cfg.precision, task.summarise(cfg),
                       batch_size=cfg.distill.batch_size, progress=cfg.progress)
        if dist.is_main():
            task.write_outputs(cached, keys, rows, ctx.splits, cfg, fp)
        dist.barrier()
        ctx.log(f"teacher outputs for {len(keys)} examples in {time.perf_counter() - start:.1f} s -> {cached}")
    store = dist.from_main(lambda: read_store(cached))  # read back: checked as any store is
    ctx.store_path = cached  # copied into the run by `distill`, after the run is committed
    return store


def teacher_folder(ctx: Context) -> Path:
    """The teacher whose outputs are stored: the run's saved teacher, else the folder `teacher.model` names."""
    saved = ctx.run_dir / "teacher"
    return saved if saved.is_dir() else Path(ctx.task.teacher_path(ctx.cfg))


def task_weights(cfg: RunConfig, alpha: float, beta: float) -> LossWeights:
    loss = cfg.loss
    return LossWeights(alpha, beta, loss.temperature, divergence=loss.divergence, jsd_beta=loss.jsd_beta,
                       chunk_rows=loss.chunk_rows if cfg.task == "causal_lm" else None, tail=loss.topk_tail)


# ---------------------------------------------------------------------------------------------------
# stage 3: the student


def student_dropout(cfg: RunConfig) -> Optional[float]:
    """The student's dropout probability while it trains, or None for the model's own (`student.dropout`)."""
    if cfg.student.dropout == "auto":
        return 0.0 if cfg.loss.alpha > 0 else None
    return cfg.student.dropout


def teacher_validation_logits(ctx: Context, teacher: Optional[nn.Module], tokenizer: Any,
                              metric: str) -> Optional[torch.Tensor]:
    """The teacher's logits [N, C] on the validation split when the student's weights are chosen by their KL to
    it (`metric` "kl"), else None: one teacher pass over validation, as the store's pass runs."""
    cfg = ctx.cfg
    if metric != "kl":
        return None
    if teacher is None:  # the config refuses this (distill.teacher_logits with student.model); the API may not
        raise HybridFTError("student.train.best_metric=kl needs the teacher's weights; choose loss or accuracy")
    items = ctx.task.encode(ctx.splits.validation, tokenizer, cfg.data.max_length)
    rows = compute(teacher, items, ctx.task.make_collate(tokenizer), ctx.device, cfg.precision,
                   ctx.task.summarise(cfg), batch_size=cfg.distill.batch_size)
    return torch.stack(rows)


def distill(ctx: Context, store: Any, teacher: Optional[nn.Module], teacher_tokenizer: Any) -> tuple[nn.Module, Any]:
    """Train the student from stored outputs (or, online, from the live teacher)."""
    cfg, s, task = ctx.cfg, ctx.splits, ctx.task
    student, tokenizer = task.build_student(cfg, teacher, teacher_tokenizer, s)
    dropout = student_dropout(cfg)
    if dropout is not None:
        changed = set_dropout(student, dropout)  # Llama-style models read it from their config: no modules
        ctx.log(f"student dropout set to {dropout:g}" + (f" in {changed} modules" if changed else " in its config"))
    online = teacher if cfg.distill.online else None
    examples, targets = task.training_examples(s, None if online else store, cfg, ctx.log)
    train_items = task.encode(examples, tokenizer, cfg.data.max_length, targets)
    # which validation metric picks the student's weights (`auto`: its KL to the teacher when it learns from one)
    tc = replace(cfg.student.train, best_metric=student_best_metric(cfg, teacher is not None))
    val_items = task.encode(s.validation, tokenizer, cfg.data.max_length,
                            teacher_validation_logits(ctx, teacher, teacher_tokenizer, tc.best_metric))
    check_test_split(ctx, tokenizer)
    loss = cfg.loss
    # --- intermediate-layer distillation (issue 10): KD keeps reading the store, and the teacher runs beside the
    # student for its hidden states (online, that one teacher pass also gives the KD targets)
    inter = None
    if loss.hidden_weight > 0 or loss.attention_weight > 0:
        from hybridft import inter_losses

        if teacher is None:
            raise HybridFTError("loss.hidden_weight and loss.attention_weight need the teacher's weights; set them to 0")
        layers = inter_losses.mapped_layers(None if cfg.student.model else cfg.student.layers,
                                            teacher.config.num_hidden_layers, student.config.num_hidden_layers)
        same = tokenizer is teacher_tokenizer or tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
        inter = inter_losses.build(student, teacher, layers, hidden_weight=loss.hidden_weight,
                                   attention_weight=loss.attention_weight, same_tokenizer=same, seed=cfg.seed)
        ctx.log(f"intermediate-layer terms: hidden_weight={loss.hidden_weight}, attention_weight="
                f"{loss.attention_weight}, student layers matched to teacher layers {layers}"
                f"{' through a learned width projection' if inter.projection is not None else ''}")
    # --- end of intermediate-layer distillation
    ctx.commit()
    if ctx.store_path is not None and dist.is_main():
        shutil.copyfile(ctx.store_path, ctx.run_dir / "teacher_outputs.safetensors")
    collate = task.make_collate(tokenizer)
    common = dict(task=task, collate=collate, device=ctx.device, precision=cfg.precision,
                  seed=cfg.seed, writer=ctx.writer, progress=cfg.progress, teacher=online, resume=ctx.resume)
    checkpoints = ctx.run_dir / "checkpoints"
    ctx.log(f"distilling a {task.count_params(student)['params'] / 1e6:.1f}M-parameter student on "
            f"{len(train_items)} examples ({loss.strategy}, alpha={loss.alpha}, beta={loss.beta}, T={loss.temperature})")
    if loss.strategy == "joint":
        result = fit(student, train_items, val_items, tc=tc,
                     weights=task_weights(cfg, loss.alpha, loss.beta), stage="student",
                     checkpoint_dir=checkpoints / "student", inter=inter, **common)
    else:
        # Phase 1 learns from the teacher alone (all rows); phase 2 fine-tunes on the true labels only.
        student = fit(student, train_items, val_items, tc=tc,
                      weights=task_weights(cfg, max(loss.alpha, 1e-12), 0.0), stage="student-kd",
                      checkpoint_dir=checkpoints / "student-kd", inter=inter, **common).model
        if inter is not None:
            inter_losses.detach(student)  # the CE phase trains the student alone
        labeled = [it for it in train_items if it["labels"] != IGNORE_INDEX]
        result = fit(student, labeled, val_items, tc=replace(tc, epochs=loss.sequential_ce_epochs),
                     weights=task_weights(cfg, 0.0, max(loss.beta, 1e-12)), stage="student-ce",
                     checkpoint_dir=checkpoints / "student-ce", **{**common, "teacher": None})
    student = result.model  # a fresh unwrapped copy under FSDP
    if inter is not None:
        inter_losses.detach(student)  # the learned width projection served training only
    ctx.log(f"student: validation {result.best_key} {result.best_metric:.4f}, the weights of step {result.best_step} of "
            f"{result.steps} kept ({result.describe()})")
    if dist.is_main():
        task.save_model(student, tokenizer, ctx.run_dir / "student")
    dist.barrier()
    return student, tokenizer


# ---------------------------------------------------------------------------------------------------
# stage 4: evaluation


def evaluate(ctx: Context, models: dict[str, tuple[nn.Module, Any]], keep: Optional[dict[str, Any]] = None
             ) -> dict[str, Any]:
    """Measure each model on the test split (validation if there is none) and write summary.json. `keep`: an
    earlier summary whose other entries (hybrid, export, stage times, ...) are kept, for `hybridft evaluate`."""
    cfg, s, task = ctx.cfg, ctx.splits, ctx.task
    split_name, examples = ("test", s.test) if s.test is not None else ("validation", s.validation)
    summary: dict[str, Any] = dict(keep or {})
    summary.update({"task": cfg.task, "split": split_name, "examples": len(examples),
                    "labels": s.label_names, "device": str(ctx.device)})
    for name, (model, tokenizer) in models.items():
        model.to(ctx.device)  # a teacher read from disk (finetune=never, reused outputs, resume) is still on the CPU
        summary[name] = task.report(model, tokenizer, examples, s, cfg, ctx.device, folder=ctx.run_dir / name)
    if "teacher" in summary and "student" in summary:
        summary["comparison"] = task.compare(summary["teacher"], summary["student"])
    for name in models:  # working values a report hands to `compare` (e.g. per-token predictions)
        summary[name] = {k: v for k, v in summary[name].items() if not k.startswith("_")}
    write_summary(ctx.run_dir, summary)
    return summary


def read_summary(run_dir: Path) -> dict[str, Any]:
    """The run's summary.json, or {} when it has none or it cannot be read (a report is then written anew)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    os.replace(tmp, run_dir / "summary.json")


# ---------------------------------------------------------------------------------------------------
# stage 5: the hybrid model


def split_logits(ctx: Context, model: nn.Module, tokenizer: Any, examples: Examples) -> tuple[torch.Tensor, torch.Tensor]:
    from hybridft.tasks.classification import predict_examples

    return predict_examples(model, tokenizer, examples, ctx.cfg.data.max_length, ctx.cfg.eval.batch_size, ctx.device)


def build_hybrid(ctx: Context, teacher: tuple[nn.Module, Any], student: tuple[nn.Module, Any]) -> dict[str, Any]:
    """Calibrate both models and choose the threshold on validation; report on test; save OUTPUT_DIR/hybrid."""
    from hybridft import hybrid as hy

    cfg, s, h = ctx.cfg, ctx.splits, ctx.cfg.hybrid
    test = s.test if s.test is not None else s.validation
    sv, yv = split_logits(ctx, *student, s.validation)  # [N_val, C], [N_val]
    tv, _ = split_logits(ctx, *teacher, s.validation)
    st, yt = split_logits(ctx, *student, test)
    tt, _ = split_logits(ctx, *teacher, test)
    t_s, t_t = hy.fit_temperature(sv, yv), hy.fit_temperature(tv, yv)

    def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
        return float((logits.argmax(-1) == labels).float().mean())

    def curve(s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor) -> list[dict[str, float]]:
        conf = hy.confidence(s_logits, t_s, h.confidence)
        return hy.cascade_curve(conf, s_logits.argmax(-1), t_logits.argmax(-1), labels)

    curve_val, curve_test = curve(sv, tv, yv), curve(st, tt, yt)
    teacher_val_acc = accuracy(tv, yv)
    if h.target_gap is not None:
        goal = {"target_accuracy_within": h.target_gap}
        chosen = hy.choose_threshold(curve_val, target_accuracy=teacher_val_acc - h.target_gap)
    else:
        goal = {"teacher_budget": h.teacher_budget, "spend_whole_budget": h.spend_whole_budget}
        chosen = hy.choose_threshold(curve_val, teacher_budget=h.teacher_budget,
                                     spend_whole_budget=h.spend_whole_budget)
    on_test = hy.apply_threshold(st, tt, yt, chosen["threshold"], t_s, h.confidence)
    gap_point = hy.choose_threshold(curve_val, target_accuracy=teacher_val_acc - h.report_gap)
    gap_on_test = hy.apply_threshold(st, tt, yt, gap_point["threshold"], t_s, h.confidence)

    model = hy.HybridModel(student[0], student[1], teacher[0], teacher[1], s.label_names, threshold=chosen["threshold"],
                           student_temperature=t_s, teacher_temperature=t_t, confidence_kind=h.confidence,
                           max_length=cfg.data.max_length, device=ctx.device,
                           teacher_budget=None if h.target_gap is not None else h.teacher_budget,
                           text_column=cfg.data.text_column, text_pair_column=cfg.data.text_pair_column)
    start = time.perf_counter()
    pred = model.predict(test.texts, test.pairs, batch_size=cfg.eval.batch_size)
    throughput = len(test) / (time.perf_counter() - start)
    metrics = ctx.task.compute_metrics(pred.probs, torch.tensor(test.labels), s.label_names, full=True)
    by_call_size = {}  # a serving process sees the test rows in calls of some size: the answers must not change
    for size in (1, 256):
        model.reset_budget()
        parts = [model.predict(test.texts[i:i + size], None if test.pairs is None else test.pairs[i:i + size])
                 for i in range(0, len(test), size)]
        labels = torch.cat([p.label_ids for p in parts])
        by_call_size[f"calls_of_{size}"] = {
            "accuracy": float((labels == torch.tensor(test.labels)).float().mean()),
            "teacher_fraction": sum(p.answered_by.count("teacher") for p in parts) / max(len(test), 1)}
    model.reset_budget()
    # the run saved these two models already: hybrid/ links their files instead of holding a second copy
    model.save(ctx.run_dir / "hybrid", saved={"student": ctx.run_dir / "student", "teacher": ctx.run_dir / "teacher"})

    student_acc, teacher_acc = accuracy(st, yt), accuracy(tt, yt)
    gap = teacher_acc - student_acc
    result = {
        "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
        "teacher_fraction": pred.answered_by.count("teacher") / max(len(test), 1),
        "threshold": chosen["threshold"], "confidence": h.confidence, "goal": goal, **by_call_size,
        "throughput_samples_per_s": round(throughput, 1),
        "student_temperature": round(t_s, 4), "teacher_temperature": round(t_t, 4),
        "gap_closed": round((metrics["accuracy"] - student_acc) / gap, 4) if gap > 0 else None,
        "teacher_budget_cap": model.teacher_budget,
        "threshold_only": on_test,  # the same threshold without the budget cap: how far the test split shifts
        "validation": {"accuracy": chosen["accuracy"], "teacher_fraction": chosen["teacher_fraction"],
                       "student_accuracy": accuracy(sv, yv), "teacher_accuracy": teacher_val_acc,
                       "student_nll": hy.nll(sv, yv), "student_nll_calibrated": hy.nll(sv, yv, t_s)},
        f"within_{h.report_gap}_of_teacher": {
            "threshold": gap_point["threshold"], "validation_teacher_fraction": gap_point["teacher_fraction"],
            "test_teacher_fraction": gap_on_test["teacher_fraction"], "test_accuracy": gap_on_test["accuracy"],
            # what the test split itself needs (known only afterwards, from its labels): the fewest teacher calls
            # whose test accuracy is within the gap of the teacher's
            "test_teacher_fraction_needed": hy.choose_threshold(
                curve_test, target_accuracy=teacher_acc - h.report_gap)["teacher_fraction"]},
        "per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"],
    }
    (ctx.run_dir / "hybrid_curve.json").write_text(json.dumps({"validation": curve_val, "test": curve_test}),
                                                   encoding="utf-8")
    marks = {"student alone (test)": {"teacher_fraction": 0.0, "accuracy": student_acc},
             "teacher alone (test)": {"teacher_fraction": 1.0, "accuracy": teacher_acc},
             "hybrid at chosen threshold (test)": {"teacher_fraction": result["teacher_fraction"],
                                                   "accuracy": result["accuracy"]}}
    try:
        hy.plot_curves({"validation": curve_val, "test": curve_test}, marks, chosen, ctx.run_dir / "hybrid_curve.png")
    except ImportError:
        ctx.log("matplotlib is not installed: no hybrid_curve.png (pip install 'hybridft[plot]')")
    # without a test file the report is on validation, which also chose the threshold: optimistic, and said so
    where = "test" if s.test is not None else "validation (no data.test, so optimistic: it chose the threshold)"
    ctx.log(f"hybrid: {where} accuracy {result['accuracy']:.4f} with {result['teacher_fraction']:.1%} of inputs sent "
            f"to the teacher (student {student_acc:.4f}, teacher {teacher_acc:.4f})")
    return result


def build_speculative(ctx: Context, teacher: tuple[nn.Module, Any], student: tuple[nn.Module, Any]
                      ) -> dict[str, Any]:
    """causal_lm: the student as the teacher's draft model. Save OUTPUT_DIR/hybrid and measure it at batch 1 on the
    first test prompts, beside the teacher alone, the student alone and the undistilled student (the same layers
    before distillation) as a draft."""
    from hybridft import speculative

    cfg, s = ctx.cfg, ctx.splits
    (t_model, tokenizer), (s_model, _) = teacher, student
    examples = s.test if s.test is not None else s.validation
    n = cfg.hybrid.speculative_prompts
    prompts = examples.texts[:n] if examples.pairs is not None else [t[:200] for t in examples.texts[:n]]
    problem = speculative.vocabulary_mismatch(t_model, s_model)
    if problem:
        ctx.log(f"no speculative hybrid: {problem}; a draft model must score the teacher's exact vocabulary")
        return {"skipped": problem}
    undistilled = ctx.task.build_student(cfg, t_model, tokenizer, s)[0]  # the same layers or model, untrained
    ctx.log(f"speculative hybrid: the student drafts {cfg.hybrid.draft_tokens} token{'s' if cfg.hybrid.draft_tokens != 1 else ''} per teacher pass; measuring "
            f"on {len(prompts)} test prompts at batch 1")
    vocabulary = None
    if cfg.hybrid.draft_vocabulary:
        from hybridft.tasks import causal_lm

        responses = causal_lm.response_tokens(ctx.task.transfer_set(s), tokenizer, cfg.data.max_length)
        vocabulary = speculative.frequent_token_vocabulary(t_model, tokenizer, responses, cfg.hybrid.draft_vocabulary)
    hc = cfg.hybrid
    result = speculative.measure(t_model, s_model, undistilled, tokenizer, prompts, cfg.eval.max_new_tokens,
                                 hc.draft_tokens, ctx.device, vocabulary, hc.draft_confidence, hc.draft_precision,
                                 hc.verify_padding, cfg.eval.prepack_weights, hc.adaptive_drafting)
    speculative.save_hybrid(ctx.run_dir / "hybrid", ctx.run_dir / "teacher", ctx.run_dir / "student",
                            hc.draft_tokens, vocabulary, hc.draft_confidence, hc.draft_precision, hc.verify_padding,
                            cfg.eval.prepack_weights, hc.adaptive_drafting)
    h, u = result["hybrid"], result.get("undistilled_hybrid", {})
    padding = result.get("verify_padding")
    ctx.log(f"speculative hybrid: the draft runs in {result['draft_precision']['chosen']} "
            f"({result['draft_precision']['reason']})"
            + (f"; teacher passes of 1.. tokens timed at {padding['teacher_pass_ms']} ms, so r real tokens are "
               f"verified at widths {padding['pad_to']}" if padding else ""))
    if "unmeasured" in result:
        ctx.log(f"speculative hybrid: saved, but not measured: {result['unmeasured']}")
        return result
    ctx.log(f"speculative hybrid: {result['matches_teacher']}/{len(prompts)} outputs equal the teacher's greedy ones; "
            f"acceptance {h['acceptance_rate']:.1%}, {h['tokens_per_s']} tokens/s = {h['speedup_vs_teacher']}x the "
            f"teacher alone ({result['teacher']['tokens_per_s']}/s){speculative.drafting_note(h)}; undistilled "
            f"draft: acceptance {u.get('acceptance_rate', 0):.1%}, {u.get('speedup_vs_teacher')}x"
            f"{speculative.drafting_note(u)}")
    return result


def export(ctx: Context, student: nn.Module, tokenizer: Any) -> Optional[dict[str, Any]]:
    """The student as ONNX and int8 ONNX in OUTPUT_DIR/export, each checked against PyTorch on the test split."""
    import importlib.util

    from hybridft.export import export_student

    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        ctx.log("onnx/onnxruntime are not installed: no ONNX export (pip install 'hybridft[export]')")
        return None
    s, cfg = ctx.splits, ctx.cfg
    examples = s.test if s.test is not None else s.validation
    items = ctx.task.encode(examples, tokenizer, cfg.data.max_length)
    result = export_student(student, tokenizer, ctx.run_dir / "export", items, s.label_names, ctx.device,
                            opset=cfg.export.opset, batch_size=cfg.eval.batch_size,
                            speed_batches=cfg.eval.speed_batches, latency_samples=cfg.eval.latency_samples)
    ctx.log("export: " + ", ".join(f"{k} {v['accuracy']:.4f} acc, {v['size_mb']} MB, "
                                   f"{v['throughput_samples_per_s']:.0f}/s" for k, v in result.items()))
    return result


def run(cfg: RunConfig, overwrite: bool = False, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """The whole pipeline: teacher -> teacher outputs -> student -> evaluation -> hybrid -> export.
    With `resume`, finished stages are kept and an interrupted one continues from its latest checkpoint."""
    start = time.perf_counter()
    ctx = prepare(cfg, overwrite, resume=resume, force=force)
    models: dict[str, tuple[nn.Module, Any]] = {}
    stages: dict[str, float] = {}  # wall seconds per stage, for summary.json (the resume of a run counts anew)
    if cfg.distill.teacher_logits:
        store = read_store(cfg.distill.teacher_logits)
        ctx.task.check_store(store, ctx.splits, cfg)
        ctx.store_path = Path(cfg.distill.teacher_logits)
        teacher, teacher_tok = (None, None) if cfg.student.model else load_teacher(ctx)[:2]
    else:
        teacher, teacher_tok = train_teacher(ctx)
        models["teacher"] = (teacher, teacher_tok)
        stages["teacher"] = time.perf_counter() - start
        augment(ctx, teacher, teacher_tok)
        store = None if cfg.distill.online else teacher_outputs(ctx, teacher, teacher_tok)
    stages["teacher_outputs"] = time.perf_counter() - start - sum(stages.values())
    models["student"] = distill(ctx, store, teacher, teacher_tok)
    stages["student"] = time.perf_counter() - start - sum(stages.values())
    if not dist.is_main():  # evaluation, the hybrid and the export run once, on the main process
        return {}
    summary = evaluate(ctx, models)
    classification = cfg.task == "classification"  # the cascade and the ONNX export are classifier deliverables
    if classification and cfg.hybrid.enabled and "teacher" in models:
        summary["hybrid"] = build_hybrid(ctx, models["teacher"], models["student"])
    if not classification and cfg.hybrid.enabled and "teacher" in models:
        summary["hybrid"] = build_speculative(ctx, models["teacher"], models["student"])
    if classification and cfg.export.enabled:
        exported = export(ctx, *models["student"])
        if exported is not None:
            summary["export"] = exported
    if ctx.splits.notes:
        summary["data_notes"] = ctx.splits.notes
    unlabeled = len(ctx.splits.unlabeled) if ctx.splits.unlabeled is not None else 0
    generated = ctx.splits.augmented.get("generated", 0)
    # sequence KD turns the unlabeled prompts the teacher answered into training rows: they are still unlabeled text
    answered = ctx.splits.augmented.get("sequence_kd", {}).get("from_unlabeled_prompts", 0)
    summary["transfer_set"] = {"labeled": len(ctx.splits.train) - answered,
                               "unlabeled": unlabeled - generated + answered,
                               "generated": generated,
                               **({"augment": ctx.splits.augmented} if ctx.splits.augmented else {})}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["stage_seconds"] = {name: round(v, 1) for name, v in stages.items()}  # the rest: evaluation, hybrid, export
    summary["launch"] = dist.describe()  # how training ran: processes, engine, precision
    if ctx.precision is not None:
        summary["precision"] = ctx.precision.to_dict()
    summary["config"] = to_dict(cfg)
    write_summary(ctx.run_dir, summary)
    return summary
