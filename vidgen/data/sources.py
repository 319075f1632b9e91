"""Weighted mixtures of datasets: ``data.train.sources: [{name, shards, weight}]``.

Each source is its own endless shard stream (shards drawn with replacement from that
source's list, from the stream's own generator). Every sample of a training stream comes
from a source drawn with probability ``weight / sum(weights)`` from one more seeded
generator of the stream, so a stream's samples are a pure function of (seed, rank, worker,
epoch) like everything else in ``vidgen.data.streams``, and a run resumed mid-epoch
regenerates exactly the same mixture. Sources mix per sample, before shuffling, bucketing
and packing: the weights are the share of samples each source gets (a source of images
and one of clips fill image and clip buckets in that proportion). The loaders count each
source's samples per batch (``source/<name>/samples``; logged as
``data/source/<name>/samples``).

Video, image and latent data mix the same way; a source of latents must have been encoded
with the same VAE and text encoder as the others (``read_latents_info`` checks).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vidgen.data.shards import expand_shards

_NAME_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass(frozen=True)
class Source:
    """One dataset of a mixture: its name (for logs), its shard list and its weight."""

    name: str
    shards: tuple[str, ...]
    weight: float = 1.0


def parse_sources(sources: Sequence[Mapping] | None, shards, where: str = "data.train") -> list[Source]:
    """The stream's sources: ``sources`` (``[{name, shards, weight}]``) or, when it is None,
    one source named "main" of ``shards``. Errors name the source and what would be valid."""
    if sources is None:
        if shards is None:
            raise ValueError(f"{where}: give shards (a pattern) or sources ([{{name, shards, weight}}])")
        return [Source("main", tuple(expand_shards(shards)), 1.0)]
    if shards is not None:
        raise ValueError(
            f"{where}: give shards or sources, not both (got shards={shards!r}); "
            f"set {where}.shards=null to train on the sources"
        )
    if isinstance(sources, (str, Mapping)) or not isinstance(sources, Sequence) or not sources:
        raise ValueError(f"{where}.sources must be a non-empty list of {{name, shards, weight}}, got {sources!r}")
    out, seen = [], set()
    for i, spec in enumerate(sources):
        label = f"{where}.sources[{i}]"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{label} must be a mapping with name, shards, weight; got {spec!r}")
        unknown = sorted(set(spec) - {"name", "shards", "weight"})
        if unknown:
            raise ValueError(f"{label}: unknown key(s) {unknown}; valid keys are ['name', 'shards', 'weight']")
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME_OK.match(name):
            raise ValueError(f"{label}: name must be letters, digits, '_' or '-', got {name!r}")
        if name in seen:
            raise ValueError(f"{label}: the name {name!r} is used twice")
        seen.add(name)
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"{label} ({name}): weight must be a finite number > 0, got {weight!r}")
        if spec.get("shards") is None:
            raise ValueError(f"{label} ({name}): shards is missing")
        try:
            found = expand_shards(spec["shards"])
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{label} ({name}): {err}") from err
        out.append(Source(name, tuple(found), float(weight)))
    return out


def count_sources(names) -> dict[str, int]:
    """``{"source/<name>/samples": n}`` over the source names of a batch's samples (None:
    not from a mixture)."""
    counts: dict[str, int] = {}
    for name in names:
        if name is not None:
            key = f"source/{name}/samples"
            counts[key] = counts.get(key, 0) + 1
    return counts


def mix(streams: Sequence[Iterator], weights: Sequence[float], rng: np.random.Generator) -> Iterator[tuple[int, object]]:
    """Endless ``(source index, item)``: each item from the stream of a source drawn with
    probability proportional to ``weights`` (one ``rng.random()`` per item)."""
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64))
    while True:
        i = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(streams) - 1)
        yield i, next(streams[i])
