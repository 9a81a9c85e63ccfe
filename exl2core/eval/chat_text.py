"""Conversation files as model input: rendered with the model's chat template, or as a plain transcript.

Instruct models are prompted through their chat template, so calibrating and scoring them on chat text
means feeding the template's exact markup (its special tokens included). A file holds conversations
separated by lines of three dashes; a line ``[system]``, ``[user]`` or ``[assistant]`` starts a message.
Text before the first separator is a header and is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from exl2core.errors import Exl2Error

ROLES = ("system", "user", "assistant")
SEPARATOR = "---"

# The date a template may print (strftime_now): fixed, so the same model always gets the same text.
TEMPLATE_DATE = datetime(2025, 1, 1)

TRANSCRIPT_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class RenderedChat:
    """Each conversation's text, and whether it came from the model's template: templated text holds
    the template's special tokens, which must then be tokenized as special tokens, not as plain text."""

    texts: list[str]
    templated: bool


def parse_conversations(text: str, name: str = "conversation file") -> list[list[Message]]:
    """The conversations of a file in the format above; each must start with a system or user message."""
    blocks = text.split(f"\n{SEPARATOR}\n")[1:]
    conversations = []
    for number, block in enumerate(blocks, 1):
        messages: list[Message] = []
        role, lines = None, []
        for line in block.splitlines():
            marker = line.strip()
            if marker.startswith("[") and marker.endswith("]") and marker[1:-1] in ROLES:
                if role is not None:
                    messages.append(Message(role, "\n".join(lines).strip()))
                role, lines = marker[1:-1], []
            elif role is None:
                if marker:
                    raise Exl2Error(f"{name}: conversation {number} has text before its first role line")
            else:
                lines.append(line)
        if role is not None:
            messages.append(Message(role, "\n".join(lines).strip()))
        if not messages or messages[0].role == "assistant":
            raise Exl2Error(f"{name}: conversation {number} must start with a [system] or [user] message")
        conversations.append(messages)
    if not conversations:
        raise Exl2Error(f"{name}: no conversations (blocks between lines '{SEPARATOR}')")
    return conversations


def render_conversations(conversations: list[list[Message]], model_dir: str | Path | None) -> RenderedChat:
    """Every conversation through ``model_dir``'s chat template when it has one, else as a transcript
    (``User: ...`` paragraphs). Templates that reject a system message get it merged into the first
    user message, as their models are usually prompted."""
    from exl2core.eval.generate import find_chat_template

    if model_dir is None or find_chat_template(model_dir) is None:
        return RenderedChat([_transcript(c) for c in conversations], templated=False)
    return RenderedChat([_templated(model_dir, c) for c in conversations], templated=True)


def _transcript(conversation: list[Message]) -> str:
    return "".join(f"{TRANSCRIPT_NAMES[m.role]}: {m.content}\n\n" for m in conversation)


def _templated(model_dir: str | Path, conversation: list[Message]) -> str:
    from exl2core.eval.generate import render_messages

    messages = [{"role": m.role, "content": m.content} for m in conversation]
    try:
        return render_messages(model_dir, messages, now=TEMPLATE_DATE)
    except Exl2Error:
        if conversation[0].role != "system" or len(conversation) < 2:
            raise
    merged = [{"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}]
    return render_messages(model_dir, merged + messages[2:], now=TEMPLATE_DATE)
