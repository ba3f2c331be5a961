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

``SpeechBatches`` turns a source into global batches, the same however they are split between processes and
accumulation steps: rows are planned in buckets sorted by duration (read without decoding), so padding stays
small, and each rank decodes only its slice of each global batch; everything is seeded.
"""
import glob
import logging
import math
import numbers
import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .audio import MIN_SAMPLES, SAMPLE_RATE, audio_info, decode_audio, resample

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
    positions: Optional[List[int]] = None   # each example's place in its source's order, when batching reorders

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device, non_blocking: bool = False) -> "SpeechBatch":
        return SpeechBatch(self.ids, self.waveforms.to(device, non_blocking=non_blocking),
                           self.lengths.to(device, non_blocking=non_blocking), self.texts, self.prompts,
                           self.positions)


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
    """Iterable of :class:`SpeechExample` over parquet files (or a ``datasets.Dataset``), one row group at a time.

    Audio columns accepted: the ``datasets`` ``Audio`` struct ``{bytes, path}`` (bytes in any format libsndfile
    reads; a null ``bytes`` falls back to ``path``: absolute, or relative to the parquet file's folder or the nearest
    folder above it that holds it, as ``datasets`` writes paths relative to the directory it ran in; for a
    ``Dataset``, relative to the working directory), a ``{array,
    sampling_rate}`` struct, a binary column of encoded bytes, or a list column of samples with the rate in
    ``sampling_rate_column``. Raw samples are numbers (S,), or number lists (C, S) or (S, C) whose shorter axis is
    taken as the channels; integer PCM is scaled to [-1, 1) as in decoded WAV files. Audio is mixed to mono and
    resampled to 16 kHz.

    Args:
        paths: parquet files, directories or globs (see :func:`resolve_parquet_files`); or a ``datasets.Dataset``
            or ``pyarrow.Table``, read from its Arrow storage (an ``Audio`` column's encoded bytes or paths, whatever
            its ``decode`` setting; select, filter and shuffle views included) in row groups of 1024 rows.
        audio_column, text_column: required columns; ``prompt_column``, ``id_column``: optional ones (ids default
            to ``<file>:<row>``, the file's path relative to the directory holding all the files, or to the row
            index of a ``Dataset``; an empty prompt means the model's default instruction).
        min_seconds, max_seconds, max_text_tokens: filters (``max_text_tokens`` needs ``tokenizer``).
        sampling_rate_column: the rate column used with a float list audio column.
        repeats: how many times each entry of ``paths`` (each file it names; for a Dataset or Table: one int) is
            read per pass, ints >= 1 (None: once each), to oversample a small set. Copy ``k`` >= 1 of a row has the
            id ``<id>~k``; its reads and skips are counted like any row's.
        duration_column: an optional column of durations in seconds; :meth:`durations` reads it instead of the
            audio headers (length grouping then reads no audio bytes to plan).

    Every file is opened at construction: one that is not parquet, lacks a column, or whose audio column has a
    layout not listed above raises ``ValueError`` naming the file (and listing its columns). ``skipped`` counts the
    skipped rows by reason; ``rows_read`` counts the rows looked at.
    """

    def __init__(self, paths, audio_column: str = "audio", text_column: str = "text",
                 prompt_column: Optional[str] = None, id_column: Optional[str] = None,
                 min_seconds: Optional[float] = None, max_seconds: Optional[float] = None,
                 max_text_tokens: Optional[int] = None, tokenizer=None,
                 sampling_rate_column: str = "sampling_rate", duration_column: Optional[str] = None,
                 repeats: Optional[Sequence[int]] = None):
        if max_text_tokens is not None and tokenizer is None:
            raise ValueError("max_text_tokens needs a tokenizer to count tokens with")
        self.audio_column, self.text_column = audio_column, text_column
        self.prompt_column, self.id_column = prompt_column, id_column
        self.sampling_rate_column, self.duration_column = sampling_rate_column, duration_column
        self.min_seconds, self.max_seconds = min_seconds, max_seconds
        self.max_text_tokens, self.tokenizer = max_text_tokens, tokenizer
        self._table = _TableReader.of(paths)
        if self._table is None and not isinstance(paths, (str, os.PathLike)):
            paths = list(paths)                 # read twice with repeats
        if self._table is None:
            self.files = resolve_parquet_files(paths)
            self._names = _relative_names(self.files)
        else:
            self.files, self._names = [f"the {type(paths).__name__}"], [None]
        copies = _copies_per_file(paths, self.files, repeats, table=self._table is not None)
        self.skipped: Counter = Counter()
        self.rows_read = 0
        # (file index, row group, rows, first row's index in its file, copy), and the audio layout per file
        self.units: List[Tuple[int, int, int, int, int]] = []
        self._audio_kind: List[str] = []
        for index, file in enumerate(self.files):
            reader = self._reader(index)
            self._audio_kind.append(self._check_columns(file, reader.schema_arrow))
            for copy in range(copies[index]):
                offset = 0
                for group, rows in enumerate(reader.group_rows):
                    self.units.append((index, group, rows, offset, copy))
                    offset += rows
        self._open_file: Tuple[Optional[int], object] = (None, None)
        self._last_group: Tuple[Optional[Tuple[int, int]], object] = (None, None)   # ((file, row group), table)
        self._durations: dict = {}

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
        copies = ", copies included" if any(unit[4] for unit in self.units) else ""
        return ValueError(f"no usable row in {', '.join(self.files)} ({self.num_rows} rows{copies}; skipped: "
                          f"{self._skip_counts()})")

    def _skip_counts(self) -> str:
        return ", ".join(f"{reason}={count}" for reason, count in sorted(self.skipped.items())) or "none"

    # ------------------------------------------------------------------------------------------ reading
    def durations(self, unit: int) -> np.ndarray:
        """(rows,) int64: each row of ``units[unit]``'s length in 16 kHz samples, found without decoding audio.

        Read from ``duration_column`` when set, else from raw sample counts and rates, or from each encoded row's
        header (libsndfile: frames and rate). 0 where unknown (a null or unreadable row: it is counted as skipped
        when read). Computed once per row group (copies share it).
        """
        key = self.units[unit][:2]
        if key not in self._durations:
            self._durations[key] = self._read_durations(*key)
        return self._durations[key]

    def _read_durations(self, file_index: int, group: int) -> np.ndarray:
        file, kind = self._anchor(file_index), self._audio_kind[file_index]
        parquet = self._reader(file_index)
        size = parquet.group_rows[group]
        if self.duration_column is not None:
            seconds = parquet.read_row_group(group, columns=[self.duration_column]).column(0)
            seconds = seconds.to_numpy().astype(np.float64)
            ok = np.isfinite(seconds) & (seconds > 0)
            return np.where(ok, np.round(np.where(ok, seconds, 0) * SAMPLE_RATE), 0).astype(np.int64)
        columns = [self.audio_column] + ([self.sampling_rate_column] if kind == "samples" else [])
        table = parquet.read_row_group(group, columns=columns)
        audio = table.column(self.audio_column).combine_chunks()
        frames = np.zeros(size, dtype=np.int64)
        rates = np.zeros(size, dtype=np.float64)
        for i in range(size):
            try:
                if kind in ("samples", "array"):
                    samples = audio[i] if kind == "samples" else audio.field("array")[i]
                    rate = (table.column(self.sampling_rate_column)[i] if kind == "samples" else
                            audio.field("sampling_rate")[i]).as_py()
                    if not audio[i].is_valid or not samples.is_valid:
                        continue
                    values = samples.values
                    frames[i] = max(len(values), len(values[0].values)) if _is_list(values.type) and len(values) \
                        else len(values)
                    rates[i] = _sampling_rate(rate)
                else:
                    frames[i], rates[i] = audio_info(self._encoded(kind, audio, i, file))
            except (_Skip, ValueError, TypeError, OSError):
                pass            # unknown: 0, and the read counts the row's reason
        known = rates > 0
        return np.where(known, np.ceil(frames * SAMPLE_RATE / np.where(known, rates, 1)), 0).astype(np.int64)

    @staticmethod
    def _encoded(kind: str, column, i: int, file: Optional[str]) -> Union[bytes, str]:
        """Row ``i``'s encoded audio: its bytes, or the path of the file a ``datasets`` row refers to (relative paths
        resolved from the parquet ``file``; None: from the working directory)."""
        if not column[i].is_valid:
            raise _Skip("missing_audio", "audio is null")
        if kind == "binary":
            return column[i].as_py()
        data = column.field("bytes")[i].as_py()
        if data is not None:
            return data
        path = column.field("path")[i].as_py() if column.type.get_field_index("path") >= 0 else None
        found = _referenced_path(path, file)
        if found is None:
            raise _Skip("missing_audio", f"no bytes, and path {path!r} is not a readable file")
        return found

    def read(self, unit: int, rows: Optional[np.ndarray] = None,
             count: bool = True) -> Iterator[Optional[SpeechExample]]:
        """One item per row of row group ``units[unit]``: an example, or None when skipped.

        ``rows``: the rows to read (indices within the group, in the order wanted); default all, in order.
        ``count=False`` reads without adding to ``skipped`` / ``rows_read`` (for rows read a second time).
        """
        file_index, group, size, offset, copy = self.units[unit]
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
                example_id = (str(ids[i]) if ids[i] is not None else
                              f"{self._names[file_index]}:{row}" if self._names[file_index] else str(row))
                example_id += f"~{copy}" if copy else ""
                try:
                    text = self._check_text(text)
                    samples = self._check_audio(self._decode(kind, audio, i, rates, self._anchor(file_index)))
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
        data = ParquetSpeechSource._encoded(kind, column, i, file)
        if isinstance(data, str):
            with open(data, "rb") as f:
                data = f.read()
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
    def _reader(self, index: int):
        """File ``index`` opened for reading: ``schema_arrow``, ``group_rows`` and ``read_row_group``."""
        return self._table if self._table is not None else _ParquetReader(self.files[index])

    def _anchor(self, index: int) -> Optional[str]:
        """The parquet file relative audio paths of file ``index`` start from (None: the working directory)."""
        return None if self._table is not None else self.files[index]

    def _row_group(self, unit: int, columns: List[str]):
        """``units[unit]`` as a pyarrow Table of ``columns`` (the last file opened and group read are kept)."""
        file_index, group = self.units[unit][:2]
        if self._last_group[0] != (file_index, group):
            if self._open_file[0] != file_index:
                self._open_file = (file_index, self._reader(file_index))
            self._last_group = ((file_index, group), self._open_file[1].read_row_group(group, columns=columns))
        return self._last_group[1]

    def _check_columns(self, file: str, schema) -> str:
        """Raise naming ``file`` and its columns when one is missing; returns the audio column's layout."""
        import pyarrow as pa

        names = schema.names
        optional = (self.prompt_column, self.id_column, self.duration_column)
        needed = [self.audio_column, self.text_column] + [c for c in optional if c]
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


