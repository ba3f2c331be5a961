"""Speech data: parquet rows → checked 16 kHz examples → length-grouped, sharded, resumable batches.

``ParquetSpeechSource`` streams parquet files one row group at a time with pyarrow. Bad rows are skipped and
counted by reason in ``source.skipped`` (a ``collections.Counter``), never silently dropped:

    missing_audio       null audio, a null sample array, or ``{bytes: null}`` whose ``path`` is not a readable file
    undecodable_audio   bytes libsndfile cannot decode, raw samples whose sampling rate is not a finite integer > 0,
                        channels of unequal length, or any other error while decoding the row
    empty_audio         zero samples
    non_finite_audio    NaN or ±inf samples
    missing_text        null, non-string or blank transcript
    too_short           under ``min_seconds``, or under 400 samples (one 25 ms analysis window)
    too_long            over ``max_seconds``
    text_too_long       more than ``max_text_tokens`` tokens

``SpeechBatches`` turns a source into batches: rows are split between data-parallel ranks, read in buckets,
sorted by length inside each bucket and cut into batches, so padding stays small; everything is seeded.
"""
import bisect
import glob
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .audio import MIN_SAMPLES, SAMPLE_RATE, decode_audio, resample

logger = logging.getLogger(__name__)

_READ_CHUNK_ROWS = 64


@dataclass
class SpeechExample:
    """One utterance: float32 (S,) mono samples at 16 kHz, its transcript and an optional per-example instruction."""

    id: str
    audio: np.ndarray
    text: str
    prompt: Optional[str] = None

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass
class SpeechBatch:
    """A padded batch: ``waveforms`` (B, S_max) float32, zero after each sample's ``lengths`` (B,) long samples."""

    ids: List[str]
    waveforms: Tensor
    lengths: Tensor
    texts: List[str]
    prompts: List[Optional[str]]

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device, non_blocking: bool = False) -> "SpeechBatch":
        return SpeechBatch(self.ids, self.waveforms.to(device, non_blocking=non_blocking),
                           self.lengths.to(device, non_blocking=non_blocking), self.texts, self.prompts)


def collate(examples: Sequence[SpeechExample]) -> SpeechBatch:
    """Zero-pad ``examples`` into a :class:`SpeechBatch` (on the CPU)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    lengths = torch.tensor([len(e.audio) for e in examples], dtype=torch.long)
    waveforms = torch.zeros(len(examples), int(lengths.max()), dtype=torch.float32)
    rows = waveforms.numpy()    # a view: numpy copies each (possibly read-only, zero-copy arrow) array in once
    for row, example in zip(rows, examples):
        row[: len(example.audio)] = example.audio
    return SpeechBatch([e.id for e in examples], waveforms, lengths, [e.text for e in examples],
                       [e.prompt for e in examples])


def resolve_parquet_files(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> List[str]:
    """Files named by ``paths`` (files, directories searched recursively for ``*.parquet``, or globs), in order.

    A file named more than once (also through another spelling or a symlink) is kept once, as first named.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: List[str] = []
    seen = set()
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
            if not found:
                raise FileNotFoundError(f"no .parquet file under the directory {path}")
        elif glob.has_magic(path):
            found = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
            if not found:
                raise FileNotFoundError(f"no file matches {path}")
        elif os.path.isfile(path):
            found = [path]
        else:
            raise FileNotFoundError(f"data path not found: {path}")
        for file in found:
            if os.path.realpath(file) not in seen:
                seen.add(os.path.realpath(file))
                files.append(file)
    if not files:
        raise ValueError("paths must name at least one parquet file, directory or glob")
    return files


class _Skip(Exception):
    """A row that cannot be used; ``args`` = (reason, detail)."""


