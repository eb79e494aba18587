"""Aggregation chats (written by `recipe=build_aggregation_sft`) mixed into SFT as a fixed share of the
samples.

    stats = SourceStats()
    extra = list(aggregation_examples("runs/agg/aggregation_sft.jsonl", tokenizer, stats))
    examples, mix_stats = mix_examples(chat_examples, extra, share=0.05, seed=0)
    windows, pack_stats = pack_sft(examples, seq_len, tokenizer.pad_token_id)

Layout. Markovian RSA feeds an aggregation prompt to the model as raw tokens, `[BOS] + template(question,
tails)`, and lets it continue, in RL as in evaluation: no chat template, no role markers. An aggregation chat
is therefore tokenized here as `[BOS] + ids(user) + ids(assistant) + [EOS]`, the loss on the assistant ids and
the EOS only, so the cold start teaches the model the very sequence it continues at RL and test time (ordinary
chats keep the chat template, through `tokenize_chat`). The two parts are encoded separately, as generation
starts on a token boundary after the prompt. A row whose `finished` is false (the teacher ran out of tokens)
gets no EOS: a cut-off target must not teach the model to stop mid-solution. Rows without `finished` count as
finished.

Share. With share s and m ordinary chats, every chat is kept once and k = round(m * s / (1 - s)) aggregation
examples are added (s = 1: the aggregation examples alone, each once), so the aggregation share of the samples
is k / (m + k), s up to rounding. The k are drawn from seeded permutations of the aggregation rows, one
permutation per pass, cycled when k exceeds the rows. Everything is a function of the files and the seed, so
every rank builds the same list; best-fit-decreasing packing then places examples by length, whatever their
order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zaya_train.data.packing import IGNORE_INDEX, SFTExample
from zaya_train.data.sources import SourceStats

# Keeps the mix's random stream apart from the loader's, which is also seeded by (seed, epoch).
MIX_STREAM = 0x41_47_47


def _chat(row: Any) -> tuple[str, str, bool] | None:
    """(prompt text, target text, finished) of a valid aggregation chat row, else None."""
    if not isinstance(row, dict):
        return None
    messages, finished = row.get("messages"), row.get("finished", True)
    if not isinstance(messages, list) or len(messages) != 2 or not isinstance(finished, bool):
        return None
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        return None
    if [m.get("role") for m in messages] != ["user", "assistant"]:
        return None
    return messages[0]["content"], messages[1]["content"], finished


def raw_prompt_example(prompt: str, target: str, tokenizer, finished: bool = True) -> SFTExample:
    """`[BOS] + ids(prompt) + ids(target) (+ [EOS] when finished)`, labels on the target (and EOS) only."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if finished else []
    tail = tokenizer(target, add_special_tokens=False)["input_ids"] + eos
    ids = np.asarray(head + tail, dtype=np.int64)
    labels = np.asarray([IGNORE_INDEX] * len(head) + tail, dtype=np.int64)
    return SFTExample(input_ids=ids, labels=labels)


def aggregation_examples(path: str | Path, tokenizer, stats: SourceStats) -> Iterator[SFTExample]:
    """The examples of a jsonl of aggregation chats (`{"messages": [user, assistant], "finished": bool}`),
    in file order. Rows that are not JSON or not such a chat, and chats with nothing to learn (an unfinished,
    empty target), are skipped and counted in `stats`."""
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            stats.rows_read += 1
            where = f"{path}:{lineno}"
            try:
                chat = _chat(json.loads(line))
            except json.JSONDecodeError:
                stats.skip("bad_json", where)
                continue
            if chat is None:
                stats.skip("not_an_aggregation_chat", where)
                continue
            example = raw_prompt_example(*chat[:2], tokenizer, finished=chat[2])
            if (example.labels == IGNORE_INDEX).all():
                stats.skip("empty_target", where)
                continue
            stats.rows_kept += 1
            yield example


def mix_examples(
    chats: Sequence[SFTExample], extra: Sequence[SFTExample], share: float, seed: int
) -> tuple[list[SFTExample], dict[str, float]]:
    """`chats` plus aggregation examples drawn from `extra` so that they make up `share` of the samples (see
    the module docstring). Returns the examples (chats first) and counts: chats, aggregation, share."""
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if share > 0 and not extra:
        raise ValueError("no aggregation example to draw from")
    if share == 1:
        chosen, chats = list(extra), []
    else:
        count = round(len(chats) * share / (1 - share))
        order = []
        epoch = 0
        while len(order) < count:
            rng = np.random.default_rng([seed, MIX_STREAM, epoch])
            order.extend(rng.permutation(len(extra)).tolist())
            epoch += 1
        chosen = [extra[i] for i in order[:count]]
    total = len(chats) + len(chosen)
    stats = {"chats": len(chats), "aggregation": len(chosen), "share": len(chosen) / total if total else 0.0}
    return [*chats, *chosen], stats