class _ParquetReader:
    """A parquet file: its Arrow schema, rows per row group, and row groups read as pyarrow Tables."""

    def __init__(self, file: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            self._file = pq.ParquetFile(file)
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"{file} is not a readable parquet file: {err}") from None
        self.schema_arrow = self._file.schema_arrow
        self.group_rows = [self._file.metadata.row_group(g).num_rows for g in range(self._file.metadata.num_row_groups)]

    def read_row_group(self, group: int, columns: List[str]):
        return self._file.read_row_group(group, columns=columns)


class _TableReader:
    """A ``datasets.Dataset`` (its Arrow storage, nothing decoded) or a ``pyarrow.Table``, read like a parquet file
    in row groups of ``GROUP_ROWS`` rows. ``datasets`` is never imported: a Dataset is known by its methods."""

    GROUP_ROWS = 1024

    def __init__(self, data):
        import pyarrow as pa

        if isinstance(data, pa.Table):
            self._slice, rows = data.slice, data.num_rows
        else:
            arrow = data.with_format("arrow")       # rows as Arrow tables, the select/filter/shuffle view applied
            self._slice, rows = (lambda start, length: arrow[start:start + length]), len(data)
        self.schema_arrow = self._slice(0, 0).schema
        self.group_rows = [min(self.GROUP_ROWS, rows - start) for start in range(0, rows, self.GROUP_ROWS)]

    @classmethod
    def of(cls, data) -> Optional["_TableReader"]:
        """A reader for ``data`` when it is a Dataset or Table; None for paths. Other ``datasets`` objects raise."""
        import pyarrow as pa

        if isinstance(data, pa.Table):
            return cls(data)
        if not hasattr(data, "with_format"):     # paths
            return None
        if isinstance(data, dict):
            raise ValueError(f"got a {type(data).__name__} of splits {list(data)}; pass one split, e.g. "
                             f"data[{next(iter(data), 'train')!r}]")
        if not (hasattr(data, "with_format") and hasattr(type(data), "__len__")):
            raise ValueError(f"got a {type(data).__name__}; expected a datasets.Dataset (an IterableDataset has no "
                             "row count to plan batches with: save it to parquet, or load it without streaming)")
        return cls(data)

    def read_row_group(self, group: int, columns: List[str]):
        return self._slice(group * self.GROUP_ROWS, self.group_rows[group]).select(columns)


