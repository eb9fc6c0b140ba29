"""The hybrid model for generation: the distilled student as the teacher's draft model (speculative decoding).

Greedy draft-and-verify (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"; with greedy decoding
both reduce to the loop below):

    1. the draft model proposes `draft_tokens` tokens greedily, one at a time (cheap: it is small);
    2. the teacher scores the last accepted token and all drafted ones in ONE forward pass;
    3. the longest prefix of drafted tokens that equals the teacher's own argmax is accepted, and the teacher's
       argmax after that prefix is appended too (a correction, or a bonus token when all drafts were accepted);
    4. both KV caches are cut back to the accepted tokens.

Every emitted token is the teacher's argmax given the tokens before it, so the output is the teacher's greedy
output, token for token (up to float rounding between a one-token and a many-token forward pass, which can flip
an exact tie). It is faster when the teacher's cost per forward pass barely grows with the tokens scored, as on
a memory-bound device at batch 1, and the draft agrees with the teacher often.

Batch size 1 only: the accepted length differs per sequence, and batch 1 is where decoding is latency-bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn


@dataclass
class SpeculativeStats:
    """Counts over one or more generations."""

    drafted: int = 0
    """Tokens the draft model proposed."""
    accepted: int = 0
    """Drafted tokens the teacher accepted."""
    teacher_passes: int = 0
    """Verification forward passes of the teacher (after the prompt's)."""
    new_tokens: int = 0
    """Tokens emitted."""
    seconds: float = 0.0
    rounds: list[int] = field(default_factory=list)
    """Accepted drafts per round (a histogram source)."""

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted: the share of drafted tokens the teacher kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_teacher_pass(self) -> float:
        return self.new_tokens / self.teacher_passes if self.teacher_passes else 0.0

    def add(self, other: "SpeculativeStats") -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.teacher_passes += other.teacher_passes
        self.new_tokens += other.new_tokens
        self.seconds += other.seconds
        self.rounds += other.rounds

    def to_dict(self) -> dict[str, Any]:
        return {"drafted": self.drafted, "accepted": self.accepted, "acceptance_rate": round(self.acceptance_rate, 4),
                "teacher_passes": self.teacher_passes, "new_tokens": self.new_tokens,
                "tokens_per_teacher_pass": round(self.tokens_per_teacher_pass, 3)}


def _forward(model: nn.Module, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Logits [1, T, V] of `ids` [1, T] appended to what `cache` holds (the cache grows by T)."""
    from hybridft.models import cache_argument

    return model(input_ids=ids, use_cache=True, **{cache_argument(model): cache}).logits


def _cut(cache: Any, keep: int) -> None:
    """Drop the cache's entries after the first `keep` tokens (a negative `crop` works in every transformers 5)."""
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


def vocabulary_mismatch(teacher: nn.Module, draft: nn.Module) -> Optional[str]:
    """Why `draft` cannot draft for `teacher` (their output layers score different vocabularies), or None."""
    t, d = teacher.get_output_embeddings().weight.shape[0], draft.get_output_embeddings().weight.shape[0]
    return None if t == d else f"the draft model's vocabulary ({d} tokens) differs from the teacher's ({t})"


def _check_vocabularies(teacher: nn.Module, draft: nn.Module) -> None:
    from hybridft.errors import HybridFTError

    problem = vocabulary_mismatch(teacher, draft)
    if problem:
        raise HybridFTError(f"{problem}; speculative decoding needs the same tokenizer: use a student distilled "
                            f"from this teacher")


@torch.no_grad()
def speculative_generate(teacher: nn.Module, draft: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                         draft_tokens: int = 4, eos_token_ids: Optional[set[int]] = None
                         ) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy decoding of `teacher`, drafted by `draft`.

    Args:
        teacher, draft: causal LMs with the same vocabulary, in eval mode, on one device.
        input_ids: [1, P] prompt token ids (P >= 1), on that device.
        max_new_tokens: at most this many new tokens.
        draft_tokens: tokens drafted per round (k); each round costs k draft passes and one teacher pass.
        eos_token_ids: generation stops after emitting one of these.
    Returns:
        ([1, P + N] the prompt and the N <= max_new_tokens new tokens, the round's counts).
    Raises:
        ValueError: for a batch of more than one sequence or draft_tokens < 1.
        HybridFTError: when the vocabularies differ.
    """
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one sequence ([1, P]), got shape {list(input_ids.shape)}")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    _check_vocabularies(teacher, draft)
    eos = eos_token_ids or set()
    stats = SpeculativeStats()
    start = time.perf_counter()
    tokens = input_ids[0].tolist()
    prompt_len = len(tokens)
    t_cache, d_cache = DynamicCache(), DynamicCache()
    # Both caches hold every token but the newest one, which starts the next forward pass.
    if prompt_len > 1:
        _forward(teacher, input_ids[:, :-1], t_cache)
        _forward(draft, input_ids[:, :-1], d_cache)
    device = input_ids.device
    while len(tokens) - prompt_len < max_new_tokens:
        left = max_new_tokens - (len(tokens) - prompt_len)
        k = min(draft_tokens, left)  # never draft past the limit (the teacher's bonus token may still be dropped)
        # 1. draft k tokens; the draft cache may lag several tokens behind (all drafts accepted last round)
        feed = torch.tensor([tokens[d_cache.get_seq_length():]], device=device)
        drafted: list[int] = []
        for _ in range(k):
            nxt = int(_forward(draft, feed, d_cache)[0, -1].argmax())
            drafted.append(nxt)
            if nxt in eos:
                break
            feed = torch.tensor([[nxt]], device=device)
        # 2. the teacher scores the newest accepted token and the drafts in one pass
        candidate = torch.tensor([tokens[t_cache.get_seq_length():] + drafted], device=device)
        logits = _forward(teacher, candidate, t_cache)[0]
        choices = logits[-(len(drafted) + 1):].argmax(-1).tolist()  # the teacher's token after each prefix
        # 3. accept the agreeing prefix, then the teacher's own token
        n = 0
        while n < len(drafted) and drafted[n] == choices[n]:
            n += 1
        emitted = drafted[:n] + [choices[n]]
        stats.drafted += len(drafted)
        stats.accepted += n
        stats.teacher_passes += 1
        stats.rounds.append(n)
        for tok in emitted[:left]:
            tokens.append(tok)
            if tok in eos:
                break
        if tokens[-1] in eos:
            break
        # 4. cut both caches back to every token but the newest
        keep = len(tokens) - 1
        _cut(t_cache, keep)
        _cut(d_cache, keep)
    stats.new_tokens = len(tokens) - prompt_len
    stats.seconds = time.perf_counter() - start
    return torch.tensor([tokens], device=device), stats


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_ids: Optional[set[int]] = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Plain greedy decoding with a KV cache, one forward pass per token: the same machinery as
    `speculative_generate` (so their speeds compare the algorithms, not two code paths). [1, P] -> [1, P + N]."""
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one sequence ([1, P]), got shape {list(input_ids.shape)}")
    eos = eos_token_ids or set()
    start = time.perf_counter()
    tokens, cache = input_ids[0].tolist(), DynamicCache()
    feed = input_ids
    for _ in range(max_new_tokens):
        nxt = int(_forward(model, feed, cache)[0, -1].argmax())
        tokens.append(nxt)
        if nxt in eos:
            break
        feed = torch.tensor([[nxt]], device=input_ids.device)
    stats = SpeculativeStats(new_tokens=len(tokens) - input_ids.shape[1], seconds=time.perf_counter() - start)
    stats.teacher_passes = stats.new_tokens
    return torch.tensor([tokens], device=input_ids.device), stats


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """The tokens that end a generation: the tokenizer's EOS and the model's generation config's (an instruct
    model often ends its turn with a chat token, e.g. SmolLM2's <|im_end|>)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    return ids


# ---------------------------------------------------------------------------------------------------
# the hybrid folder

FORMAT = "hybridft-speculative/1"


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link costs no disk space (the run's teacher/ and student/ hold the same files); copy across devices."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_hybrid(folder: Path, teacher_dir: Path, draft_dir: Path, draft_tokens: int) -> Path:
    """OUTPUT_DIR/hybrid of a causal_lm run: teacher/, draft/, hybrid.json and manifest.json (checksums), written
    beside the target and renamed, so a failed save never leaves a half folder in its place."""
    import json
    import shutil

    from hybridft.hybrid import write_manifest

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copytree(teacher_dir, tmp / "teacher", copy_function=_link_or_copy)
    shutil.copytree(draft_dir, tmp / "draft", copy_function=_link_or_copy)
    settings = {"format": FORMAT, "kind": "speculative", "draft_tokens": draft_tokens}
    (tmp / "hybrid.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    write_manifest(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def is_speculative_folder(folder: Path) -> bool:
    import json

    path = folder / "hybrid.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("kind") == "speculative"
    except (ValueError, UnicodeDecodeError):
        return False


def load_hybrid(folder: Path) -> tuple[nn.Module, nn.Module, Any, int]:
    """(teacher, draft, tokenizer, draft_tokens) of a folder written by `save_hybrid`, checksums verified.
    Raises HybridFTError for a damaged or foreign folder."""
    import json

    from hybridft.errors import HybridFTError
    from hybridft.hybrid import verify_manifest
    from hybridft.tasks import causal_lm

    verify_manifest(folder)
    settings = json.loads((folder / "hybrid.json").read_text(encoding="utf-8"))
    if settings.get("format") != FORMAT:
        raise HybridFTError(f"{folder}/hybrid.json has format {settings.get('format')!r}, expected {FORMAT!r}")
    teacher, tokenizer = causal_lm.load_model(str(folder / "teacher"), None, "hybrid teacher")  # type: ignore[arg-type]
    draft, _ = causal_lm.load_model(str(folder / "draft"), None, "hybrid draft")  # type: ignore[arg-type]
    _check_vocabularies(teacher, draft)
    return teacher.eval(), draft.eval(), tokenizer, int(settings["draft_tokens"])


# ---------------------------------------------------------------------------------------------------
# measurement


def prompt_tensor(tokenizer: Any, prompt: str, device: torch.device) -> torch.Tensor:
    from hybridft.tasks import causal_lm

    ids = causal_lm._prompt_ids(tokenizer, prompt, causal_lm.uses_template(tokenizer))
    return torch.tensor([ids], device=device)


def measure(teacher: nn.Module, draft: nn.Module, undistilled: Optional[nn.Module], tokenizer: Any,
            prompts: list[str], max_new_tokens: int, draft_tokens: int, device: torch.device) -> dict[str, Any]:
    """Speculative decoding against its parts, at batch 1, greedy, on `prompts`, fp32.

    Reported: tokens/s of the teacher alone, the hybrid (the teacher drafted by the distilled student), the
    student alone and, with `undistilled`, the same draft model before distillation, as a draft and alone; the
    acceptance rates; and how many hybrid outputs equal the teacher's own greedy output token for token.
    Every timing runs after one untimed warm-up generation of that configuration.
    """
    eos = eos_ids(teacher, tokenizer)
    inputs = [prompt_tensor(tokenizer, p, device) for p in prompts]
    for m in (teacher, draft, undistilled):
        if m is not None:
            m.to(device).eval()

    def timed(fn: Any) -> tuple[list[list[int]], SpeculativeStats]:
        fn(inputs[0])  # warm-up
        outs, total = [], SpeculativeStats()
        for ids in inputs:
            out, st = fn(ids)
            outs.append(out[0, ids.shape[1]:].tolist())
            total.add(st)
        return outs, total

    def rate(st: SpeculativeStats) -> float:
        return round(st.new_tokens / st.seconds, 2) if st.seconds else 0.0

    t_out, t_st = timed(lambda ids: greedy_generate(teacher, ids, max_new_tokens, eos))
    h_out, h_st = timed(lambda ids: speculative_generate(teacher, draft, ids, max_new_tokens, draft_tokens, eos))
    _, s_st = timed(lambda ids: greedy_generate(draft, ids, max_new_tokens, eos))
    result: dict[str, Any] = {
        "prompts": len(prompts), "max_new_tokens": max_new_tokens, "draft_tokens": draft_tokens, "batch_size": 1,
        "matches_teacher": sum(a == b for a, b in zip(h_out, t_out)),
        "teacher": {"tokens_per_s": rate(t_st), "new_tokens": t_st.new_tokens},
        "hybrid": {"tokens_per_s": rate(h_st), **h_st.to_dict(),
                   "speedup_vs_teacher": round(rate(h_st) / rate(t_st), 3) if rate(t_st) else None},
        "student": {"tokens_per_s": rate(s_st), "new_tokens": s_st.new_tokens},
    }
    if undistilled is not None:
        u_out, u_st = timed(lambda ids: speculative_generate(teacher, undistilled, ids, max_new_tokens, draft_tokens, eos))
        _, ua_st = timed(lambda ids: greedy_generate(undistilled, ids, max_new_tokens, eos))
        result["undistilled_hybrid"] = {"tokens_per_s": rate(u_st), **u_st.to_dict(),
                                        "speedup_vs_teacher": round(rate(u_st) / rate(t_st), 3) if rate(t_st) else None,
                                        "matches_teacher": sum(a == b for a, b in zip(u_out, t_out))}
        result["undistilled_student"] = {"tokens_per_s": rate(ua_st), "new_tokens": ua_st.new_tokens}
    return result
