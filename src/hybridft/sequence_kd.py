"""Sequence-level knowledge distillation for causal LMs (issue 11, part 1).

Kim & Rush 2016, "Sequence-Level Knowledge Distillation" (EMNLP): the student trains on the teacher's own
generated responses instead of (or beside) the true ones, which approximates matching the teacher's distribution
over whole sequences rather than over next tokens given the *true* prefix. With token KD on top (`loss.alpha` > 0)
the student also matches the teacher's next-token distribution along the teacher's own responses.

What is generated (`distill.sequence`):
    fraction   the share of training prompts whose response is replaced by the teacher's (a seeded choice):
               0 is off, 1 trains on generations alone, in between mixes the two.
    data.unlabeled prompts (a file with a prompt column, no response needed) always get the teacher's response and
               join the training rows.
Decoding: greedy, or sampling with `temperature` and `top_p`, at most `max_new_tokens` tokens, seeded per batch
from the run's seed (the same run draws the same responses on any batch split of one machine).

A generation cut at `max_new_tokens` trains without an end-of-sequence token after it: the student learns the
teacher's words so far, not to stop mid-sentence. The run's log and summary count them (`cut_at_max_new_tokens`).

The generations are stored in the teacher-output cache like the teacher's token outputs, as
`<fingerprint>.generations.json`, the fingerprint hashing the teacher's files, its tokenizer, the prompts and the
decoding settings: a second run with the same teacher, prompts and settings reuses them; changing any recomputes.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from hybridft.data import Examples, Splits, concat, example_key
from hybridft.errors import HybridFTError

FORMAT = "hybridft.generations/2"
"""/2 records whether each generation ended at a stop token; /1 files (without it) are recomputed."""


def decoding_settings(cfg: Any, stop_ids: Optional[set[int]] = None) -> str:
    """What the generations depend on beyond the teacher, its tokenizer and the prompts: the decoding settings and
    the tokens a generation stops at (`causal_lm.stop_token_ids`; generations stored before these were stop tokens
    ran on past them, and must not be reused)."""
    s = cfg.distill.sequence
    sampling = f"sample;temperature={s.temperature};top_p={s.top_p};seed={cfg.seed}" if s.do_sample else "greedy"
    stop = f";stop={','.join(map(str, sorted(stop_ids)))}" if stop_ids else ""
    return f"generations;{sampling};max_new_tokens={s.max_new_tokens};chat_template={cfg.data.chat_template}{stop}"


def chosen_rows(n: int, fraction: float, seed: int) -> list[int]:
    """Which of n training rows get the teacher's response: round(fraction * n) of them, a seeded choice, in order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[:round(fraction * n)])


@torch.no_grad()
def generate(teacher: nn.Module, tokenizer: Any, prompts: list[str], cfg: Any, device: torch.device,
             progress: bool = False) -> tuple[list[str], list[bool]]:
    """The teacher's responses to `prompts` (decoded without special tokens, stripped) and whether each ended at a
    stop token (False: cut at `distill.sequence.max_new_tokens`), in batches of
    `distill.sequence.batch_size`, left-padded, through the chat template when the tokenizer has one; on a CPU from
    prepacked weights where faster (`eval.prepack_weights`)."""
    from contextlib import nullcontext

    from hybridft.packed_linear import packed_if_faster
    from hybridft.progress import progress_bar
    from hybridft.tasks import causal_lm

    s = cfg.distill.sequence
    out: list[str] = []
    ended: list[bool] = []
    teacher.to(device).eval()
    with packed_if_faster(teacher, device) if cfg.eval.prepack_weights else nullcontext(), \
            progress_bar(len(prompts), "teacher generations", progress, unit="prompt") as bar:
        for start in range(0, len(prompts), s.batch_size):
            torch.manual_seed(cfg.seed + start)  # sampling: the same draws for the same prompts and batch size
            batch = prompts[start:start + s.batch_size]
            texts, ends = causal_lm.generate_with_ends(teacher, tokenizer, batch, s.max_new_tokens, device,
                                                       batch_size=s.batch_size, do_sample=s.do_sample,
                                                       temperature=s.temperature, top_p=s.top_p)
            out += texts
            ended += ends
            bar.update(len(batch))
    return out, ended


