"""The training loop, written out: AdamW, linear warm-up and decay, gradient accumulation normalised over
the whole accumulated batch, clipping, bf16 autocast, periodic validation and the best weights kept.

One loop serves both stages: teacher fine-tuning is `fit` with alpha=0 and no teacher logits; student
distillation reads teacher logits stored in each item (or, online, runs the frozen teacher).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from hybridft import dist, sharding
from hybridft.dist import autocast, pick_device, seed_everything  # noqa: F401  (public here too)
from hybridft.batching import LengthGroupedBatches, ProcessShare, SortedSplitBatches, length_sorted_loader, to_device
from hybridft.checkpoint import latest_checkpoint, load_checkpoint, rng_states, save_checkpoint, set_rng_states
from hybridft.compact_embedding import compact_embedding
from hybridft.config import TrainConfig
from hybridft.errors import HybridFTError
from hybridft.inter_losses import LayerDistill  # intermediate-layer distillation (issue 10)
from hybridft.losses import IGNORE_INDEX, LossWeights, hybrid_loss, stored_targets, teacher_top1  # noqa: F401
from hybridft.progress import progress_bar
from hybridft.runlog import MetricsWriter


LOWER_IS_BETTER = ("loss", "kl")
"""Validation metrics whose lowest value is the best (`TrainConfig.best_metric`); the others, the highest."""


@dataclass
class FitResult:
    best_metric: Optional[float]
    """The best validation value of `best_key`, None before the first evaluation."""
    best_step: int
    steps: int
    seconds: float
    best_key: str = ""
    """The validation metric that chose the weights kept (`TrainConfig.best_metric`, or the task's `BEST`)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    model: Optional[nn.Module] = None
    """The trained model with the best weights: the model passed in, or under FSDP a fresh unwrapped copy."""
    embedding_rows: Optional[tuple[int, int]] = None
    """(trained, all) rows of the input embedding when only the training tokens' rows were trained
    (`TrainConfig.compact_embeddings`), else None."""

    resumed_step: Optional[int] = None
    """The checkpoint's step this call continued from (`resume`), else None."""

    def describe(self) -> str:
        """'12 s', or '12 s; resumed at step 5 of 16; 4,783 of 30,522 embedding rows trained': for the log."""
        resumed = f"; resumed at step {self.resumed_step} of {self.steps}" if self.resumed_step is not None else ""
        rows = f"; {self.embedding_rows[0]:,} of {self.embedding_rows[1]:,} embedding rows trained" \
            if self.embedding_rows else ""
        return f"{self.seconds:.0f} s{resumed}{rows}"


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only; biases and norms get no weight decay.

    The fused kernel steps ~6x faster on CPU than the default (measured 7 ms vs 44 ms for a 2-layer MiniLM).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


CPU_LENGTH_SPLITS = 4
"""`length_splits: auto` on CPU in fp32, where it pays: four sorted passes per random batch pad SST-2 to 1.4x its
real tokens instead of 3.0x."""
MIN_ROWS_PER_PASS = 8
"""`auto` never cuts a pass below this many rows: smaller passes are bound by per-call overhead, not tokens."""
MIN_PADDING_SAVED = 0.25
"""`auto` splits only when that cuts the padded tokens of a random batch by at least this share: rows of one
length (long articles cut at max_length) gain nothing from it and pay for the smaller passes."""


def padded_tokens(lengths: list[int], batch_size: int, splits: int, batches: int = 64) -> int:
    """Padded tokens of `batches` random batches (a fixed seed: the training order's generator is not touched),
    each sorted by length and cut into `splits` passes that pad to their own longest row."""
    g = torch.Generator().manual_seed(0)
    total = 0
    for _ in range(batches):
        rows = sorted(lengths[i] for i in torch.randint(len(lengths), (min(batch_size, len(lengths)),), generator=g))
        size = math.ceil(len(rows) / splits)
        total += sum(len(rows[i:i + size]) * rows[i:i + size][-1] for i in range(0, len(rows), size))
    return total


def length_splits(tc: TrainConfig, device: torch.device, lengths: list[int], precision: str = "fp32") -> int:
    """Forward/backward passes per micro-batch (`TrainConfig.length_splits`). `auto`: 1 on GPU, whose small passes
    are bound by kernel launches, and 1 under bf16/fp16 autocast on CPU, whose per-pass casts of the weights cost
    more than the padding saves (the speed table's 2,000 SST-2 rows on an AVX512-BF16 EPYC: 36.5 s in 4 passes,
    28.0 s in one; in fp32 48.3 s and 51.7 s). In fp32 on CPU, up to CPU_LENGTH_SPLITS passes of at least
    MIN_ROWS_PER_PASS rows, when they save MIN_PADDING_SAVED of the padded tokens of this data's random batches;
    else 1."""
    if tc.length_splits != "auto":
        return int(tc.length_splits)
    splits = min(CPU_LENGTH_SPLITS, tc.batch_size // MIN_ROWS_PER_PASS)
    if device.type != "cpu" or precision != "fp32" or not lengths or splits < 2:
        return 1
    whole, split = (padded_tokens(lengths, tc.batch_size, n) for n in (1, splits))
    return splits if split <= (1 - MIN_PADDING_SAVED) * whole else 1


def forget_accelerate(model: nn.Module) -> None:
    """Make an unwrapped model again as `from_pretrained` makes it: drop the marks Accelerate's `prepare` and
    `unwrap_model` leave on it (`_is_accelerate_prepared`, and `forward` bound as an instance attribute).

    A copy of a model carrying them (a student cut from its fine-tuned teacher) is taken by Accelerate's next
    `prepare` as prepared already, and left without its autocast and fp32-output wrapper: its logits then come out
    in bf16 where a model loaded from disk gives them in fp32, one bf16 rounding apart in the gradient of the loss.
    That made a bf16 run resumed from a checkpoint (its student loaded from disk) drift from the uninterrupted run
    (max |difference| 5e-4 after 120 steps)."""
    bound = vars(model).get("forward")
    own, chain = getattr(bound, "__func__", None), [type(model).forward]
    while hasattr(chain[-1], "__wrapped__"):  # unwrap goes through transformers' own decorators too
        chain.append(chain[-1].__wrapped__)
    if own is not None and any(own is f for f in chain):
        del model.forward
    for mark in ("_original_forward", "_is_accelerate_prepared"):
        vars(model).pop(mark, None)


def fit(
    model: nn.Module,
    train_items: list[dict[str, Any]],
    val_items: list[dict[str, Any]],
    *,
    task: Any,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    tc: TrainConfig,
    weights: LossWeights,
    device: torch.device,
    precision: str = "fp32",
    seed: int = 0,
    writer: Optional[MetricsWriter] = None,
    stage: str = "student",
    progress: bool = False,
    teacher: Optional[nn.Module] = None,
    checkpoint_dir: Optional[Path] = None,
    resume: bool = False,
    inter: Optional[LayerDistill] = None,
) -> FitResult:
    """Train `model` and return it (`FitResult.model`) holding the weights with the best validation metric.

    `task` is the task module the pipeline picked: the loop calls only its `logits_for_loss`, `teacher_targets`,
    `validate` and `BEST` (the metric and "max" or "min"), and reads the batch contract: `labels` and
    `kd_mask` with one entry per loss row, stored teacher targets under `teacher_*` keys.

    The model is trained in place, except under FSDP, which shards it for good: the result is then a fresh
    unwrapped model of the same class, on every process.

    Items carry teacher targets when distilling from stored outputs; with `teacher` given instead, the
    frozen teacher runs on each batch (online mode). With neither, the KD term is off (alpha is ignored).
    With `checkpoint_dir`, a checkpoint is written every `tc.checkpoint_every` steps (default: at each
    evaluation); with `resume`, training continues from the latest one and ends with the same weights as an
    uninterrupted run.

    With `tc.compact_embeddings`, only the input-embedding rows of the tokens in `train_items` are trained
    (`hybridft.compact_embedding`): the same weights, less work; checkpoints and the returned model hold the
    model's own dense embedding.

    With `inter` (`hybridft.inter_losses`), the loss also has the intermediate-layer terms: its frozen teacher runs
    on every batch for its hidden states (one pass, whose logits are the KD targets when `teacher` is that teacher),
    and `hidden` and `attention` are logged beside `kd` and `ce`.
    """
    acc = dist.accelerator(precision, cpu=device.type == "cpu")
    rank, world = dist.rank_and_world()
    main = rank == 0
    writer = writer if (writer is not None and main) else MetricsWriter(None)
    seed_everything(seed)
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)  # frozen: never trained, never in the optimizer
    if inter is not None:  # intermediate-layer terms (issue 10): the same frozen teacher, for its hidden states
        if teacher is not None and teacher is not inter.teacher:
            raise ValueError("online distillation with intermediate-layer terms needs one teacher, not two")
        inter.teacher.to(device).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    # `batch_size` is per process: every process builds the same global micro-batches of batch_size x world
    # rows, in the same order, and keeps its own share of each.
    lengths = [len(it["input_ids"]) for it in train_items]
    splits = 1 if tc.group_by_length else length_splits(tc, device, lengths, precision)
    per_step = tc.grad_accum * splits  # micro-batches (forward/backward passes) per optimizer step
    if tc.group_by_length:
        batches: Any = LengthGroupedBatches(lengths, tc.batch_size * world, tc.grad_accum, generator)
    else:
        batches = SortedSplitBatches(lengths, tc.batch_size * world, tc.grad_accum, splits, generator)
    # The loader draws its workers' base seed from `generator` too, never from the global RNG, so that the
    # data order and the dropout masks can be restored independently on resume.
    loader = DataLoader(train_items, batch_sampler=ProcessShare(batches, rank, world), collate_fn=collate,
                        generator=generator)
    val_loader = length_sorted_loader(val_items, max(tc.batch_size, 32), collate)
    # Accelerate wraps the model for the launch config: DDP or FSDP2 with several processes (both average
    # gradients over processes; the loss below is scaled by `world` to turn that into the sum of per-row
    # gradients over the global count, exactly as with one process) and, for fp16, a gradient scaler. The
    # teacher is never prepared: it stays out of the optimizer and out of gradient synchronisation.
    sharded = dist.is_sharded(acc)
    if inter is not None and sharded and (inter.attention_weight > 0 or inter.projection is not None):
        raise HybridFTError("loss.attention_weight and a width projection (loss.hidden_weight with a narrower student) "
                            "reach into the student's layers outside its forward, which FSDP shards; set them to 0 "
                            "or train without FSDP")
    model_cls, model_config = type(model), getattr(model, "config", None)
    # Only the embedding rows of the training tokens are trained: the others only decay (hybridft.compact_embedding).
    # Not under FSDP: the untrained rows would stay whole on every process instead of sharded. (Forced on, the FSDP
    # tests pass: same weights as one process, resume equal; but a large vocabulary would cost each process memory.)
    compact, compact_prefix = compact_embedding(model, train_items, tc.compact_embeddings and not sharded) or (None, "")

    def weights_now_whole() -> dict[str, torch.Tensor]:
        """The whole weights in the model's own format (a dense embedding), on the CPU."""
        state = sharding.model_state(train_model, model, sharded)
        return compact.full_state(state, compact_prefix) if compact is not None else state

    train_model, optimizer = acc.prepare(model, make_optimizer(model, tc.lr, tc.weight_decay))
    eval_model = train_model if sharded else model  # FSDP's forward gathers the shards: every process runs it
    steps_per_epoch = math.ceil(len(loader) / per_step)
    # On small data a few epochs are a few dozen steps, too few to fit; min_steps adds epochs until there are enough.
    total_steps = max(1, math.ceil(tc.epochs * steps_per_epoch), tc.min_steps or 0)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total_steps), total_steps)
    eval_every = tc.eval_every or steps_per_epoch

    best = FitResult(best_metric=None, best_step=0, steps=total_steps, seconds=0.0,
                     embedding_rows=(len(compact.token_ids), len(compact.index)) if compact is not None else None)
    metric_key = tc.best_metric if tc.best_metric not in (None, "auto") else task.BEST[0]
    best.best_key = metric_key
    best_state: Optional[dict[str, torch.Tensor]] = None
    bar = progress_bar(total_steps, stage, progress)
    start = time.perf_counter()
    step, running = 0, _Running(inter is not None)
    # Where we are in the data: the generator state that drew this epoch's order, and batches drawn since.
    position: dict[str, Any] = {"epoch_rng": generator.get_state(), "consumed": 0}
    skip = 0
    latest = latest_checkpoint(checkpoint_dir) if resume else None
    if latest is not None:
        weights_now, best_state, st = load_checkpoint(latest)
        if compact is not None:
            weights_now = compact.load_full_state(weights_now, compact_prefix)
        sharding.load_model_state(train_model, model, weights_now, sharded)
        sharding.load_optimizer_state(train_model, optimizer, st["optimizer"], sharded)
        scheduler.load_state_dict(st["scheduler"])
        if acc.scaler is not None and st.get("scaler"):
            acc.scaler.load_state_dict(st["scaler"])
        step, skip = st["step"], st["consumed"]
        best.resumed_step = step
        generator.set_state(st["epoch_rng"])
        best.best_metric, best.best_step, best.history = st["best_metric"], st["best_step"], st["history"]
        # the best so far was judged by the checkpoint's metric (before 2026-12-06 always the task's): keep it,
        # since its value cannot be compared with another metric's
        saved_key = st.get("best_key", task.BEST[0])
        if saved_key != metric_key:
            print(f"hybridft: {stage}: the checkpoint chose its best weights by validation {saved_key}; the resumed "
                  f"run goes on choosing by it (not {metric_key})", file=sys.stderr, flush=True)
            metric_key = saved_key
        best.best_key = metric_key
        set_rng_states(st["rng"])
        writer.drop_after(stage, step)
        bar.update(step)

    def micro_batches() -> Any:
        """Groups of `per_step` micro-batches, one group per optimizer step, epoch after epoch."""
        nonlocal skip
        while True:
            group: list[dict[str, torch.Tensor]] = []
            position["epoch_rng"], position["consumed"] = generator.get_state(), 0
            for batch in loader:
                position["consumed"] += 1
                if skip:  # resuming: replay this epoch's order up to the checkpoint
                    skip -= 1
                    continue
                group.append(batch)
                if len(group) == per_step:
                    yield group
                    group = []
            if group:  # the end of an epoch makes a shorter last step
                yield group

    for group in micro_batches():
        if step >= total_steps:
            break
        # Normalise over the whole accumulated batch: each micro-batch contributes sum / global count, so the
        # summed gradient equals that of one big batch (not a mean of per-micro-batch means).
        # (the intermediate-layer terms average over real tokens, counted the same way)
        n_kd, n_ce, n_tokens = dist.sum_across([
            sum(int(b["kd_mask"].sum()) for b in group), sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in group),
            sum(int(b["attention_mask"].sum()) for b in group) if inter is not None else 0])
        for i, batch in enumerate(group):
            last = i == len(group) - 1
            dist.set_sync_gradients(acc, last)
            batch = to_device(batch, device)
            targets = stored_targets(batch)
            if inter is not None:  # one teacher pass: its states, and its logits when distilling online
                with torch.no_grad(), autocast(device, precision):
                    teacher_logits, teacher_states = inter.teacher_states(task, batch)
                if teacher is not None:
                    targets = teacher_logits
            elif teacher is not None:
                with torch.no_grad(), autocast(device, precision):
                    targets = task.teacher_targets(teacher, batch)
            labels, kd_mask = batch["labels"].reshape(-1), batch["kd_mask"].reshape(-1)
            # gradients are all-reduced once per optimizer step, on its last micro-batch
            with contextlib.nullcontext() if last else acc.no_sync(train_model):
                with autocast(device, precision):
                    if inter is None:
                        student_logits = task.logits_for_loss(train_model, batch)  # [N, C], N = labels.numel()
                    else:
                        student_logits, hidden = task.logits_and_hidden(train_model, batch)
                        student_states = inter.student_states(hidden)
                parts = hybrid_loss(
                    student_logits, targets, labels,
                    alpha=weights.alpha if targets is not None else 0.0, beta=weights.beta,
                    temperature=weights.temperature, kd_mask=kd_mask, kd_denominator=n_kd, ce_denominator=n_ce,
                    divergence=weights.divergence, jsd_beta=weights.jsd_beta, chunk_rows=weights.chunk_rows,
                    tail=weights.tail,
                )
                if inter is not None:
                    inter_parts = inter.terms(student_states, teacher_states, batch["attention_mask"], n_tokens)
                    parts = parts._replace(total=parts.total + inter_parts.total)
                    running.add_inter(inter_parts)
                if not torch.isfinite(parts.total):
                    raise HybridFTError(f"{stage} training: the loss became {float(parts.total.detach())} at step "
                                        f"{step + 1}; lower {lr_key(stage)} or use precision=fp32 (no weights were saved)")
                # `acc.backward` divides by its own accumulation count; our loss is already normalised over
                # the whole step, so that division is undone here.
                acc.backward(parts.total * world * acc.gradient_accumulation_steps)
            running.add(parts, student_logits.detach(), targets, kd_mask)
        running.steps += 1
        if tc.max_grad_norm is not None:
            acc.clip_grad_norm_(train_model.parameters(), tc.max_grad_norm)  # unscales fp16 gradients first
        optimizer.step()
        if compact is not None and not getattr(optimizer, "step_was_skipped", False):
            compact.decay(optimizer.param_groups[0]["lr"], tc.weight_decay)  # the lr this step used
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % tc.log_every == 0 or step == total_steps:
            record = {"stage": stage, "split": "train", "step": step, "epoch": round(step / steps_per_epoch, 4),
                      "lr": scheduler.get_last_lr()[0], **running.summary()}
            writer.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            running = _Running(inter is not None)
        if step % eval_every == 0 or step == total_steps:
            # the main process's numbers decide for all, so every process keeps the same best step
            metrics = dist.gather_objects(task.validate(eval_model, val_loader, device, precision))[0]
            record = {"stage": stage, "split": "validation", "step": step,
                      "epoch": round(step / steps_per_epoch, 4), **metrics}
            writer.write(record)
            best.history.append(record)
            if metric_key not in metrics:
                raise HybridFTError(f"{stage}: best_metric={metric_key} is not among the validation metrics "
                                    f"({', '.join(sorted(k for k in metrics if isinstance(metrics[k], float)))}); "
                                    f"kl needs the teacher's logits on the validation items (`teacher_logits`)")
            value = metrics[metric_key]
            improved = best.best_metric is None or (value < best.best_metric if metric_key in LOWER_IS_BETTER
                                                     else value > best.best_metric)
            if improved or (tc.best_on_tie == "later" and value == best.best_metric):
                best.best_metric, best.best_step = value, step
                best_state = weights_now_whole()
        if checkpoint_dir is not None and (step % (tc.checkpoint_every or eval_every) == 0 or step == total_steps):
            writes = main or sharded  # under FSDP, gathering the whole state takes every process
            if best.best_step == step:  # just copied as the best weights: no second copy (or FSDP gather)
                weights_now = best_state
            else:
                weights_now = weights_now_whole() if writes else {}
            optimizer_now = sharding.optimizer_state(train_model, optimizer, sharded) if writes else {}
            state = {"stage": stage, "step": step, "optimizer": optimizer_now, "scheduler": scheduler.state_dict(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "epoch_rng": position["epoch_rng"], "consumed": position["consumed"], "rng": rng_states(),
                     "best_metric": best.best_metric, "best_key": metric_key, "best_step": best.best_step,
                     "history": best.history}
            if main:
                save_checkpoint(checkpoint_dir, step, weights_now, state, best_state, tc.keep_checkpoints)
    bar.close()
    if sharded:
        final = best_state if best_state is not None else weights_now_whole()
        acc.free_memory()
        model = sharding.plain_model(model_cls, model_config, final, device)
    else:
        acc.unwrap_model(train_model, keep_fp32_wrapper=False)  # the model's own forward, without autocast
        forget_accelerate(model)
        acc.free_memory()  # drop Accelerate's references to this stage's model and optimizer
        if compact is not None:
            compact.restore(model)
        if best_state is not None:
            model.load_state_dict(best_state)
    best.seconds = time.perf_counter() - start
    best.model = model.eval()
    return best


class _Running:
    """Sums of the logged quantities between two log lines."""

    def __init__(self, inter: bool = False) -> None:
        self.steps = 0
        self.total = self.kd = self.ce = 0.0
        self.agree = self.agree_n = 0
        self.inter = inter  # log the intermediate-layer terms too
        self.hidden = self.attention = 0.0

    def add(self, parts: Any, student_logits: torch.Tensor, targets: Any, kd_mask: torch.Tensor) -> None:
        self.total += float(parts.total.detach())
        self.kd += float(parts.kd.detach())
        self.ce += float(parts.ce.detach())
        if targets is not None:
            same = student_logits.argmax(-1) == teacher_top1(targets)
            self.agree += int((same & kd_mask).sum())
            self.agree_n += int(kd_mask.sum())

    def add_inter(self, parts: Any) -> None:
        self.hidden += float(parts.hidden.detach())
        self.attention += float(parts.attention.detach())

    def summary(self) -> dict[str, float]:
        """Mean loss per optimizer step, over all processes (every process must call this at the same step).

        Per-micro-batch values are already divided by the step's global counts, so summing them over the
        micro-batches and the processes gives the step's loss."""
        total, kd, ce, agree, agree_n = dist.sum_across([self.total, self.kd, self.ce, self.agree, self.agree_n])
        steps = max(self.steps, 1)
        out = {"loss": total / steps, "kd": kd / steps, "ce": ce / steps}
        if agree_n:
            out["agreement"] = agree / agree_n
        if self.inter:
            hidden, attention = dist.sum_across([self.hidden, self.attention])
            out.update(hidden=hidden / steps, attention=attention / steps)
        return out


def lr_key(stage: str) -> str:
    """The config key of a stage's learning rate (`student-kd` and `student-ce` train the student)."""
    return f"{stage.split('-')[0]}.train.lr"


