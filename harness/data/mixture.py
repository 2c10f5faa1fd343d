"""Weighted mixtures of sources: a deterministic blending order over the sources' sequences.

The blended stream is a function of the global sample number ``g`` (sequences consumed so far by
the whole run): sample ``g`` is drawn from the source with the largest deficit
``w_j * (n + 1) - c_j`` (``n`` samples of the segment so far, ``c_j`` of them from source ``j``;
ties to the first source) -- the greedy rule of Megatron-LM's blended datasets
(``BlendedMegatronDatasetBuilder`` / ``build_blending_indices``), which keeps every prefix within
one sequence of the weights: ``|c_j - w_j * n| < 1``. Source ``j``'s ``k``-th sample is its
sequence ``perm_{j,e}[k mod n_j]`` of epoch ``e = k // n_j``, a seeded permutation per source and
epoch, so a source that runs out starts its next epoch. Nothing here is random at run time and
nothing is stored per sample: a resume at any ``g`` gives the same batches.

A change of weights or sources (``data.allow_mixture_change=true``) starts a new *segment* at the
sample where the run resumes: each source continues from its own position, the new weights apply
to the draws from then on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_CHUNK = 4096  # samples replayed at most to locate one g (counts are cached at chunk boundaries)


@dataclass(frozen=True)
class Segment:
    """From global sample ``start`` on, draw with ``weights`` (normalized, one per source), with the
    sources' sample counters at ``counts`` when the segment starts."""

    start: int
    weights: tuple[float, ...]
    counts: tuple[int, ...]

    def to_dict(self, names: list[str]) -> dict:
        return {
            "start": self.start,
            "weights": dict(zip(names, self.weights)),
            "counts": dict(zip(names, self.counts)),
        }


def normalized(weights: list[float]) -> tuple[float, ...]:
    total = float(sum(weights))
    return tuple(float(w) / total for w in weights)


