"""Evaluation: greedy transcripts, Whisper's English normaliser, corpus WER/CER, gating statistics.

WER and CER are corpus-level (total edits over total reference words/characters, not a mean of per-utterance
rates), computed with jiwer after both sides pass through Whisper's ``EnglishTextNormalizer``.
"""
import itertools
import json
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .audio import SAMPLE_RATE
from .fileio import atomic_write_text

NORMALIZER_FILE = "normalizer.json"


def english_spelling_mapping(whisper: Optional[str]) -> Dict[str, str]:
    """The British-to-American spelling map Whisper checkpoints ship as ``normalizer.json`` ({} when absent).

    Looks in a local checkpoint directory, then in the local Hugging Face cache for a hub id; never downloads.
    transformers itself ships the normaliser code but not this file.
    """
    if not whisper:
        return {}
    path = os.path.join(whisper, NORMALIZER_FILE)
    if not os.path.isdir(whisper):
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(whisper, NORMALIZER_FILE)
        except Exception:  # noqa: BLE001 - not a valid repo id, no hub client: no mapping
            cached = None
        path = cached if isinstance(cached, str) else ""
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def text_normalizer(whisper: Optional[str] = None) -> Callable[[str], str]:
    """Whisper's English text normaliser (lower case, no punctuation, numbers and spellings standardised)."""
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer
    return EnglishTextNormalizer(english_spelling_mapping(whisper))


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> Dict[str, float]:
    """Corpus WER and CER of already-normalised strings, with the edit counts behind them.

    Utterances whose reference is empty contribute their hypothesis words/characters as insertions.
    """
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"references and hypotheses differ in length: {len(references)} vs {len(hypotheses)}")
    pairs = [(r, h) for r, h in zip(references, hypotheses) if r.strip()]
    extra_words = sum(len(h.split()) for r, h in zip(references, hypotheses) if not r.strip())
    extra_chars = sum(len(h) for r, h in zip(references, hypotheses) if not r.strip())
    out = {}
    for unit, process, extra in (("word", jiwer.process_words, extra_words),
                                 ("char", jiwer.process_characters, extra_chars)):
        edits, ref_len = extra, 0
        if pairs:
            o = process([r for r, _ in pairs], [h for _, h in pairs])
            edits += o.substitutions + o.deletions + o.insertions
            ref_len = o.substitutions + o.deletions + o.hits
        out[f"{unit}_errors"] = edits
        out[f"reference_{unit}s"] = ref_len
        out["wer" if unit == "word" else "cer"] = edits / ref_len if ref_len else float(edits > 0)
    return out


def eval_batches(source, batch_size: int, *, limit: Optional[int] = None, bucket_size: int = 512) -> Iterator:
    """Every example of ``source`` (a ``ParquetSpeechSource``) once, the first ``limit`` in file order, in batches.

    ``bucket_size`` consecutive examples are sorted by duration and cut into batches of at most ``batch_size``, so
    padding stays small while memory holds one bucket of audio; each batch's ``positions`` give its examples' places
    in file order (:func:`evaluate` reports in that order). Raises ``ValueError`` (naming the files and the skip
    counts) when ``source`` has no usable row, rather than yield nothing.
    """
    from .data import collate

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    examples = enumerate(iter(source) if limit is None else itertools.islice(source, limit))
    served = 0
    while True:
        bucket = sorted(itertools.islice(examples, bucket_size), key=lambda e: len(e[1].audio))
        if not bucket:
            break
        served += len(bucket)
        for start in range(0, len(bucket), batch_size):
            part = bucket[start:start + batch_size]
            batch = collate([example for _, example in part])
            batch.positions = [position for position, _ in part]
            yield batch
    if not served and limit != 0:
        raise source.no_usable_rows()