def _copies_per_file(paths, files: List[str], repeats: Optional[Sequence[int]], table: bool) -> List[int]:
    """Copies of each of ``files`` per pass: ``repeats[i]`` for the files entry ``i`` of ``paths`` names (a file
    named by two entries with different counts raises), or ``repeats[0]`` for a Dataset or Table; 1 each without
    ``repeats``."""
    if repeats is None:
        return [1] * len(files)
    entries = [paths] if table or isinstance(paths, (str, os.PathLike)) else list(paths)
    repeats = list(repeats)
    if len(repeats) != len(entries) or not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 1
                                               for r in repeats):
        raise ValueError(f"repeats must hold one int >= 1 per data path ({len(entries)}); got {repeats!r}")
    if table:
        return [int(r) for r in repeats]
    copies: Dict[str, Tuple[int, str]] = {}
    for entry, count in zip(entries, repeats):
        for file in resolve_parquet_files(entry):
            known = copies.setdefault(os.path.realpath(file), (int(count), os.fspath(entry)))
            if known[0] != count:
                raise ValueError(f"repeats: {file} is named by {known[1]!r} (repeats {known[0]}) and by "
                                 f"{os.fspath(entry)!r} (repeats {count}); name it once, or with one count")
    return [copies[os.path.realpath(f)][0] for f in files]


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


