"""Answer-preserving (AP) trimming of reasoning traces to a token budget (ZAYA1-8B report, arXiv 2605.05365, §III-A), applied offline per dataset
and per target context, before SFT packing.

Assistant turns look like `<think>REASONING</think>ANSWER`. For a conversation longer than `max_tokens` (counted
with the tokenizer's chat template, special tokens included, i.e. exactly what `tokenize_chat` will produce):
1. cut the tail of the last assistant turn's reasoning, keeping its start, the closing `</think>` and the whole
   answer; the cut falls on a token boundary of the original text, as late as still fits;
2. if even an empty reasoning does not fit: delete the `<think>` blocks of all earlier assistant turns (their
   answers stay, leading whitespace stripped) and redo step 1 from the untrimmed last reasoning;
3. if that still does not fit, the answers alone exceed the budget: drop the conversation.

    kept, stats = trim_conversations(conversations, tokenizer, max_tokens=4096)
    stats.as_dict()   # {'samples': ..., 'unchanged': ..., 'trimmed': ..., 'earlier_thinking_removed': ..., 'dropped': ...}
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)

Messages = list[dict[str, str]]


@dataclass
class TrimStats:
    samples: int = 0
    unchanged: int = 0
    trimmed: int = 0
    # Of `trimmed`: those that also lost earlier turns' reasoning (step 2).
    earlier_thinking_removed: int = 0
    dropped: int = 0
    # Positions in the input of the dropped conversations, to keep data that runs alongside them aligned.
    dropped_indices: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if k != "dropped_indices"}


def count_tokens(messages: Messages, tokenizer) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def _last_assistant(messages: Messages) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant":
            return i
    return None


def _trim_last_reasoning(messages: Messages, tokenizer, max_tokens: int) -> Messages:
    """Shorten the last assistant turn's reasoning until the conversation fits or the reasoning is empty."""
    last = _last_assistant(messages)
    if last is None:
        return messages
    content = messages[last]["content"]
    match = _THINK.search(content)
    if match is None:
        return messages
    reasoning = match.group(1)
    offsets = tokenizer(reasoning, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def with_reasoning(keep: int) -> Messages:
        cut = reasoning[: offsets[keep - 1][1]] if keep else ""
        new = list(messages)
        new[last] = {**messages[last], "content": content[: match.start(1)] + cut + content[match.end(1) :]}
        return new

    keep, candidate = len(offsets), messages
    excess = count_tokens(messages, tokenizer) - max_tokens
    # Re-counting after each cut rather than trusting the arithmetic: tokens can merge differently at the seam.
    while excess > 0 and keep > 0:
        keep = max(0, keep - excess)
        candidate = with_reasoning(keep)
        excess = count_tokens(candidate, tokenizer) - max_tokens
    return candidate


def _drop_earlier_reasoning(messages: Messages) -> Messages:
    last = _last_assistant(messages)
    new = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and i != last and _THINK.search(message["content"]):
            content = message["content"]
            match = _THINK.search(content)
            message = {**message, "content": content[: match.start()] + content[match.end() :].lstrip()}
        new.append(message)
    return new


def ap_trim(messages: Messages, tokenizer, max_tokens: int) -> tuple[Messages | None, str]:
    """Returns (conversation or None, outcome) with outcome one of 'unchanged', 'trimmed',
    'earlier_thinking_removed', 'dropped'."""
    if max_tokens <= 0:
        raise ValueError(f"ap_trim max_tokens={max_tokens} must be positive")
    if count_tokens(messages, tokenizer) <= max_tokens:
        return messages, "unchanged"
    trimmed = _trim_last_reasoning(messages, tokenizer, max_tokens)
    if count_tokens(trimmed, tokenizer) <= max_tokens:
        return trimmed, "trimmed"
    without_earlier = _drop_earlier_reasoning(messages)
    if without_earlier != messages:
        trimmed = _trim_last_reasoning(without_earlier, tokenizer, max_tokens)
        if count_tokens(trimmed, tokenizer) <= max_tokens:
            return trimmed, "earlier_thinking_removed"
    return None, "dropped"


def trim_conversations(
    conversations: Iterable[Messages], tokenizer, max_tokens: int
) -> tuple[list[Messages], TrimStats]:
    kept, stats = [], TrimStats()
    for index, messages in enumerate(conversations):
        result, outcome = ap_trim(messages, tokenizer, max_tokens)
        stats.samples += 1
        if outcome == "earlier_thinking_removed":
            stats.trimmed += 1
            stats.earlier_thinking_removed += 1
        else:
            setattr(stats, outcome, getattr(stats, outcome) + 1)
        if result is not None:
            kept.append(result)
        else:
            stats.dropped_indices.append(index)
    return kept, stats