class ParquetSpeechSource:
    """Iterable of :class:`SpeechExample` over parquet files, streamed one row group at a time.

    Audio columns accepted: the ``datasets`` ``Audio`` struct ``{bytes, path}`` (bytes in any format libsndfile
    reads; a null ``bytes`` falls back to ``path``, absolute or relative to the parquet file), a ``{array,
    sampling_rate}`` struct, a binary column of encoded bytes, or a list column of samples with the rate in
    ``sampling_rate_column``. Raw samples are numbers (S,), or number lists (C, S) or (S, C) whose shorter axis is
    taken as the channels; integer PCM is scaled to [-1, 1) as in decoded WAV files. Audio is mixed to mono and
    resampled to 16 kHz.

    Args:
        paths: parquet files, directories or globs (see :func:`resolve_parquet_files`).
        audio_column, text_column: required columns; ``prompt_column``, ``id_column``: optional ones (ids default
            to ``<file>:<row>``, the file's path relative to the directory holding all the files; an empty prompt
            means the model's default instruction).
        min_seconds, max_seconds, max_text_tokens: filters (``max_text_tokens`` needs ``tokenizer``).
        sampling_rate_column: the rate column used with a float list audio column.

    Every file is opened at construction: one that is not parquet, lacks a column, or whose audio column has a
    layout not listed above raises ``ValueError`` naming the file (and listing its columns). ``skipped`` counts the
    skipped rows by reason; ``rows_read`` counts the rows looked at.
    """

    def __init__(self, paths, audio_column: str = "audio", text_column: str = "text",
                 prompt_column: Optional[str] = None, id_column: Optional[str] = None,
                 min_seconds: Optional[float] = None, max_seconds: Optional[float] = None,
                 max_text_tokens: Optional[int] = None, tokenizer=None,
                 sampling_rate_column: str = "sampling_rate"):
        if max_text_tokens is not None and tokenizer is None:
            raise ValueError("max_text_tokens needs a tokenizer to count tokens with")
        self.audio_column, self.text_column = audio_column, text_column
        self.prompt_column, self.id_column = prompt_column, id_column
        self.sampling_rate_column = sampling_rate_column
        self.min_seconds, self.max_seconds = min_seconds, max_seconds
        self.max_text_tokens, self.tokenizer = max_text_tokens, tokenizer
        self.files = resolve_parquet_files(paths)
        self._names = _relative_names(self.files)
        self.skipped: Counter = Counter()
        self.rows_read = 0
        # (file index, row group, rows, first row's index in its file), and the audio layout per file
        self.units: List[Tuple[int, int, int, int]] = []
        self._audio_kind: List[str] = []
        for index, file in enumerate(self.files):
            parquet = self._open(file)
            self._audio_kind.append(self._check_columns(file, parquet.schema_arrow))
            offset = 0
            for group in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                self.units.append((index, group, rows, offset))
                offset += rows
        self._open_file: Tuple[Optional[int], object] = (None, None)
        self._last_group: Tuple[Optional[int], object] = (None, None)

    @property
    def num_rows(self) -> int:
        return sum(unit[2] for unit in self.units)

    def __iter__(self) -> Iterator[SpeechExample]:
        for unit in range(len(self.units)):
            for example in self.read(unit):
                if example is not None:
                    yield example
        self.log_skipped()

    def log_skipped(self) -> None:
        """One log line with the skip counts so far (a warning when any row was skipped)."""
        total = sum(self.skipped.values())
        if total:
            logger.warning("skipped %d of %d rows read: %s", total, self.rows_read, self._skip_counts())
        else:
            logger.info("read %d rows, none skipped", self.rows_read)

    def no_usable_rows(self) -> ValueError:
        """The error for data without a usable row: names the files and the skip counts."""
        return ValueError(f"no usable row in {', '.join(self.files)} ({self.num_rows} rows; skipped: "
                          f"{self._skip_counts()})")

    def _skip_counts(self) -> str:
        return ", ".join(f"{reason}={count}" for reason, count in sorted(self.skipped.items())) or "none"

    # ------------------------------------------------------------------------------------------ reading
    def read(self, unit: int, rows: Optional[np.ndarray] = None,
             count: bool = True) -> Iterator[Optional[SpeechExample]]:
        """One item per row of row group ``units[unit]``: an example, or None when skipped.

        ``rows``: the rows to read (indices within the group, in the order wanted); default all, in order.
        ``count=False`` reads without adding to ``skipped`` / ``rows_read`` (for rows read a second time).
        """
        file_index, group, size, offset = self.units[unit]
        file = self.files[file_index]
        columns = [self.audio_column, self.text_column]
        columns += [c for c in (self.prompt_column, self.id_column) if c is not None]
        kind = self._audio_kind[file_index]
        if kind == "samples":
            columns.append(self.sampling_rate_column)
        table = self._row_group(unit, columns)
        if rows is None:
            rows = np.arange(size)
        else:
            table = table.take(rows)
        position = 0
        for chunk in table.to_batches(max_chunksize=_READ_CHUNK_ROWS):
            texts = chunk.column(self.text_column).to_pylist()
            prompts = chunk.column(self.prompt_column).to_pylist() if self.prompt_column else [None] * len(texts)
            ids = chunk.column(self.id_column).to_pylist() if self.id_column else [None] * len(texts)
            audio = chunk.column(self.audio_column)
            rates = chunk.column(self.sampling_rate_column).to_pylist() if kind == "samples" else None
            for i, text in enumerate(texts):
                row = offset + int(rows[position])
                example_id = str(ids[i]) if ids[i] is not None else f"{self._names[file_index]}:{row}"
                try:
                    text = self._check_text(text)
                    samples = self._check_audio(self._decode(kind, audio, i, rates, file))
                    prompt = prompts[i].strip() if isinstance(prompts[i], str) and prompts[i].strip() else None
                    example = SpeechExample(example_id, samples, text, prompt)
                except _Skip as skip:
                    if count:
                        self._count_skip(skip.args[0], skip.args[1], example_id, file, row)
                    example = None
                self.rows_read += count
                position += 1
                yield example

    def _count_skip(self, reason: str, detail: str, example_id: str, file: str, row: int) -> None:
        self.skipped[reason] += 1
        log = logger.warning if self.skipped[reason] == 1 else logger.debug
        log("skipping %s (%s, row %d): %s: %s%s", example_id, file, row, reason, detail,
            " (further rows skipped for this reason are counted, not logged)" if self.skipped[reason] == 1 else "")

    def _check_text(self, text) -> str:
        if not isinstance(text, str) or not text.strip():
            raise _Skip("missing_text", f"transcript is {text!r}")
        text = text.strip()
        if self.max_text_tokens is not None:
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if n > self.max_text_tokens:
                raise _Skip("text_too_long", f"{n} tokens > max_text_tokens={self.max_text_tokens}")
        return text

    def _decode(self, kind: str, column, i: int, rates, file: str) -> Tuple[np.ndarray, int]:
        """(samples, rate) of row ``i`` of the audio ``column`` (a pyarrow array); any failure is a counted skip."""
        try:
            return self._decode_row(kind, column, i, rates, file)
        except _Skip:
            raise
        except Exception as err:  # noqa: BLE001 - a row that fails to decode, however it fails, is skipped
            raise _Skip("undecodable_audio", f"{type(err).__name__}: {err}") from None

    @staticmethod
    def _decode_row(kind: str, column, i: int, rates, file: str) -> Tuple[np.ndarray, int]:
        if not column[i].is_valid:
            raise _Skip("missing_audio", "audio is null")
        if kind in ("samples", "array"):
            samples, rate = ((column[i], rates[i]) if kind == "samples" else
                             (column.field("array")[i], column.field("sampling_rate")[i].as_py()))
            if not samples.is_valid:
                raise _Skip("missing_audio", "the sample array is null")
            rate = _sampling_rate(rate)
            return _to_mono(samples.values), rate
        if kind == "struct":
            data, path = column.field("bytes")[i].as_py(), None
            if data is None:
                path = column.field("path")[i].as_py() if column.type.get_field_index("path") >= 0 else None
                data = _read_referenced(path, file)
                if data is None:
                    raise _Skip("missing_audio", f"no bytes, and path {path!r} is not a readable file")
        else:
            data = column[i].as_py()
        return decode_audio(data)

    def _check_audio(self, decoded: Tuple[np.ndarray, int]) -> np.ndarray:
        samples, rate = decoded
        if samples.size == 0:
            raise _Skip("empty_audio", "0 samples")
        if not np.isfinite(samples).all():
            raise _Skip("non_finite_audio", f"{int((~np.isfinite(samples)).sum())} NaN/inf samples")
        samples = resample(samples, rate)
        seconds = len(samples) / SAMPLE_RATE
        if len(samples) < MIN_SAMPLES or (self.min_seconds is not None and seconds < self.min_seconds):
            raise _Skip("too_short", f"{seconds:.3f} s")
        if self.max_seconds is not None and seconds > self.max_seconds:
            raise _Skip("too_long", f"{seconds:.3f} s > max_seconds={self.max_seconds}")
        return samples

    # ------------------------------------------------------------------------------------------- files
    @staticmethod
    def _open(file: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(file)
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"{file} is not a readable parquet file: {err}") from None

    def _row_group(self, unit: int, columns: List[str]):
        """``units[unit]`` as a pyarrow Table of ``columns`` (the last file opened and group read are kept)."""
        if self._last_group[0] != unit:
            file_index, group = self.units[unit][:2]
            if self._open_file[0] != file_index:
                self._open_file = (file_index, self._open(self.files[file_index]))
            self._last_group = (unit, self._open_file[1].read_row_group(group, columns=columns))
        return self._last_group[1]

    def _check_columns(self, file: str, schema) -> str:
        """Raise naming ``file`` and its columns when one is missing; returns the audio column's layout."""
        import pyarrow as pa

        names = schema.names
        needed = [self.audio_column, self.text_column] + [c for c in (self.prompt_column, self.id_column) if c]
        missing = [c for c in needed if c not in names]
        audio_type = schema.field(self.audio_column).type if self.audio_column in names else None
        kind = samples_type = None
        if audio_type is not None:
            if pa.types.is_struct(audio_type) and audio_type.get_field_index("bytes") >= 0:
                kind = "struct"
            elif pa.types.is_struct(audio_type) and audio_type.get_field_index("array") >= 0:
                kind, samples_type = "array", audio_type.field("array").type
                if audio_type.get_field_index("sampling_rate") < 0:
                    raise ValueError(f"{file}: audio column {self.audio_column!r} is a struct without a "
                                     "'sampling_rate' field; expected {array, sampling_rate}")
            elif pa.types.is_binary(audio_type) or pa.types.is_large_binary(audio_type):
                kind = "binary"
            elif _is_list(audio_type):
                kind, samples_type = "samples", audio_type
                if self.sampling_rate_column not in names:
                    missing.append(self.sampling_rate_column)
            else:
                raise ValueError(f"{file}: audio column {self.audio_column!r} has type {audio_type}; expected a "
                                 "struct {bytes, path} (datasets Audio), {array, sampling_rate}, binary, or a list "
                                 "of samples with a sampling-rate column")
            if samples_type is not None and not _is_samples(samples_type):
                raise ValueError(f"{file}: audio column {self.audio_column!r} holds {samples_type}; expected a list "
                                 "of numbers (samples) or of number lists (channels)")
        if missing:
            raise ValueError(f"{file} has no column {', '.join(map(repr, missing))}; its columns are: "
                             f"{', '.join(names)}")
        return kind