_RESOLVED_BASES: Dict[Tuple[str, str], str] = {}   # (parquet folder, path's folder) -> the folder it resolved from


def _referenced_path(path: Optional[str], parquet_file: Optional[str]) -> Optional[str]:
    """The audio file a ``datasets`` row refers to, if it exists: ``path`` if absolute; else joined to the nearest
    folder at or above ``parquet_file`` where that is a file (``datasets`` writes paths relative to the directory it
    ran in, e.g. ``data/clips/a.wav`` beside ``data/train.parquet``), else relative to the working directory.
    The folder found is remembered per parquet folder and path folder, so a file's rows cost one lookup each."""
    if not path:
        return None
    if parquet_file is not None and not os.path.isabs(path):
        start = os.path.dirname(os.path.abspath(parquet_file))
        key = (start, os.path.dirname(path))
        known = _RESOLVED_BASES.get(key)
        if known is not None and os.path.isfile(os.path.join(known, path)):
            return os.path.join(known, path)
        folder = start
        while True:
            candidate = os.path.join(folder, path)
            if os.path.isfile(candidate):
                _RESOLVED_BASES[key] = folder
                return candidate
            if os.path.dirname(folder) == folder:
                break
            folder = os.path.dirname(folder)
    return path if os.path.isfile(path) else None


