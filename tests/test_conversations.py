"""Chat messages as causal-LM rows (OpenAI's and TRL's conversational formats): they tokenize as the chat template
renders them, train like prompt/response rows, and `generate` takes them as prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybridft import conversations
from hybridft.config import load_config
from hybridft.errors import HybridFTError
from hybridft.tasks import causal_lm as task
from test_causal_lm import lm_rows, make_llama, make_lm_tokenizer, write_jsonl


def _chat(row: dict[str, str], system: str | None = None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def _cfg(train: Path, *extra: str):
    return load_config(None, ["task=causal_lm", f"data.train={train}", f"data.validation={train}",
                              "teacher.model=unused", *extra])


def test_messages_round_trip_and_split_into_prompt_and_response():
    chat = _chat({"prompt": "red blue", "response": "blue red"}, system="be brief")
    prompt, response = conversations.split_response(conversations.parse(chat))
    assert response == "blue red" and prompt == chat[:2]
    text = conversations.as_prompt(prompt)
    assert conversations.is_conversation(text) and conversations.messages_of(text) == prompt
    assert conversations.display(text) == "[system] red blue"
    assert conversations.messages_of("plain") == [{"role": "user", "content": "plain"}]
    assert conversations.parse(json.dumps(chat)) == chat  # a CSV cell holds the JSON
    for bad, says in ((chat[:2], "ends with a 'user' message"), (chat[2:], "only the assistant's message"),
                      (chat[:2] + [{"role": "assistant", "content": " "}], "empty assistant message")):
        with pytest.raises(ValueError, match=says):
            conversations.split_response(bad)
    for bad, says in (([], "non-empty list"), ([{"role": "user"}], "message 1 is not a mapping"),
                      ("[{oops", "not valid JSON")):
        with pytest.raises(ValueError, match=says):
            conversations.parse(bad)


def test_a_conversation_tokenizes_as_the_chat_template_renders_it(tmp_path: Path):
    tok = make_lm_tokenizer(tmp_path / "tok", template=True)
    rows = lm_rows(6)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": _chat(r, system="gold")} for r in rows])
    train = task.load_splits(_cfg(path), 0).train
    items = task.encode(train, tok, 64)
    for item, row, text in zip(items, rows, train.texts):
        rendered = tok.apply_chat_template(conversations.messages_of(text), add_generation_prompt=True, tokenize=True)
        rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
        assert rendered == tok("Q: gold Q: " + row["prompt"] + " A:")["input_ids"]  # the system turn is kept
        response = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert item["input_ids"] == rendered + response and item["prompt_length"] == len(rendered)


def test_chat_rows_train_like_the_same_prompt_response_rows(tmp_path: Path):
    tok = make_lm_tokenizer(tmp_path / "tok", template=True)
    rows = lm_rows(8, seed=3)
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": _chat(r)} for r in rows])
    # TRL's conversational prompt-completion format: a prompt list and a completion list
    trl = write_jsonl(tmp_path / "trl.jsonl", [{"prompt": _chat(r)[:1], "completion": _chat(r)[1:]} for r in rows])
    encoded = [[i["input_ids"] for i in task.encode(task.load_splits(_cfg(p), 0).train, tok, 64)]
               for p in (plain, chat, trl)]
    assert encoded[0] == encoded[1] == encoded[2]


def test_bad_chat_rows_are_named_with_their_line(tmp_path: Path):
    rows = lm_rows(3)
    chats = [{"messages": _chat(r)} for r in rows]
    chats[1] = {"messages": _chat(rows[1])[:1]}  # no response
    path = write_jsonl(tmp_path / "bad.jsonl", chats)
    with pytest.raises(HybridFTError, match=r"bad.jsonl line 2: the messages column ends with a 'user' message"):
        task.load_splits(_cfg(path), 0)
    # a tokenizer without a chat template cannot render messages
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": _chat(r)} for r in rows])
    train = task.load_splits(_cfg(good), 0).train
    with pytest.raises(HybridFTError, match=r"line 1: a prompt of chat messages needs the tokenizer's chat template"):
        task.encode(train, make_lm_tokenizer(tmp_path / "plain_tok"), 64)
    # unlabeled prompts for sequence KD: messages that end with the user's turn
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": _chat(r)[:1]} for r in rows] +
                          [{"messages": _chat(rows[0])}])
    with pytest.raises(HybridFTError, match=r"line 4: the messages column ends with an assistant message"):
        task.load_splits(_cfg(good, f"data.unlabeled={prompts}"), 0)
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"messages": _chat(r)[:1]} for r in rows])
    assert task.load_splits(_cfg(good, f"data.unlabeled={ok}"), 0).unlabeled.texts == \
        [conversations.as_prompt(_chat(r)[:1]) for r in rows]


def _two_turns(a: dict[str, str], b: dict[str, str]) -> list[dict[str, str]]:
    return _chat(a, system="be brief") + _chat(b)


def test_every_assistant_turn_is_a_response_with_the_conversation_before_it_as_prompt():
    a, b = {"prompt": "red blue", "response": "blue red"}, {"prompt": "gold", "response": "gold"}
    chat = _two_turns(a, b)
    turns = conversations.assistant_turns(chat)
    assert turns == [(chat[:2], "blue red"), (chat[:4], "gold")]
    assert conversations.assistant_turns(chat, "last") == [(chat[:4], "gold")]
    # an assistant greeting before any other message has no prompt: it is context, not a response
    greeting = [{"role": "assistant", "content": "hello"}] + _chat(a)
    assert conversations.assistant_turns(greeting) == [(greeting[:2], "blue red")]
    hollow = chat[:2] + [{"role": "assistant", "content": " "}] + chat[3:]
    with pytest.raises(ValueError, match="message 3 is an empty assistant message.*assistant_turns=last"):
        conversations.assistant_turns(hollow)
    assert conversations.assistant_turns(hollow, "last") == [(hollow[:4], "gold")]


def test_multi_turn_conversations_train_on_every_answer_and_stay_on_one_side_of_the_split(tmp_path: Path):
    tok = make_lm_tokenizer(tmp_path / "tok", template=True)
    rows = lm_rows(40, seed=5)
    chats = [_two_turns(rows[i], rows[i + 1]) for i in range(0, 40, 2)]  # 20 conversations of 2 answers
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in chats])
    cfg = load_config(None, ["task=causal_lm", f"data.train={path}", "teacher.model=unused",
                             "data.validation_fraction=0.25"])
    splits = task.load_splits(cfg, 0)
    assert len(splits.train) + len(splits.validation) == 40 and len(splits.validation) == 10
    assert not set(splits.train.lines) & set(splits.validation.lines)  # a conversation is never on both sides
    for split in (splits.train, splits.validation):
        for text, response, line in zip(split.texts, split.pairs, split.lines):
            chat = chats[line - 1]
            assert response in (chat[2]["content"], chat[4]["content"])
            assert conversations.messages_of(text) == (chat[:2] if response == chat[2]["content"] else chat[:4])
    # the second answer's item: the first answer is in its prompt (no loss on it), its own tokens are the target
    items = task.encode(splits.train, tok, 128)
    second = next(i for i, t in enumerate(splits.train.texts) if len(conversations.messages_of(t)) == 4)
    first_answer = tok(conversations.messages_of(splits.train.texts[second])[2]["content"],
                       add_special_tokens=False)["input_ids"]
    prompt = items[second]["input_ids"][:items[second]["prompt_length"]]
    assert any(prompt[k:k + len(first_answer)] == first_answer for k in range(len(prompt)))
    assert items[second]["input_ids"][items[second]["prompt_length"]:] == \
        tok(splits.train.pairs[second], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    last = load_config(None, ["task=causal_lm", f"data.train={path}", "teacher.model=unused",
                              "data.validation_fraction=0.25", "data.assistant_turns=last"])
    only_last = task.load_splits(last, 0)
    assert len(only_last.train) + len(only_last.validation) == 20
    assert all(len(conversations.messages_of(t)) == 4 for t in only_last.train.texts)


def test_one_example_a_row_splits_as_before(tmp_path: Path):
    """Rows with one example each (prompt/response files, single-turn chats) keep the seeded split they had."""
    import random

    rows = lm_rows(30, seed=2)
    path = write_jsonl(tmp_path / "plain.jsonl", rows)
    splits = task.load_splits(load_config(None, ["task=causal_lm", f"data.train={path}", "teacher.model=unused"]), 7)
    order = list(range(30))
    random.Random(7).shuffle(order)
    n_val = max(1, round(0.1 * 30))
    assert splits.validation.pairs == [rows[i]["response"] for i in sorted(order[:n_val])]
    assert splits.train.pairs == [rows[i]["response"] for i in sorted(order[n_val:])]


def test_a_chat_run_trains_and_generate_takes_messages_as_prompts(tmp_path: Path, capsys):
    from hybridft.cli import main

    teacher = tmp_path / "teacher"
    tok = make_lm_tokenizer(teacher, template=True)
    make_llama(len(tok)).save_pretrained(teacher)
    data = {split: write_jsonl(tmp_path / f"{split}.jsonl", [{"messages": _chat(r, system="gold")}
                                                             for r in lm_rows(n, seed)])
            for split, n, seed in (("validation", 8, 2), ("test", 8, 3))}
    train = lm_rows(24, seed=1)  # 12 conversations of two answers each: 24 responses to learn
    data["train"] = write_jsonl(tmp_path / "train.jsonl", [{"messages": _two_turns(train[i], train[i + 1])}
                                                            for i in range(0, 24, 2)])
    assert main(["run", "task=causal_lm", f"data.train={data['train']}", f"data.validation={data['validation']}",
                 f"data.test={data['test']}", f"teacher.model={teacher}", "student.num_layers=1",
                 "data.max_length=32", "student.train.epochs=1", "distill.top_k=8", "eval.max_new_tokens=3",
                 "eval.generate_examples=2", "hybrid.speculative_prompts=2", f"output_dir={tmp_path / 'run'}",
                 "progress=false", "precision=fp32"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert json.loads((tmp_path / "run" / "data.json").read_text())["train"]["rows"] == 24
    # reports show the prompt's text, not its encoding, and the console keeps "[system]" (not read as markup)
    assert summary["comparison"]["generations"][0]["prompt"] == "[system] " + lm_rows(8, 3)[0]["prompt"]
    assert "'[system] " in capsys.readouterr().out
    assert summary["hybrid"]["matches_teacher"] == 2
    # generate: a messages column of prompts gives what the same texts as plain prompts give
    rows = lm_rows(3, seed=9)
    as_chat = write_jsonl(tmp_path / "chat_prompts.jsonl", [{"messages": _chat(r)[:1]} for r in rows])
    as_text = write_jsonl(tmp_path / "text_prompts.jsonl", [{"prompt": r["prompt"]} for r in rows])
    outs, threads = [], torch.get_num_threads()
    try:
        for src, column in ((as_chat, "messages"), (as_text, "prompt")):
            out = tmp_path / f"{column}.jsonl"
            assert main(["generate", "--model", str(tmp_path / "run" / "hybrid"), "--input", str(src), "--output",
                         str(out), "--prompt-column", column, "--max-new-tokens", "3", "--quiet",
                         "--num-threads", "1"]) == 0
            outs.append([json.loads(x)["generation"] for x in out.read_text().splitlines()])
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)  # the option sets it for the process; later tests keep their own
    assert outs[0] == outs[1]
    # a messages file without --prompt-column is told the option; a bad thread count is refused
    assert main(["generate", "--model", str(tmp_path / "run" / "student"), "--input", str(as_chat), "--output",
                 str(tmp_path / "b.jsonl")]) == 2
    assert "--prompt-column messages" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "run" / "student"), "--input", str(as_text), "--output",
                 str(tmp_path / "b.jsonl"), "--num-threads", "0"]) == 2
    assert "--num-threads must be at least 1" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad_prompts.jsonl", [{"messages": _chat(rows[0])}])
    assert main(["generate", "--model", str(tmp_path / "run" / "student"), "--input", str(bad), "--output",
                 str(tmp_path / "b.jsonl"), "--prompt-column", "messages", "--quiet"]) == 2


def test_generate_reads_messages_cells_and_leaves_json_looking_text_alone(tmp_path: Path):
    from hybridft.predict import predict_file

    chat = [{"role": "user", "content": "red blue"}]
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": chat}, {"prompt": json.dumps(chat)},
                                             {"prompt": '[{"a": 1}] explain this'}])
    seen = []
    report = predict_file(lambda texts, _: seen.extend(texts) or [{"generation": ""} for _ in texts], src,
                          tmp_path / "o.jsonl", text_column="prompt", columns=("generation",), progress=False,
                          chat_messages=True)
    assert report.rows_written == 3
    assert seen == [conversations.as_prompt(chat)] * 2 + ['[{"a": 1}] explain this']
