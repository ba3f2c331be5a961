"""Evaluation: greedy transcripts, Whisper's English normaliser, corpus WER/CER, gating statistics.

WER and CER are corpus-level (total edits over total reference words/characters, not a mean of per-utterance
rates), computed with jiwer after both sides pass through Whisper's ``EnglishTextNormalizer``.
"""
import itertools
import json
import os
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch

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
    padding stays small while memory holds one bucket of audio. Raises ``ValueError`` (naming the files and the
    skip counts) when ``source`` has no usable row, rather than yield nothing.
    """
    from .data import collate

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    examples = iter(source) if limit is None else itertools.islice(source, limit)
    served = 0
    while True:
        bucket = sorted(itertools.islice(examples, bucket_size), key=lambda e: len(e.audio))
        if not bucket:
            break
        served += len(bucket)
        for start in range(0, len(bucket), batch_size):
            yield collate(bucket[start:start + batch_size])
    if not served and limit != 0:
        raise source.no_usable_rows()


@torch.no_grad()
def evaluate(model, batches: Iterable, *, normalize: Callable[[str], str], max_new_tokens: Optional[int] = None,
             records_path: Optional[str] = None) -> Dict[str, Any]:
    """Greedy transcripts of every batch, scored against their references.

    Returns ``{"utterances", "wer", "cer", "word_errors", "reference_words", "char_errors", "reference_chars",
    "loss" (mean over target tokens), "gating" (per steered layer, see
    :class:`~steermoe.analysis.GatingAccumulator`)}``. ``records_path`` receives one JSON line per utterance:
    ``{"id", "reference", "hypothesis"}`` (raw texts; the scores use their normalised forms).
    ``max_new_tokens`` None: the model's own decoding budget.
    """
    from .analysis import GatingAccumulator
    from .train import autocast_for

    was_training = model.training
    model.eval()
    references, hypotheses = [], []
    loss_sum = tokens = 0.0
    gating = GatingAccumulator(layer_ids=model.encoder.steered_layers)
    records = []
    with autocast_for(model):
        for batch in batches:
            features, mask = model.features(batch)
            out = model(features, attention_mask=mask, texts=batch.texts, prompts=batch.prompts, return_gating=True)
            loss_sum += float(out.loss_sum)
            tokens += int(out.num_tokens)
            gating.update(out.gating, out.gating_mask)
            texts = model.generate(features, attention_mask=mask, prompts=batch.prompts,
                                   max_new_tokens=max_new_tokens)
            for uid, reference, hypothesis in zip(batch.ids, batch.texts, texts):
                references.append(normalize(reference))
                hypotheses.append(normalize(hypothesis))
                records.append({"id": uid, "reference": reference, "hypothesis": hypothesis})
    model.train(was_training)
    if records_path:
        write_jsonl(records, records_path)
    return {"utterances": len(records), **error_rates(references, hypotheses),
            "loss": loss_sum / tokens if tokens else float("nan"),
            "gating": gating.result() if records else None}


@torch.no_grad()
def transcribe_files(model, paths: Sequence[str], *, max_new_tokens: Optional[int] = None,
                     batch_size: int = 8) -> List[str]:
    """Greedy transcripts of audio files (any format soundfile reads), in order (``max_new_tokens`` None: the
    model's own).

    Raises ``ValueError`` naming the file when one cannot be read, decoded or used (see ``load_audio_file``).
    """
    from .audio import load_audio_file
    from .data import SpeechExample, collate
    from .train import autocast_for

    out: List[str] = []
    with autocast_for(model):
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            batch = collate([SpeechExample(id=p, audio=load_audio_file(p), text="", prompt=None) for p in chunk])
            features, mask = model.features(batch)
            out.extend(model.generate(features, attention_mask=mask, prompts=batch.prompts,
                                      max_new_tokens=max_new_tokens))
    return out


def write_jsonl(records: Iterable[Dict[str, Any]], path: str) -> None:
    """One JSON object per line, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_summary(summary: Dict[str, Any], path: str) -> None:
    """``summary`` as indented JSON, written atomically."""
    atomic_write_text(path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
