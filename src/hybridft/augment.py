"""Data augmentation for distillation: a larger transfer set, built from the training texts, for the teacher to
label.

A student learns the teacher's function only where it sees inputs; a few thousand training sentences are a
sparse sample of it. Tang et al. (2019, "Distilling Task-Specific Knowledge from BERT into Simple Neural
Networks", section 3.3) generate `n_iter = 20` perturbed copies of every training sentence and let the teacher
label them:

    masking          each word, with probability p_mask, becomes the tokenizer's mask token;
    replacement      else, with probability p_replace, the word becomes a similar word (Tang et al. use a word
                     of the same part of speech; here, as in TinyBERT's data augmentation, Jiao et al. 2020, one
                     of the word's nearest neighbours in the teacher's input-embedding table, by cosine);
    n-gram sampling  then, with probability p_ngram per example, only a random n-gram (n in 1..5) is kept.

The generated texts carry no labels: the teacher's logits on them are the student's only target.

Everything here is pure Python plus one batch of matrix products (the neighbour table); it is deterministic for
a seed, and the texts drawn for source i depend only on (seed, i, the source text) and the neighbour table, not
on the other texts (except that a duplicate of an earlier text is dropped).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from hybridft.errors import HybridFTError

NGRAM_MAX = 5
"""n-gram sampling keeps n consecutive words, n uniform in 1..NGRAM_MAX (Tang et al.)."""

_CHUNK_FLOATS = 1 << 24
"""The neighbour search holds at most this many similarities at once (64 MiB of float32)."""

# A word is leading punctuation, a core, trailing punctuation: "(good," -> "(", "good", ",". Only the core is
# masked or replaced, so punctuation stays attached where it was.
_WORD = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


@dataclass(frozen=True)
class AugmentSettings:
    """How many texts to generate per training text, and how each is perturbed.

    factor      generation attempts per source text (Tang et al. use 20); duplicates and copies of a source are
                dropped, so each source yields at most `factor` new texts.
    p_mask      per-word probability that the word becomes the mask token.
    p_replace   per-word probability (for words not masked) that the word becomes one of its embedding
                neighbours. Needs an embedding table; ignored without one.
    p_ngram     per-example probability that only a random n-gram (n in 1..5 words) of the result is kept.
    neighbours  how many nearest vocabulary entries (cosine similarity of input-embedding rows) a word may be
                replaced by, uniformly.
    seed        the seed of every random draw.
    """

    factor: int = 20
    p_mask: float = 0.1
    p_replace: float = 0.1
    p_ngram: float = 0.25
    neighbours: int = 10
    seed: int = 0

    def check(self) -> None:
        """Raises HybridFTError naming the bad setting."""
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 0:
            raise HybridFTError(f"augment factor must be a whole number >= 0, got {self.factor!r}")
        for name in ("p_mask", "p_replace", "p_ngram"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise HybridFTError(f"augment {name} must be a probability in [0, 1], got {p!r}")
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise HybridFTError(f"augment neighbours must be a whole number >= 1, got {self.neighbours!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise HybridFTError(f"augment seed must be a whole number, got {self.seed!r}")


# ---------------------------------------------------------------------------------------------------
# the neighbour table


def candidate_ids(tokenizer: Any) -> list[int]:
    """Vocabulary ids a word may be replaced by, ascending: whole words (no `##` continuation piece),
    alphabetic (str.isalpha, so no digits, punctuation or `[unused0]`), at least 2 characters (MiniLM's
    nearest entries to "the" include the letter "s"), and not a special token."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.all_special_tokens)
    prefix = _continuation_prefix(tokenizer)
    out = []
    for token, i in tokenizer.get_vocab().items():
        if i in special or token in special or (prefix and token.startswith(prefix)):
            continue
        if len(token) >= 2 and token.isalpha():
            out.append(i)
    return sorted(out)