class SpeechBatches:
    """Global batches of a :class:`ParquetSpeechSource`, length-grouped and seeded, each rank's share decoded.

    The sequence of global batches (which rows, in which step) depends only on the data, ``seed``, ``shuffle``,
    ``bucket_size`` and the global batch size ``batch_size × grad_accum × world_size``, not on how that product is
    split, so one process with accumulation and many processes train on the same batches. Per epoch the row groups
    (and their copies, :class:`ParquetSpeechSource` ``repeats``: copy ``k`` of ``r`` in the ``k``-th ``r``-th of the
    epoch, see :meth:`_order`) are put in a seeded order and the rows of each in a seeded order of their own (file
    order with ``shuffle=False``). That order is cut into buckets of ``bucket_size`` rows; a bucket's rows are sorted by
    duration (:meth:`ParquetSpeechSource.durations`: a duration column or the audio headers, nothing decoded; ties in
    seeded order), cut into ``ceil(rows / global batch)`` global batches of near-equal size and served in seeded
    order (by increasing length with ``shuffle=False``). Each global batch, still sorted by length, is cut into
    ``world_size × grad_accum`` near-equal slices; micro-batch ``i`` of rank ``r`` is slice ``i × world_size + r``, so
    the ranks of one micro-step hold neighbouring lengths. A rank decodes only its own slices, a bucket at a time,
    each row group (each copy of one) once per bucket.

    Iterating yields one item per optimizer step: this rank's ``grad_accum`` micro-batches, each a
    :class:`SpeechBatch` or None (a slice without rows: a small last batch, or all its rows skipped). Rows skipped
    when decoded leave their micro-batch smaller; every split skips the same rows. ``len(self)`` (steps per epoch)
    follows from the row counts alone, so it is the same on every rank.

    Resuming: ``state_dict()`` is ``{"epoch", "steps_done", "global_batch"}``, the same on every rank and for every
    split; ``load_state_dict`` continues with the next global batch, reading no bucket whose batches were all
    consumed, and raises ``ValueError`` naming both values when the global batch differs.

    Args:
        source: the rows.
        batch_size: examples per micro-batch (at most).
        grad_accum: micro-batches per step on each rank.
        bucket_size: rows sorted together (default 64 global batches); rounded down to a multiple of the global
            batch. Memory: a rank's share of one bucket of decoded float32 audio, e.g. 1024 × 15 s ≈ 1 GB.
        shuffle, seed: seeded order of row groups, rows within a row group, and batches within a bucket.
        rank, world_size: this process's share.
        drop_last: each bucket makes only full global batches (a seeded choice of rows is left out).
    """

    def __init__(self, source: ParquetSpeechSource, batch_size: int, *, grad_accum: int = 1,
                 bucket_size: Optional[int] = None, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False):
        for name, value in (("batch_size", batch_size), ("grad_accum", grad_accum), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
        self.global_batch = batch_size * grad_accum * world_size
        bucket_size = 64 * self.global_batch if bucket_size is None else int(bucket_size)
        if bucket_size < self.global_batch:
            raise ValueError(f"bucket_size must be >= the global batch {self.global_batch} (batch_size {batch_size} × "
                             f"grad_accum {grad_accum} × {world_size} processes); got {bucket_size}")
        if source.num_rows == 0:
            raise ValueError(f"no rows in {', '.join(source.files)}")
        self.source, self.batch_size, self.grad_accum = source, batch_size, grad_accum
        self.bucket_size = bucket_size - bucket_size % self.global_batch
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.steps_done = 0
        n = source.num_rows
        self._quotas = [min(self.bucket_size, n - start) for start in range(0, n, self.bucket_size)]
        copies: Dict[Tuple[int, int], int] = Counter(unit[:2] for unit in source.units)
        self._copies = np.array([copies[unit[:2]] for unit in source.units])     # copies of each unit's row group
        if self._copies.max() > len(self._quotas):
            logger.warning("rows read %d times per epoch in %d bucket(s) of %d rows: copies of a row that share a "
                           "bucket have its length, so they usually share a batch; a bucket_size of at most %d "
                           "spreads them", self._copies.max(), len(self._quotas), self.bucket_size,
                           n // self._copies.max())

    def _batches_in(self, quota: int) -> int:
        return quota // self.global_batch if self.drop_last else math.ceil(quota / self.global_batch)

    def __len__(self) -> int:
        return sum(self._batches_in(q) for q in self._quotas)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first step at the next iteration."""
        self.epoch, self.steps_done = int(epoch), 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "steps_done": self.steps_done, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if "steps_done" not in state:
            raise ValueError(f"data state {state} has no 'steps_done': it comes from a version that batched per "
                             "process; finish that run with the version that started it")
        if int(state["global_batch"]) != self.global_batch:
            raise ValueError(f"the checkpoint's global batch is {state['global_batch']}, this run's is "
                             f"{self.global_batch} (batch_size {self.batch_size} × grad_accum {self.grad_accum} × "
                             f"{self.world_size} processes); the data position only carries over unchanged")
        self.epoch, self.steps_done = int(state["epoch"]), int(state["steps_done"])

    def __iter__(self) -> Iterator[List[Optional[SpeechBatch]]]:
        if self.steps_done >= len(self):
            self.set_epoch(self.epoch + 1)
        epoch = self.epoch
        order = self._order(epoch)
        done = 0
        for k, quota in enumerate(self._quotas):
            n_batches = self._batches_in(quota)
            if done + n_batches <= self.steps_done:
                done += n_batches
                continue
            units, rows = order[0][k * self.bucket_size:][:quota], order[1][k * self.bucket_size:][:quota]
            batches = self._group(units, rows, n_batches, self._rng(epoch, 3, k))[self.steps_done - done:]
            mine = [[batch[i * self.world_size + self.rank] for i in range(self.grad_accum)] for batch in batches]
            examples = self._decode(units, rows, np.concatenate([np.concatenate(m) for m in mine]))
            for micro in mine:
                self.steps_done += 1
                chosen = [[examples[i] for i in part if examples[i] is not None] for part in micro]
                yield [collate(part) if part else None for part in chosen]
            done += n_batches
        self.source.log_skipped()
        self.set_epoch(epoch + 1)

    def _group(self, units: np.ndarray, rows: np.ndarray, n_batches: int, rng: np.random.Generator):
        """A bucket's global batches in serving order, each as its ``world_size × grad_accum`` slices of indices
        into the bucket (sorted by duration)."""
        index = np.arange(len(units))
        if len(index) > n_batches * self.global_batch:      # drop_last: a seeded choice of the rows left out
            index = np.sort(rng.choice(len(index), n_batches * self.global_batch, replace=False))
        lengths = np.array([self.source.durations(u)[r] for u, r in zip(units[index], rows[index])], dtype=np.int64)
        ties = rng.permutation(len(index)) if self.shuffle else np.arange(len(index))
        by_length = index[ties[np.argsort(lengths[ties], kind="stable")]]
        chunks = np.array_split(by_length, n_batches)
        serve = rng.permutation(n_batches) if self.shuffle else range(n_batches)
        return [np.array_split(chunks[j], self.world_size * self.grad_accum) for j in serve]

    def _decode(self, units: np.ndarray, rows: np.ndarray, chosen: np.ndarray) -> dict:
        """{bucket index: example or None} for the ``chosen`` rows, read in epoch order, one row group at a time."""
        chosen = np.sort(chosen)
        examples = {}
        for part in np.split(chosen, np.flatnonzero(np.diff(units[chosen])) + 1) if len(chosen) else []:
            for i, example in zip(part, self.source.read(int(units[part[0]]), rows[part])):
                examples[int(i)] = example
        return examples

    def _rng(self, epoch: int, purpose: int, *key: int) -> np.random.Generator:
        """The generator for one ``purpose`` (1: row-group order, 2: rows of a row group, 3: a bucket) and ``key``.

        ``purpose`` is non-zero and comes before ``key``: numpy seeds ``[a, b]`` and ``[a, b, 0]`` alike.
        """
        return np.random.default_rng([self.seed, epoch, purpose, *key])

    def _order(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        """The epoch's row order: (row group index, row within it) per position, both (num_rows,).

        Shuffled, a row group whose first copy is at place ``i`` of a seeded permutation of the ``count`` units
        has its copy ``k`` of ``r`` at ``(k + (i + 1/2) / count) / r`` of the epoch: without repeats the permutation's
        order itself, and the copies of a row group ``1/r`` of the epoch apart."""
        count = len(self.source.units)
        order = range(count)
        if self.shuffle:
            place = np.empty(count)
            place[self._rng(epoch, 1).permutation(count)] = (np.arange(count) + 0.5) / count
            first = {unit[:2]: u for u, unit in reversed(list(enumerate(self.source.units)))}
            copy = np.array([unit[4] for unit in self.source.units])
            group_place = place[[first[unit[:2]] for unit in self.source.units]]
            order = np.argsort((copy + group_place) / self._copies, kind="stable")
        units, rows = [], []
        for unit in order:
            size = self.source.units[unit][2]
            units.append(np.full(size, unit))
            rows.append(self._rng(epoch, 2, unit).permutation(size) if self.shuffle else np.arange(size))
        return np.concatenate(units), np.concatenate(rows)
