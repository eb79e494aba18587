"""A weighted mixture of data sources, interleaved by `datasets` (ZAYA1's phases each train on one: web, code,
math, long chain-of-thought, ... in stated proportions; ZAYA1-8B report, arXiv 2605.05365, Tables II-III).

    sources = [WeightedSource("web", SourceConfig(path="web/*.jsonl"), 0.6),
               WeightedSource("code", SourceConfig(path="code/*.jsonl"), 0.4)]
    lengths = probe_lengths(sources, lambda record: len(tokenizer(record["text"])["input_ids"]))
    probabilities = draw_probabilities([s.weight for s in sources], lengths, unit="tokens")
    for record, index in interleave_records(sources, probabilities, seed=0, stats=stats): ...

Weights are shares of tokens by default (`unit="tokens"`): a mixture given in percentages is a share of the
training tokens, and sources differ in document length by orders of magnitude (a long chain-of-thought trace
against a web page). A document sampler delivers a token share w_i when it draws source i with probability
p_i proportional to w_i / L_i, L_i being the source's mean document length, estimated from its first `probe`
documents; the share then holds up to that estimate and sampling noise. `unit="documents"` draws documents with
probabilities proportional to the weights. The trainer logs the share each source actually delivers, per step
and in total (`data/share/<name>`, `data/share_total/<name>`), from the windows' `source_ids`.

The draw is `datasets.interleave_datasets(..., probabilities, seed, stopping_strategy="all_exhausted")`: a source
that runs out starts over (it is upsampled) until every source has been read through once, which ends the
pass, so the shares hold over the whole pass. It is a function of the seed and the files: every rank reads the
same stream.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from zaya_train.data.sources import SourceConfig, SourceStats, iter_records

UNITS = ("tokens", "documents")


@dataclass
class WeightedSource:
    name: str
    source: SourceConfig
    weight: float


def probe_lengths(
    sources: Sequence[WeightedSource], length: Callable[[dict[str, Any]], int], probe: int = 256
) -> list[float]:
    """Mean `length` of the first `probe` usable records of each source; ValueError naming a source that has
    none."""
    means = []
    for source in sources:
        sizes = [length(r) for r in itertools.islice(iter_records(source.source, SourceStats()), probe)]
        if not sizes:
            raise ValueError(f"source {source.name!r} holds no usable record")
        means.append(max(sum(sizes) / len(sizes), 1.0))
    return means


def draw_probabilities(weights: Sequence[float], mean_lengths: Sequence[float], unit: str) -> list[float]:
    """The probability of drawing each source's next document so that the weights hold as shares of `unit`."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    per_document = [w / n for w, n in zip(weights, mean_lengths, strict=True)] if unit == "tokens" else list(weights)
    total = sum(per_document)
    return [p / total for p in per_document]


def interleave_records(
    sources: Sequence[WeightedSource], probabilities: Sequence[float], seed: int,
    stats: dict[str, SourceStats] | None = None,
) -> Iterator[tuple[dict[str, Any], int]]:
    """(record, source index) in the seeded interleaved order; each source's skipped rows go to `stats[name]`."""
    from datasets import IterableDataset, interleave_datasets

    stats = stats if stats is not None else {}

    def records(index: int) -> Callable[[], Iterator[dict[str, Any]]]:
        source = sources[index]
        source_stats = stats.setdefault(source.name, SourceStats())

        # A closure, not gen_kwargs: datasets copies gen_kwargs, which would lose the skip counts.
        def generate() -> Iterator[dict[str, Any]]:
            for record in iter_records(source.source, source_stats):
                yield {"source_index": index, "record": record}

        return generate

    if len(sources) == 1:
        yield from ((row["record"], 0) for row in records(0)())
        return
    mixed = interleave_datasets(
        [IterableDataset.from_generator(records(i)) for i in range(len(sources))],
        probabilities=list(probabilities), seed=seed, stopping_strategy="all_exhausted",
    )
    for row in mixed:
        yield row["record"], row["source_index"]