def _continuation_prefix(tokenizer: Any) -> str:
    """The WordPiece marker of a word's non-initial pieces ("##" for BERT), or "" if the tokenizer has none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    prefix = getattr(model, "continuing_subword_prefix", None)
    if isinstance(prefix, str):
        return prefix
    return "##"


def single_token_ids(words: list[str], tokenizer: Any) -> list[Optional[int]]:
    """For each word, its vocabulary id if the tokenizer maps it to exactly one token (itself a whole word),
    else None. One batched tokenizer call."""
    if not words:
        return []
    ids = tokenizer(list(words), add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    return [seq[0] if len(seq) == 1 and seq[0] != unk else None for seq in ids]


def nearest_neighbours(query_ids: list[int], embeddings: torch.Tensor, candidates: list[int], k: int
                       ) -> dict[int, list[int]]:
    """The k candidate ids nearest each query id, by cosine similarity of embedding rows, nearest first.

    query_ids   ids to look up (any order; duplicates allowed).
    embeddings  [V, d] the teacher's input-embedding table (any float dtype; computed in float32 on its device).
    candidates  ids that may be returned; a query is never its own neighbour.
    k           neighbours per query (fewer if there are fewer candidates).

    Cost: one [q, d] x [d, c] product per chunk of queries, chunked so at most 2**24 similarities (64 MiB)
    are held at once: for MiniLM (V = 30,522, d = 384, ~22k candidates) about 0.3 s per 1,000 queries on one
    CPU core. Raises HybridFTError if an id is outside the table.
    """
    if embeddings.dim() != 2:
        raise HybridFTError(f"the embedding table must be 2-D [vocab, dim], got shape {tuple(embeddings.shape)}")
    queries = sorted(set(query_ids))
    if not queries or not candidates or k < 1:
        return {q: [] for q in queries}
    rows = embeddings.shape[0]
    top = max(max(queries), max(candidates))
    if top >= rows or min(min(queries), min(candidates)) < 0:
        raise HybridFTError(f"token id {top} is outside the embedding table ({rows} rows); give the input "
                            f"embeddings of the model the tokenizer belongs to")
    with torch.no_grad():
        table = embeddings.detach().float()
        cand = torch.tensor(candidates, dtype=torch.long, device=table.device)
        cand_vecs = torch.nn.functional.normalize(table[cand], dim=-1)  # [c, d]
        take = min(k + 1, len(candidates))  # one extra: the query itself may be among the candidates
        chunk = max(1, _CHUNK_FLOATS // len(candidates))
        out: dict[int, list[int]] = {}
        for start in range(0, len(queries), chunk):
            q = queries[start:start + chunk]
            q_ids = torch.tensor(q, dtype=torch.long, device=table.device)
            sims = torch.nn.functional.normalize(table[q_ids], dim=-1) @ cand_vecs.T  # [chunk, c]
            sims[cand.unsqueeze(0) == q_ids.unsqueeze(1)] = float("-inf")  # never the word itself
            idx = sims.topk(take, dim=-1).indices.cpu().tolist()
            for qi, row in zip(q, idx):
                out[qi] = [candidates[j] for j in row if candidates[j] != qi][:k]
    return out


def neighbour_words(words: list[str], tokenizer: Any, embeddings: torch.Tensor, k: int) -> dict[str, list[str]]:
    """Replacement candidates for each word that may be replaced, nearest first.

    A word may be replaced when it is alphabetic, at least 2 characters long (single letters such as the "s"
    of "'s" have meaningless neighbours), and the tokenizer maps it to one whole-word token among
    `candidate_ids`. Its neighbours are the k nearest candidate tokens (`nearest_neighbours`), as the
    vocabulary spells them; words not in the result are never replaced. Computed once for all the words given.
    """
    unique = sorted({w for w in words if len(w) >= 2 and w.isalpha()})
    cands = candidate_ids(tokenizer)
    allowed = set(cands)
    ids = single_token_ids(unique, tokenizer)
    eligible = {w: i for w, i in zip(unique, ids) if i is not None and i in allowed}
    table = nearest_neighbours(list(eligible.values()), embeddings, cands, k)
    inverse = {i: t for t, i in tokenizer.get_vocab().items()}
    return {w: [inverse[j] for j in table[i]] for w, i in eligible.items() if table[i]}


# ---------------------------------------------------------------------------------------------------
# generation


def _split_word(word: str) -> tuple[str, str, str]:
    """(leading punctuation, core, trailing punctuation). A clitic such as "'s", "'re" or "'ll" is all core, so
    it is masked as a whole and never replaced (by a neighbour of "re")."""
    m = _WORD.match(word)
    assert m is not None  # the pattern matches every string
    lead, core, trail = m.groups()
    if lead[-1:] in ("'", "\u2019") and len(core) <= 2 and core.isalpha():
        lead, core = lead[:-1], lead[-1] + core
    return lead, core, trail


def _match_case(original: str, replacement: str) -> str:
    """Uncased vocabularies spell every word in lower case; keep the original's capitalisation."""
    if not replacement.islower():
        return replacement
    if len(original) > 1 and original.isupper():
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _mask_word(tokenizer: Any) -> Optional[str]:
    """The mask token, else the unknown token, else None (masked words are dropped)."""
    for token in (getattr(tokenizer, "mask_token", None), getattr(tokenizer, "unk_token", None)):
        if token:
            return str(token)
    return None


