"""Long-form audio: windows that fit Whisper's 30 s, cut at quiet points, transcribed in batches and joined.

A waveform longer than one window is cut where it is quietest: each cut is the centre of the lowest-energy
``overlap_seconds`` stretch within the last ``search_seconds`` of the window, and the two windows on either side of
a cut share that stretch. In speech the quietest stretch is a pause between words, so no word is heard twice and the
transcripts are simply concatenated; where no pause exists (music, one unbroken word) a word at the seam may be
transcribed by both windows, and :func:`join_transcripts` drops a repeat of up to ``max_repeat_words`` words at each
seam (compared case- and punctuation-blind; a genuine repetition exactly at a seam is lost with it).
"""
import re
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .audio import MIN_SAMPLES, SAMPLE_RATE

OVERLAP_SECONDS = 0.2     # shared by neighbouring windows, centred on the cut
SEARCH_SECONDS = 5.0      # a cut lies within the last this-many seconds of its window
HOP_SECONDS = 0.01        # spacing of the candidate cut points


def window_bounds(audio: np.ndarray, max_samples: int, *, sample_rate: int = SAMPLE_RATE,
                  overlap_seconds: float = OVERLAP_SECONDS,
                  search_seconds: float = SEARCH_SECONDS) -> List[Tuple[int, int]]:
    """Windows ``[(start, end), ...]`` (sample indices, end exclusive) covering the (S,) ``audio``, each at most
    ``max_samples`` long.

    One window ``[(0, S)]`` when ``S <= max_samples``. Otherwise each cut ``c`` is the centre of the quietest
    (lowest mean-square) ``overlap_seconds`` stretch whose window still fits, searched over the last
    ``search_seconds`` of the window at a 10 ms hop (the latest of equally quiet stretches); the window ends at
    ``c + overlap / 2`` and the next starts at ``c - overlap / 2``. Every window but the last is longer than
    ``max_samples - search``, and the last holds at least ``MIN_SAMPLES``.
    """
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio must be a 1-D waveform; got shape {audio.shape}")
    total = len(audio)
    half = int(round(overlap_seconds * sample_rate / 2))
    search = int(round(search_seconds * sample_rate))
    hop = max(1, int(round(HOP_SECONDS * sample_rate)))
    if half < 1 or search < hop:
        raise ValueError(f"need overlap_seconds > 0 and search_seconds >= {HOP_SECONDS}; got overlap_seconds="
                         f"{overlap_seconds}, search_seconds={search_seconds}")
    if max_samples < 2 * (search + 2 * half) or max_samples < 2 * MIN_SAMPLES:
        raise ValueError(f"max_samples={max_samples} is too short for search_seconds={search_seconds} and "
                         f"overlap_seconds={overlap_seconds}")
    if total <= max_samples:
        return [(0, total)]
    bounds, start = [], 0
    while total - start > max_samples:
        last = min(start + max_samples - half, total - MIN_SAMPLES)      # the latest cut whose windows fit
        cuts = np.arange(last, last - search, -hop)                      # latest first: argmin keeps the latest tie
        origin = cuts[-1] - half                                         # the searched stretch, as a running sum
        power = np.concatenate([[0.0], np.cumsum(np.square(audio[origin:last + half], dtype=np.float64))])
        lo, hi = cuts - half - origin, np.minimum(cuts + half, total) - origin
        energy = (power[hi] - power[lo]) / np.maximum(hi - lo, 1)
        cut = int(cuts[np.argmin(energy)])
        bounds.append((start, cut + half))
        start = cut - half
    bounds.append((start, total))
    return bounds


_WORD = re.compile(r"\w+")


def join_transcripts(parts: Sequence[str], max_repeat_words: int = 2) -> str:
    """The transcripts of consecutive windows as one text, dropping a word repeat at each seam.

    At each seam the longest run of at most ``max_repeat_words`` words that ends one part and starts the next
    (compared lower-cased, punctuation ignored) is kept once. Empty parts are left out.
    """
    words: List[str] = []
    for part in parts:
        new = part.split()
        for k in range(min(max_repeat_words, len(words), len(new)), 0, -1):
            if [_key(w) for w in words[-k:]] == [_key(w) for w in new[:k]]:
                new = new[k:]
                break
        words.extend(new)
    return " ".join(words)


def _key(word: str) -> str:
    return "".join(_WORD.findall(word.lower()))


def transcribe_long(model, items: Iterable[Tuple[Any, Optional[np.ndarray], Optional[str]]], *,
                    max_new_tokens: Optional[int], batch_size: int) -> Iterator[Tuple[Any, Optional[str]]]:
    """Greedy transcripts of waveforms of any length: ``(key, float32 (S,) 16 kHz samples or None, prompt)`` items
    in, ``(key, transcript)`` out, in the same order (None in, None out).

    Each waveform is cut by :func:`window_bounds` into windows the model's encoder takes; windows (of any items) are
    transcribed ``batch_size`` at a time and joined by :func:`join_transcripts`. Items are read lazily and each is
    yielded as soon as its last window is done, so memory holds about one batch of windows beyond the current item.
    """
    import torch

    from .data import SpeechExample, collate
    from .train import autocast_for

    max_samples = model.window_samples
    done: List[list] = []           # per item in order: [key, window transcripts, windows still pending]
    pending: List[Tuple[list, int, SpeechExample]] = []

    def run(windows):
        batch = collate([example for _, _, example in windows])
        with torch.no_grad(), autocast_for(model):
            features, mask = model.features(batch)
            texts = model.generate(features, attention_mask=mask, prompts=batch.prompts,
                                   max_new_tokens=max_new_tokens)
        for (entry, index, _), text in zip(windows, texts):
            entry[1][index] = text
            entry[2] -= 1

    def finished():
        while done and done[0][2] == 0:
            key, parts, _ = done.pop(0)
            yield key, None if parts is None else join_transcripts(parts)

    for key, audio, prompt in items:
        if audio is None:
            done.append([key, None, 0])
        else:
            bounds = window_bounds(audio, max_samples)
            entry = [key, [""] * len(bounds), len(bounds)]
            done.append(entry)
            pending.extend((entry, i, SpeechExample(str(key), audio[a:b], "", prompt))
                           for i, (a, b) in enumerate(bounds))
        while len(pending) >= batch_size:
            run(pending[:batch_size])
            del pending[:batch_size]
        yield from finished()
    if pending:
        run(pending)
    yield from finished()