def read_generations(path: Path, keys: list[str]) -> Optional[tuple[list[str], list[bool]]]:
    """Stored generations for `keys` in order and whether each ended at a stop token, or None when the file is
    missing, damaged, of another format or holds other prompts."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a damaged cache entry is recomputed
    if stored.get("format") != FORMAT or stored.get("keys") != keys:
        return None
    return list(stored["responses"]), [bool(e) for e in stored["ended"]]


def write_generations(path: Path, keys: list[str], responses: list[str], ended: list[bool], settings: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"format": FORMAT, "settings": settings, "keys": keys, "responses": responses,
                              "ended": ended}),
                   encoding="utf-8")
    os.replace(tmp, path)


def apply(splits: Splits, teacher: nn.Module, tokenizer: Any, cfg: Any, log: Any, device: torch.device,
          teacher_folder: Path, cache_dir: Path) -> Splits:
    """The splits with the teacher's responses in place of the chosen training rows' responses, and the unlabeled
    prompts added with theirs. `splits.augmented` records the counts and where the generations came from."""
    from hybridft.teacher_outputs import fingerprint

    s = cfg.distill.sequence
    train, pool = splits.train, splits.unlabeled
    if s.fraction == 0 and pool is None:
        return splits
    if train.pairs is None:
        raise HybridFTError("distill.sequence needs prompt/response rows (a prompt column); plain-text rows have no "
                            "prompts for the teacher to answer")
    rows = chosen_rows(len(train), s.fraction, cfg.seed)
    prompts = [train.texts[i] for i in rows] + (list(pool.texts) if pool is not None else [])
    keys = [example_key(p) for p in prompts]
    from hybridft.tasks.causal_lm import stop_token_ids

    settings = decoding_settings(cfg, stop_token_ids(teacher, tokenizer))
    path = cache_dir / f"{fingerprint(teacher_folder, tokenizer, settings, keys)}.generations.json"
    stored = read_generations(path, keys)
    start = time.perf_counter()
    if stored is not None:
        responses, ended = stored
        log(f"sequence KD: reusing {len(responses)} stored teacher generations {path}")
    else:
        log(f"sequence KD: the teacher generates responses for {len(prompts)} prompts ({settings})")
        responses, ended = generate(teacher, tokenizer, prompts, cfg, device, progress=cfg.progress)
        write_generations(path, keys, responses, ended, settings)
        log(f"sequence KD: {len(prompts)} generations in {time.perf_counter() - start:.1f} s -> {path}")
    empty = [k for k, r in enumerate(responses) if not r.strip()]
    pairs, cut = list(train.pairs), list(train.cut or [False] * len(train))
    for k, i in enumerate(rows):
        if responses[k].strip():  # an empty generation (EOS at once) keeps the true response
            pairs[i], cut[i] = responses[k], not ended[k]
    new_train = replace(train, pairs=pairs, cut=cut)
    if pool is not None:
        keep = [k for k in range(len(rows), len(prompts)) if responses[k].strip()]
        generated = Examples(texts=[prompts[k] for k in keep], labels=[0] * len(keep),
                             pairs=[responses[k] for k in keep], source=f"{pool.source} (teacher responses)",
                             lines=[pool.lines[k - len(rows)] for k in keep] if pool.lines else [],
                             cut=[not ended[k] for k in keep])
        new_train = concat(new_train, generated)
    n_cut = sum(1 for k, r in enumerate(responses) if r.strip() and not ended[k])
    if n_cut:
        log(f"sequence KD: {n_cut} of {len(responses)} teacher generations were cut at distill.sequence."
            f"max_new_tokens={s.max_new_tokens}; they train without an end-of-sequence token (raise "
            f"distill.sequence.max_new_tokens to get whole answers)")
    record = {"sequence_kd": {"replaced": len(rows) - sum(k < len(rows) for k in empty),
                              "from_unlabeled_prompts": len(prompts) - len(rows) - sum(k >= len(rows) for k in empty),
                              "empty_generations_skipped": len(empty), "cut_at_max_new_tokens": n_cut,
                              "decoding": settings, "store": str(path)}}
    return replace(splits, train=new_train, unlabeled=None, augmented={**splits.augmented, **record})
