"""Aggregation prompt templates: problem tokens + candidate tails -> prompt token ids.

    from zaya_train.rsa import TextAggregationTemplate
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)
    template = TextAggregationTemplate.from_text(encode, max_candidates=4)
    prompt_ids = template.render(question_ids, [tail_1, tail_2, tail_3, tail_4])

Rendering works on token ids, never on text: tails are cut on token boundaries and go into the prompt
exactly as generated, with no decode/re-encode round trip to change them. The fixed text pieces are
encoded once, separately, so a tokenizer that merges across piece boundaries sees slightly different ids
than it would for the whole string; pieces should therefore start or end with whitespace/newlines. For a
chat model, put the chat markup in `intro` and `outro` (or wrap the rendered ids yourself).

The default wording follows the structure of the RSA paper's aggregation prompt (problem, candidate
solutions that may be partial or wrong, an instruction to combine them into one better solution with a
boxed answer) in this project's own words.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

DEFAULT_INTRO = (
    "Below is a problem followed by candidate responses from earlier attempts. Each candidate may show "
    "only the final part of a longer line of reasoning, and any of them may contain errors.\n\nProblem:\n"
)
DEFAULT_BEFORE_CANDIDATES = "\n\nCandidate responses:\n"
DEFAULT_CANDIDATE_HEADER = "\n--- Candidate {i} ---\n"
DEFAULT_OUTRO = (
    "\n\nCheck the candidates against the problem. Keep the steps that hold up and drop those that do "
    "not; where they disagree, decide which is right, and if none convinces you, solve the problem "
    "another way. Then write one improved, self-contained solution with clear reasoning and put the "
    "final answer in \\boxed{}.\n"
)


class AggregationTemplate(Protocol):
    def render(self, question_ids: Sequence[int], tails: Sequence[Sequence[int]]) -> list[int]:
        """Prompt ids for one aggregation prompt showing `tails` (in order) for the question."""
        ...


@dataclass(frozen=True)
class TextAggregationTemplate:
    """intro + question + before_candidates + (header_i + tail_i per candidate) + outro, all token ids."""

    intro_ids: tuple[int, ...]
    before_candidates_ids: tuple[int, ...]
    candidate_header_ids: tuple[tuple[int, ...], ...]
    outro_ids: tuple[int, ...]

    @classmethod
    def from_text(
        cls,
        encode: Callable[[str], Sequence[int]],
        max_candidates: int,
        intro: str = DEFAULT_INTRO,
        before_candidates: str = DEFAULT_BEFORE_CANDIDATES,
        candidate_header: str = DEFAULT_CANDIDATE_HEADER,
        outro: str = DEFAULT_OUTRO,
    ) -> TextAggregationTemplate:
        """`encode` must not add special tokens; `candidate_header` may use `{i}` (1-based index)."""
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")

        def ids(text: str) -> tuple[int, ...]:
            return tuple(int(x) for x in encode(text))

        return cls(
            intro_ids=ids(intro),
            before_candidates_ids=ids(before_candidates),
            candidate_header_ids=tuple(ids(candidate_header.format(i=i + 1)) for i in range(max_candidates)),
            outro_ids=ids(outro),
        )

    def overhead(self, num_candidates: int) -> int:
        """Prompt tokens the template adds around a question and `num_candidates` tails."""
        return (
            len(self.intro_ids)
            + len(self.before_candidates_ids)
            + sum(len(h) for h in self.candidate_header_ids[:num_candidates])
            + len(self.outro_ids)
        )

    def render(self, question_ids: Sequence[int], tails: Sequence[Sequence[int]]) -> list[int]:
        if len(tails) > len(self.candidate_header_ids):
            raise ValueError(
                f"tails: template was built for at most {len(self.candidate_header_ids)} candidates, "
                f"got {len(tails)}"
            )
        out = [*self.intro_ids, *question_ids, *self.before_candidates_ids]
        for header, tail in zip(self.candidate_header_ids, tails):
            out.extend(header)
            out.extend(tail)
        out.extend(self.outro_ids)
        return out


TEMPLATES = ("text", "compact")


def build_template(kind: str, encode: Callable[[str], Sequence[int]], max_candidates: int) -> TextAggregationTemplate:
    """The aggregation template `RSAConfig.template` names. "text": the default wording above. "compact": the
    question, then each tail after a `|`, then a closing `|`, for tiny character vocabularies (the nano task's),
    which hold no letters for the wording."""
    if kind == "text":
        return TextAggregationTemplate.from_text(encode, max_candidates=max_candidates)
    if kind == "compact":
        return TextAggregationTemplate.from_text(
            encode, max_candidates=max_candidates, intro="", before_candidates="", candidate_header="|", outro="|"
        )
    raise ValueError(f"unknown aggregation template {kind!r}, expected one of {TEMPLATES}")