class BlendOrder:
    """Which source each global sample comes from, and its number within that source.

    Args:
        segments: the mixture's segments, ordered by ``start`` (the first starts at 0 with counts 0).
    """

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self._bounds: dict[tuple[int, int], list[int]] = {}  # (segment start, chunk start) -> counters
        self._chunks: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # the last few chunks' draws

    def _segment(self, g: int) -> Segment:
        seg = self.segments[0]
        for s in self.segments:
            if s.start <= g:
                seg = s
        return seg

    def assign(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Sources (int64) and per-source sample numbers (int64) of samples ``start .. start+count-1``."""
        sources, numbers = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
        g, stop = start, start + count
        while g < stop:
            seg = self._segment(g)
            nxt = [s.start for s in self.segments if s.start > g]
            end = min(stop, nxt[0] if nxt else stop)
            base = seg.start + (g - seg.start) // _CHUNK * _CHUNK
            src, num = self._chunk(seg, base)
            end = min(end, base + _CHUNK)
            sources.append(src[g - base : end - base])
            numbers.append(num[g - base : end - base])
            g = end
        return np.concatenate(sources), np.concatenate(numbers)

    def _chunk(self, seg: Segment, base: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``_CHUNK`` draws of ``seg`` from sample ``base`` (a chunk boundary), computed once and kept
        for the next calls (a step asks for a few samples of the same chunk several times)."""
        key = (seg.start, base)
        if key in self._chunks:
            return self._chunks[key]
        c = self._counts_at(seg, base)
        drawn = [x - x0 for x, x0 in zip(c, seg.counts)]
        w = seg.weights
        src, num = np.empty(_CHUNK, dtype=np.int64), np.empty(_CHUNK, dtype=np.int64)
        for t in range(_CHUNK):
            m = base + t - seg.start + 1
            j = max(range(len(w)), key=lambda s: w[s] * m - drawn[s])
            src[t], num[t] = j, c[j]
            c[j] += 1
            drawn[j] += 1
        self._bounds[(seg.start, base + _CHUNK)] = c
        if len(self._chunks) >= 4:
            self._chunks.pop(next(iter(self._chunks)))
        self._chunks[key] = (src, num)
        return src, num

    def _counts_at(self, seg: Segment, base: int) -> list[int]:
        """The sources' counters before sample ``base`` (a chunk boundary of ``seg``), replaying whole
        chunks forward from the last known boundary."""
        if base == seg.start:
            return list(seg.counts)
        known = [b for s, b in self._bounds if s == seg.start and b <= base]
        cached = max(known, default=seg.start)
        while cached < base:
            self._chunk(seg, cached)  # records the counters at cached + _CHUNK
            cached += _CHUNK
        return list(self._bounds[(seg.start, base)])

    def counts(self, g: int) -> list[int]:
        """Per-source sample counters before global sample ``g``."""
        seg = self._segment(g)
        base = seg.start + (g - seg.start) // _CHUNK * _CHUNK
        out = np.asarray(self._counts_at(seg, base), dtype=np.int64)
        if g > base:
            out += np.bincount(self._chunk(seg, base)[0][: g - base], minlength=len(out))
        return out.tolist()


class BlendedSequences:
    """The packed sequences of several sources as one stream indexed by the global sample number.

    ``len()`` is the sum of the sources' sequences (one "epoch" of the plan); :meth:`get` takes
    global sample numbers and returns their sequences.
    """

    def __init__(self, names: list[str], sources: list, order: BlendOrder, seed: int):
        self.names, self.sources, self.order, self.seed = names, sources, order, seed
        self.seq_len = sources[0].seq_len
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def permutation(self, j: int, epoch: int) -> np.ndarray:
        """The order of source ``j``'s sequences in its epoch ``epoch``."""
        key = (j, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            self._perms[key] = np.random.default_rng([self.seed, 1 + j, epoch]).permutation(
                len(self.sources[j])
            )
        return self._perms[key]

    def locate(self, global_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For consecutive global sample numbers: ``(source, source epoch, sequence index)`` of each."""
        start, count = int(global_ids[0]), len(global_ids)
        if count and not np.array_equal(global_ids, np.arange(start, start + count)):
            raise ValueError("blended samples are read in consecutive runs")
        sources, numbers = self.order.assign(start, count)
        sizes = np.array([len(s) for s in self.sources], dtype=np.int64)
        epochs = numbers // sizes[sources]
        index = np.array(
            [self.permutation(j, e)[k % sizes[j]] for j, e, k in zip(sources, epochs, numbers)],
            dtype=np.int64,
        )
        return sources, epochs, index

    def get(self, global_ids: np.ndarray) -> torch.Tensor:
        """Sequences of global samples ``global_ids`` as a ``(len, seq_len + 1)`` int64 tensor."""
        sources, _, index = self.locate(np.asarray(global_ids, dtype=np.int64))
        rows = torch.empty((len(index), self.seq_len + 1), dtype=torch.int64)
        for j in np.unique(sources):
            mine = np.nonzero(sources == j)[0]
            rows[torch.from_numpy(mine)] = self.sources[j].get(index[mine])
        return rows

    def counts_by_source(self, global_ids: np.ndarray) -> dict[str, int]:
        """Sequences per source name among consecutive global samples ``global_ids``."""
        if len(global_ids) == 0:
            return {n: 0 for n in self.names}
        sources, _ = self.order.assign(int(global_ids[0]), len(global_ids))
        counts = np.bincount(sources, minlength=len(self.names))
        return {n: int(c) for n, c in zip(self.names, counts)}


def resume_mixture(
    train: BlendedSequences, weights: dict[str, float], saved: dict | None, allow_change: bool, path: str
) -> tuple[int | None, str | None]:
    """Continue a checkpoint's mixture: its segments when the sources and weights are the same; a new
    segment from its sample position when they differ and ``data.allow_mixture_change`` is set.

    Returns:
        ``(global sample position to resume at, message)`` for a changed mixture, else ``(None, None)``.
    Raises:
        CheckpointError: the mixture differs and ``allow_change`` is off (the difference shown), or the
            checkpoint has no mixture while this run has one.
    """
    from harness.errors import CheckpointError

    if saved is None:
        raise CheckpointError(
            f"checkpoint {path} was trained on one source (data.path), this run on a mixture "
            "(data.sources); use a new run_name / hydra.run.dir"
        )
    names = train.names
    before = {n: round(w, 12) for n, w in saved["weights"].items()}
    now = {n: round(w, 12) for n, w in weights.items()}
    if before == now:
        train.order = BlendOrder([_segment(s, names) for s in saved["segments"]])
        return None, None
    diff = _diff(before, now)
    if not allow_change:
        raise CheckpointError(
            f"checkpoint {path} was trained on another mixture ({diff}); set data.allow_mixture_change=true "
            "to continue with the new one (every source from its current position), or use a new run_name"
        )
    g = int(saved["samples"])
    counts = tuple(int(saved["counts"].get(n, 0)) for n in names)
    train.order = BlendOrder([Segment(g, normalized([weights[n] for n in names]), counts)])
    shown = ", ".join(f"{n} at sample {c}" for n, c in zip(names, counts))
    return g, f"mixture changed ({diff}): the new weights apply from here, each source continues ({shown})"


def _segment(d: dict, names: list[str]) -> Segment:
    return Segment(
        int(d["start"]),
        tuple(float(d["weights"][n]) for n in names),
        tuple(int(d["counts"][n]) for n in names),
    )


def _diff(before: dict, now: dict) -> str:
    parts = [f"-{n}" for n in before if n not in now] + [f"+{n}" for n in now if n not in before]
    parts += [
        f"{n} weight {before[n]:.4g} -> {now[n]:.4g}" for n in now if n in before and before[n] != now[n]
    ]
    return ", ".join(parts)