def _perturb(words: list[tuple[str, str, str]], rng: random.Random, settings: AugmentSettings,
             mask: Optional[str], table: dict[str, list[str]]) -> list[str]:
    """One draw: per word mask / replace / keep, then maybe an n-gram of the result."""
    out: list[str] = []
    for lead, core, trail in words:
        if rng.random() < settings.p_mask:
            if mask is None:
                continue  # no mask token: the word is dropped
            out.append(f"{lead}{mask}{trail}" if core else mask)
        elif rng.random() < settings.p_replace and core in table:
            choice = table[core][rng.randrange(len(table[core]))]
            out.append(f"{lead}{_match_case(core, choice)}{trail}")
        else:
            out.append(lead + core + trail)
    if out and rng.random() < settings.p_ngram:
        n = min(rng.randint(1, NGRAM_MAX), len(out))
        start = rng.randrange(len(out) - n + 1)
        out = out[start:start + n]
    return out


def augment_texts(texts: list[str], tokenizer: Any, embeddings: Optional[torch.Tensor], settings: AugmentSettings,
                  pairs: Optional[list[str]] = None) -> tuple[list[str], Optional[list[str]], list[int]]:
    """Generate a transfer set from training texts (Tang et al. 2019, section 3.3; TinyBERT, Jiao et al. 2020).

    texts       N source texts. Words are whitespace-separated; the output joins words with one space.
    tokenizer   the teacher's tokenizer (a Hugging Face tokenizer; WordPiece such as BERT's is what the
                whole-word rules assume). Its `mask_token` replaces masked words; without one, `unk_token`;
                without either, masked words are dropped.
    embeddings  [V, d] the teacher's input-embedding table (`model.get_input_embeddings().weight`), V at least
                the largest vocabulary id; None disables word replacement (only masking and n-grams).
    settings    see AugmentSettings.
    pairs       N second texts of sentence-pair tasks, or None. Each is perturbed independently of its first
                text, by the same rules and the same random stream.

    Each source gets `settings.factor` draws. A draw is dropped when it is empty or only mask tokens, equal to
    its source (after whitespace normalisation), equal to any source text, or equal to an earlier draw (of any
    source); for pairs, "equal" means both texts equal. So every source yields at most `factor` new texts.

    Returns (new_texts [M], new_pairs [M] or None, source_index [M]): source_index[i] is the position in
    `texts` of the text new_texts[i] was made from; rows come in source order, then draw order. Deterministic
    for settings.seed: the draws for source i use their own random.Random seeded from (seed, i). Raises
    HybridFTError on bad settings, a `pairs` list of another length than `texts`, or a table too small for
    the vocabulary.
    """
    settings.check()
    if pairs is not None and len(pairs) != len(texts):
        raise HybridFTError(f"augment: {len(texts)} texts but {len(pairs)} pairs; give one pair per text")
    split = [[_split_word(w) for w in t.split()] for t in texts]
    split_pairs = None if pairs is None else [[_split_word(w) for w in p.split()] for p in pairs]
    table: dict[str, list[str]] = {}
    if embeddings is not None and settings.p_replace > 0 and settings.factor > 0:
        cores = [c for ws in split + (split_pairs or []) for _, c, _ in ws]
        table = neighbour_words(cores, tokenizer, embeddings, settings.neighbours)
    mask = _mask_word(tokenizer)
    mask_only = {mask} if mask else set()

    def informative(words: list[str]) -> bool:
        return any(w not in mask_only for w in words)

    sources = [" ".join(t.split()) for t in texts]
    source_pairs = None if pairs is None else [" ".join(p.split()) for p in pairs]
    seen: set[tuple[str, Optional[str]]] = set()
    for i, t in enumerate(sources):
        seen.add((t, None if source_pairs is None else source_pairs[i]))

    new_texts: list[str] = []
    new_pairs: Optional[list[str]] = None if pairs is None else []
    index: list[int] = []
    for i, words in enumerate(split):
        rng = random.Random(f"hybridft.augment/{settings.seed}/{i}")  # str seeds are hashed (sha512): stable
        for _ in range(settings.factor):
            a = _perturb(words, rng, settings, mask, table)
            b = None if split_pairs is None else _perturb(split_pairs[i], rng, settings, mask, table)
            if not informative(a) or (b is not None and not informative(b)):
                continue
            key = (" ".join(a), None if b is None else " ".join(b))
            if key in seen:
                continue
            seen.add(key)
            new_texts.append(key[0])
            if new_pairs is not None:
                assert key[1] is not None
                new_pairs.append(key[1])
            index.append(i)
    return new_texts, new_pairs, index
