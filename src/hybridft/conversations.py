"""Chat messages as causal-LM prompts: rows in the conversational format of OpenAI's and TRL's datasets.

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}
    {"prompt": [{"role": "user", "content": "..."}], "completion": [{"role": "assistant", "content": "..."}]}

The last message of `messages` must be the assistant's. Each assistant message to learn (every one after the first
message, or only the last: `data.assistant_turns`) is a response, and the messages before it (a system prompt,
earlier turns) its prompt, rendered by the tokenizer's chat template. Such a prompt travels in
`Examples.texts` as `PREFIX` + its JSON, so keys, stores, batches and generation treat it as any other prompt
string; `messages_of` reads it back.
"""

from __future__ import annotations

import json
from typing import Any

PREFIX = "\x1emessages\x1e"
"""Starts a prompt string that holds chat messages (U+001E, the record separator, is not typed in text)."""


def as_prompt(messages: list[dict[str, str]]) -> str:
    """The prompt string of `messages` (each {"role", "content"})."""
    return PREFIX + json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False)


def is_conversation(prompt: str) -> bool:
    return prompt.startswith(PREFIX)


def messages_of(prompt: str) -> list[dict[str, str]]:
    """The chat messages of a prompt string: those it holds, or one user message with the whole string."""
    if is_conversation(prompt):
        return json.loads(prompt[len(PREFIX):])
    return [{"role": "user", "content": prompt}]


def display(prompt: str) -> str:
    """A prompt for reports and logs: the last message's content, after the roles of any messages before it."""
    if not is_conversation(prompt):
        return prompt
    messages = messages_of(prompt)
    before = "".join(f"[{m['role']}] " for m in messages[:-1])
    return before + messages[-1]["content"]


def parse(value: Any) -> list[dict[str, str]]:
    """Chat messages from a cell: a list of {"role", "content"} mappings, or such a list as JSON text (a CSV cell).
    Raises ValueError saying what is wrong."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"holds text that starts like a JSON list of messages but is not valid JSON ({e.msg})")
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"is not a non-empty list of chat messages ({str(value)[:40]!r})")
    messages = []
    for k, m in enumerate(value):
        if hasattr(m, "keys") and not isinstance(m, dict):  # a pyarrow/pandas struct
            m = dict(m)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {k + 1} is not a mapping with a text 'role' and 'content' ({str(m)[:60]!r})")
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def assistant_turns(messages: list[dict[str, str]], which: str = "all") -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, response text) for each assistant message to learn in a training conversation: every one
    that follows another message (`which="all"`, as TRL's `assistant_only_loss`), or the last (`"last"`). Raises
    ValueError unless the last message is a non-empty assistant message with at least one message before it, or
    for an empty assistant message among those learned."""
    prompt, response = split_response(messages)
    if which == "last":
        return [(prompt, response)]
    turns = []
    for k, m in enumerate(messages[:-1]):
        if m["role"] == "assistant" and k > 0:
            if not m["content"].strip():
                raise ValueError(f"message {k + 1} is an empty assistant message; fill it in, or learn only the "
                                 f"last answer with data.assistant_turns=last")
            turns.append((messages[:k], m["content"]))
    return turns + [(prompt, response)]


def split_response(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """(the prompt's messages, the response's text) of a training conversation. Raises ValueError unless the last
    message is a non-empty assistant message with at least one message before it."""
    last = messages[-1]
    if last["role"] != "assistant":
        raise ValueError(f"ends with a {last['role']!r} message; its last message must be the assistant's response "
                         f"to learn")
    if len(messages) < 2:
        raise ValueError("holds only the assistant's message; give at least one message before it (the prompt)")
    if not last["content"].strip():
        raise ValueError("ends with an empty assistant message")
    return messages[:-1], last["content"]


def check_prompt(messages: list[dict[str, str]]) -> None:
    """A conversation to answer (unlabeled prompts, generation): it must not end with the assistant's message."""
    if messages[-1]["role"] == "assistant":
        raise ValueError("ends with an assistant message; a prompt for the teacher to answer ends with the user's "
                         "turn")