@torch.no_grad()
def evaluate(model, batches: Iterable, *, normalize: Callable[[str], str], max_new_tokens: Optional[int] = None,
             records_path: Optional[str] = None, long_form: bool = False, total: Optional[int] = None,
             progress: Optional[bool] = None) -> Dict[str, Any]:
    """Greedy transcripts of every batch, scored against their references.

    Returns ``{"utterances", "long_form_utterances", "wer", "cer", "word_errors", "reference_words", "char_errors",
    "reference_chars", "loss" (mean over target tokens), "gating" (per steered layer, see
    :class:`~steermoe.analysis.GatingAccumulator`)}``. ``records_path`` receives one JSON line per utterance:
    ``{"id", "reference", "hypothesis"}`` (raw texts; the scores use their normalised forms), in the order of the
    batches' ``positions`` when they have them (as :func:`eval_batches` makes them), else as served.
    ``max_new_tokens`` None: the model's own decoding budget.

    ``long_form``: utterances longer than the encoder's window (30 s) are transcribed in windows
    (:mod:`steermoe.longform`) and scored by WER/CER; loss and gating cover the others only. Without it such an
    utterance raises ``ValueError`` (filter them out with ``max_seconds``, which counts them as skipped).
    ``progress``: a progress bar of utterances on stderr (``total`` of them expected); default: when stderr is a TTY.
    """
    from tqdm.auto import tqdm

    from .analysis import GatingAccumulator
    from .longform import transcribe_long
    from .train import autocast_for

    was_training = model.training
    model.eval()
    max_samples = model.window_samples
    references, hypotheses = [], []
    loss_sum = tokens = 0.0
    gating = GatingAccumulator(layer_ids=model.encoder.steered_layers)
    records = []
    long_count = 0
    # drawn on every batch (a batch takes milliseconds at least), so what it shows never depends on the clock
    bar = tqdm(total=total, unit="utt", desc="eval", leave=False, dynamic_ncols=True, mininterval=0, miniters=1,
               disable=None if progress is None else not progress)
    with autocast_for(model), bar:
        for batch in batches:
            is_long = batch.lengths > max_samples
            if bool(is_long.any()) and not long_form:
                raise ValueError(f"utterances longer than {max_samples} samples ({max_samples / SAMPLE_RATE:g} s, the "
                                 f"encoder's window): {[i for i, x in zip(batch.ids, is_long) if x]}; pass "
                                 "long_form=True to transcribe them in windows, or skip them with max_seconds")
            texts = [""] * len(batch)
            short = [i for i in range(len(batch)) if not is_long[i]]
            if short:
                part = _rows(batch, short)
                features, mask = model.features(part)
                out = model(features, attention_mask=mask, texts=part.texts, prompts=part.prompts,
                            return_gating=True)
                loss_sum += float(out.loss_sum)
                tokens += int(out.num_tokens)
                gating.update(out.gating, out.gating_mask)
                generated = model.generate(features, attention_mask=mask, prompts=part.prompts,
                                           max_new_tokens=max_new_tokens)
                for i, text in zip(short, generated):
                    texts[i] = text
            long_rows = ((i, batch.waveforms[i, :int(batch.lengths[i])].cpu().numpy(), batch.prompts[i])
                         for i in range(len(batch)) if is_long[i])
            for i, text in transcribe_long(model, long_rows, max_new_tokens=max_new_tokens, batch_size=len(batch)):
                texts[i] = text
                long_count += 1
            positions = batch.positions or [None] * len(batch)
            for uid, reference, hypothesis, position in zip(batch.ids, batch.texts, texts, positions):
                references.append(normalize(reference))
                hypotheses.append(normalize(hypothesis))
                records.append((position, {"id": uid, "reference": reference, "hypothesis": hypothesis}))
            bar.update(len(batch))
    model.train(was_training)
    if all(position is not None for position, _ in records):
        records.sort(key=lambda r: r[0])
    if records_path:
        write_jsonl([record for _, record in records], records_path)
    return {"utterances": len(records), "long_form_utterances": long_count, **error_rates(references, hypotheses),
            "loss": loss_sum / tokens if tokens else float("nan"),
            "gating": gating.result() if len(records) > long_count else None}


def _rows(batch, rows: List[int]):
    """The sub-batch of ``batch``'s ``rows`` (all of them: ``batch`` itself), padded to its own longest row."""
    from .data import SpeechBatch

    if len(rows) == len(batch):
        return batch
    lengths = batch.lengths[rows]
    return SpeechBatch([batch.ids[i] for i in rows], batch.waveforms[rows, :int(lengths.max())], lengths,
                       [batch.texts[i] for i in rows], [batch.prompts[i] for i in rows])


def transcribe_paths(model, paths: Sequence[str], *, max_new_tokens: Optional[int] = None,
                     batch_size: int = 8) -> Iterator[Tuple[str, Union[str, ValueError]]]:
    """``(path, transcript)`` per audio file (any format soundfile reads, any length), in order, each as soon as it
    is done; ``(path, ValueError naming the file)`` for one that cannot be read, decoded or used (see
    ``load_audio_file``), without stopping the others. ``max_new_tokens`` None: the model's own.

    Files longer than the encoder's 30 s window are transcribed in windows (see :mod:`steermoe.longform`);
    ``batch_size`` windows are transcribed together, across files.
    """
    from .audio import load_audio_file
    from .longform import transcribe_long

    errors: Dict[int, ValueError] = {}

    def items():
        for i, path in enumerate(paths):
            try:
                yield i, load_audio_file(path), None
            except ValueError as err:
                errors[i] = err
                yield i, None, None

    for i, text in transcribe_long(model, items(), max_new_tokens=max_new_tokens, batch_size=batch_size):
        yield paths[i], errors.pop(i) if text is None else text


def transcribe_files(model, paths: Sequence[str], *, max_new_tokens: Optional[int] = None,
                     batch_size: int = 8) -> List[str]:
    """Greedy transcripts of audio files (any format soundfile reads, any length), in order.

    Raises ``ValueError`` naming the file when one cannot be read, decoded or used (see ``load_audio_file``);
    :func:`transcribe_paths` reports it and goes on instead.
    """
    out: List[str] = []
    for _, text in transcribe_paths(model, paths, max_new_tokens=max_new_tokens, batch_size=batch_size):
        if isinstance(text, ValueError):
            raise text
        out.append(text)
    return out


def write_jsonl(records: Iterable[Dict[str, Any]], path: str) -> None:
    """One JSON object per line, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_summary(summary: Dict[str, Any], path: str) -> None:
    """``summary`` as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