def _relative_names(files: Sequence[str]) -> List[str]:
    """Each file's path relative to the deepest directory holding them all (unique names for default row ids)."""
    paths = [os.path.abspath(f) for f in files]
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return [os.path.relpath(p, root) for p in paths]


def _is_list(arrow_type) -> bool:
    import pyarrow as pa
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)


def _is_samples(arrow_type) -> bool:
    """Whether ``arrow_type`` is a list of numbers, or a list of lists of numbers."""
    import pyarrow as pa

    inner = arrow_type.value_type
    inner = inner.value_type if _is_list(inner) else inner
    return pa.types.is_integer(inner) or pa.types.is_floating(inner)


def _sampling_rate(value) -> int:
    """``value`` as a sampling rate in Hz; a counted skip unless it is a finite integer > 0."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf and value % 1 == 0:
        return int(value)
    raise _Skip("undecodable_audio", f"sampling rate is {value!r}; expected a finite integer > 0")


def _to_mono(values) -> np.ndarray:
    """One row's raw samples (a pyarrow array of numbers (S,), or of number lists (C, S) or (S, C)) → float32 (S,).

    Channels (the shorter axis) are averaged; unequal or null channels are a counted skip.
    """
    if not _is_list(values.type):
        return _pcm_to_float(values)
    if values.null_count or len(set(values.value_lengths().to_pylist())) > 1:
        raise _Skip("undecodable_audio", "channels of unequal length, or a null channel")
    flat = _pcm_to_float(values.flatten())
    if flat.size == 0:
        return flat
    frames = flat.reshape(len(values), -1)
    return frames.mean(axis=0 if frames.shape[0] <= frames.shape[1] else 1, dtype=np.float32)


def _pcm_to_float(values) -> np.ndarray:
    """A pyarrow array of numbers as float32; integer PCM scaled to [-1, 1) like decoded WAV (null samples → NaN)."""
    import pyarrow as pa

    samples = values.to_numpy(zero_copy_only=False)
    if pa.types.is_integer(values.type):
        half = 2.0 ** (values.type.bit_width - 1)
        samples = (samples - (half if pa.types.is_unsigned_integer(values.type) else 0.0)) / half
    return samples.astype(np.float32, copy=False)


def _read_referenced(path: Optional[str], parquet_file: str) -> Optional[bytes]:
    """Bytes of the audio file a ``datasets`` row refers to (absolute, or relative to the parquet file)."""
    if not path:
        return None
    for candidate in (path, os.path.join(os.path.dirname(parquet_file), path)):
        if os.path.isfile(candidate):
            with open(candidate, "rb") as f:
                return f.read()
    return None


class SpeechBatches:
    """Length-grouped, seeded, shardable, resumable batches of a :class:`ParquetSpeechSource`.

    Per epoch the row groups are put in a seeded order and the rows of each row group in a seeded order of their
    own (both in file order with ``shuffle=False``); the rows, in that order, are split into ``world_size``
    contiguous shares (sizes differ by at most one), so buckets, batches and each rank's share change every epoch,
    even for a file with a single row group. Rows are shuffled only within their row group so that memory holds
    one row group and a rank reads each row group at most once per epoch (a bucket without usable rows aside).
    A rank reads its rows ``bucket_size`` at a time, sorts each bucket by duration (ties in seeded order) and cuts
    it into batches of near-equal size, served in seeded order (by increasing length with ``shuffle=False``). The
    number of batches per epoch, ``len(self)``, is computed from the row counts alone, so it is the same on every
    rank (DDP never waits on a rank that ran out) and does not depend on skipped rows: a bucket with skipped rows
    gives slightly smaller batches. A bucket with fewer usable rows than batches repeats some of them, and one
    without any borrows the next usable row of the epoch's order (both counted in ``duplicated`` and logged).

    Resuming: ``state_dict()`` is ``{"epoch", "batches_done"}`` (batches handed out so far in the epoch), the same on
    every rank; after ``load_state_dict`` the next iteration continues with the next batch, reading no bucket
    whose batches were all consumed.

    Args:
        source: the rows.
        batch_size: examples per batch (at most; fewer where rows were skipped, or in the last batch).
        bucket_size: rows sorted together (default 64 batches); rounded down to a multiple of ``batch_size``.
            Memory: one bucket of decoded float32 audio, e.g. 1024 × 15 s ≈ 1 GB.
        shuffle, seed: seeded order of row groups, rows within a row group, and batches within a bucket.
        rank, world_size: this process's share.
        drop_last: drop each epoch's last, incomplete batch.
    """

    def __init__(self, source: ParquetSpeechSource, batch_size: int, *, bucket_size: Optional[int] = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
        bucket_size = 64 * batch_size if bucket_size is None else int(bucket_size)
        if bucket_size < batch_size:
            raise ValueError(f"bucket_size must be >= batch_size={batch_size}; got {bucket_size}")
        if source.num_rows == 0:
            raise ValueError(f"no rows in {', '.join(source.files)}")
        self.source, self.batch_size = source, batch_size
        self.bucket_size = bucket_size - bucket_size % batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.batches_done = 0
        self.duplicated = 0
        share = math.ceil(source.num_rows / world_size)   # the largest rank's rows; every rank plans for it
        self._quotas = [min(self.bucket_size, share - start) for start in range(0, share, self.bucket_size)]

    def _batches_in(self, quota: int) -> int:
        return quota // self.batch_size if self.drop_last else math.ceil(quota / self.batch_size)

    def __len__(self) -> int:
        return sum(self._batches_in(q) for q in self._quotas)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch at the next iteration."""
        self.epoch, self.batches_done = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])

    def __iter__(self) -> Iterator[SpeechBatch]:
        if self.batches_done >= len(self):
            self.set_epoch(self.epoch + 1)
        epoch = self.epoch
        plan = self._plan(epoch)
        n = self.source.num_rows
        first = self.rank * n // self.world_size
        last = (self.rank + 1) * n // self.world_size
        done = 0
        for k, quota in enumerate(self._quotas):
            n_batches = self._batches_in(quota)
            if done + n_batches <= self.batches_done:
                done += n_batches
                continue
            lo = min(first + k * self.bucket_size, last)
            hi = min(lo + self.bucket_size, last)
            examples = [e for e in self._read(plan, lo, hi) if e is not None]
            if not examples:
                examples = [self._borrow(plan, hi)]
            batches = self._group(examples, n_batches, self._rng(epoch, 3, self.rank, k))
            for j in range(self.batches_done - done, n_batches):
                self.batches_done = done + j + 1
                yield collate(batches[j])
            done += n_batches
        self.source.log_skipped()
        self.set_epoch(epoch + 1)

    def _group(self, examples: List[SpeechExample], n_batches: int, rng: np.random.Generator):
        """Sort ``examples`` by length and cut them into ``n_batches`` near-equal batches, in serving order."""
        capacity = n_batches * self.batch_size
        if len(examples) > capacity:    # drop_last's final bucket: a seeded choice of which rows to leave out
            keep = np.sort(rng.choice(len(examples), capacity, replace=False))
            examples = [examples[i] for i in keep]
        if len(examples) < n_batches:   # too few usable rows for one per batch: repeat some
            extra = rng.choice(len(examples), n_batches - len(examples))
            self.duplicated += len(extra)
            logger.warning("only %d usable rows for %d batches in a bucket; repeating %d of them",
                           len(examples), n_batches, len(extra))
            examples = examples + [examples[i] for i in extra]
        ties = rng.permutation(len(examples)) if self.shuffle else np.arange(len(examples))
        by_length = sorted(ties, key=lambda i: len(examples[i].audio))
        chunks = np.array_split(np.asarray(by_length), n_batches)
        serve = rng.permutation(n_batches) if self.shuffle else range(n_batches)
        return [[examples[i] for i in chunks[j]] for j in serve]

    def _rng(self, epoch: int, purpose: int, *key: int) -> np.random.Generator:
        """The generator for one ``purpose`` (1: row-group order, 2: rows of a row group, 3: a bucket) and ``key``.

        ``purpose`` is non-zero and comes before ``key``: numpy seeds ``[a, b]`` and ``[a, b, 0]`` alike.
        """
        return np.random.default_rng([self.seed, epoch, purpose, *key])

    def _plan(self, epoch: int) -> Tuple[int, np.ndarray, List[int]]:
        """(epoch, the epoch's row-group order, each group's first row in the concatenated order)."""
        units = len(self.source.units)
        order = self._rng(epoch, 1).permutation(units) if self.shuffle else np.arange(units)
        starts = [0]
        for unit in order:
            starts.append(starts[-1] + self.source.units[unit][2])
        return epoch, order, starts

    def _read(self, plan, lo: int, hi: int, count: bool = True) -> Iterator[Optional[SpeechExample]]:
        """Rows ``lo`` .. ``hi`` of the ``plan``'s epoch order (None for skipped rows)."""
        epoch, order, starts = plan
        position = bisect.bisect_right(starts, lo) - 1
        while lo < hi:
            end = min(hi, starts[position + 1])
            unit = int(order[position])
            size = self.source.units[unit][2]
            rows = self._rng(epoch, 2, unit).permutation(size) if self.shuffle else np.arange(size)
            yield from self.source.read(unit, rows[lo - starts[position]:end - starts[position]], count=count)
            lo, position = end, position + 1

    def _borrow(self, plan, start: int) -> SpeechExample:
        """The first usable row from ``start`` on, wrapping around, for a bucket without usable rows.

        The row is then served twice this epoch: counted in ``duplicated`` and logged.
        """
        for lo, hi in ((start, self.source.num_rows), (0, start)):
            for example in self._read(plan, lo, hi, count=False):
                if example is not None:
                    self.duplicated += 1
                    logger.warning("a bucket of rank %d has no usable row; repeating %s from elsewhere", self.rank,
                                   example.id)
                    return example
        raise self.source.no_usable_rows()
