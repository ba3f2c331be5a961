"""Synthesise English speech with espeak-ng or flite (``apt-get install -y espeak-ng flite``) into a parquet speech set.

    python -m steermoe.demo.make_speech [--output steermoe/demo/speech.parquet]     # the bundled demo set
    python -m steermoe.demo.make_speech --sentences 800 --voices en-us,en-gb+f3,en-gb-scotland+m3 \\
        --texts train.parquet --seed 0 --output espeak_train.parquet                  # training speech

Without ``--sentences`` / ``--prompts`` / ``--words`` / ``--texts`` it writes the demo set: ``SENTENCES`` spoken by
two voices at two speeds.
``--sentences N`` adds N templated everyday sentences (:func:`steermoe.demo.sentences.templated_sentences`),
``--prompts N`` N telephone-system texts (:func:`steermoe.demo.sentences.telephone_prompts`: every letter, number,
month, symbol name... once, then templated prompts), ``--words N`` N texts of 1-6 words drawn from ``--word-source``
(:func:`read_words`, :func:`steermoe.demo.sentences.word_sequences`), ``--texts`` the transcripts of a parquet
file's ``text`` column or of a text file (one sentence a line); each of those gets a seeded voice, speed and pitch.
``--exclude`` names held-out transcripts (same formats) that are never spoken: the generators skip them, ``--texts``
lines equal to one are dropped. Voices are espeak-ng's (``en-us``, ``en-gb+f3``: formant synthesis) or flite's
(``FLITE_VOICES``: CMU voices built from one recorded speaker each); ``--voices`` takes both kinds in one list.
``--telephone`` passes every utterance through a telephone channel (:func:`telephone_channel`: 8 kHz band limit
and G.711 μ-law, back at 16 kHz). Audio is resampled to 16 kHz and stored as FLAC bytes in the schema Hugging Face
``datasets`` writes for an ``Audio`` column (struct ``{bytes, path}``), with ``text`` and ``id`` columns, in row
groups of ``--row-group-size`` rows (so that a seeded row-group order mixes this set with others). The output is
deterministic for a given espeak-ng / flite build and seed.
"""
import argparse
import functools
import io
import json
import os
import random
import subprocess
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

from steermoe.fileio import atomic_write

SENTENCES = [
    "The sun is warm today.",
    "Please close the door.",
    "I like green apples.",
    "The cat sleeps on the mat.",
    "We walked to the park.",
    "My brother plays the piano.",
    "The train leaves at noon.",
    "She reads a book every night.",
    "Open the window, please.",
    "The dog runs in the garden.",
    "It is raining again.",
    "He drinks coffee in the morning.",
    "The children sing a song.",
    "We need more bread and milk.",
    "The river is cold and deep.",
    "They live in a small house.",
    "Turn off the light.",
    "The bird sits on the tree.",
    "I lost my blue pen.",
    "The shop opens at nine.",
    "Water the plants on Sunday.",
    "The red car is fast.",
    "Your bag is on the chair.",
    "The moon is bright tonight.",
    "She wrote a long letter.",
    "We ate soup for dinner.",
    "The clock on the wall stopped.",
    "He found a key in the sand.",
    "The baby is asleep.",
    "Bring your coat, it is cold.",
    "The old man feeds the ducks.",
    "Our team won the game.",
    "The snow fell all night.",
    "Wash your hands before lunch.",
    "The fish swims in the pond.",
    "I will call you tomorrow.",
    "The road is long and quiet.",
    "She paints the fence white.",
    "The music is too loud.",
    "We planted a tree in spring.",
    "The milk is in the fridge.",
    "He rides his bike to school.",
    "The wind blows from the west.",
    "Read the first page aloud.",
    "The tea is still hot.",
    "My sister has a black dog.",
    "The boat sails across the lake.",
    "Keep the change.",
    "The lamp is on the desk.",
    "They laughed at the joke.",
    "The door was left open.",
    "Count from one to ten.",
    "The horse eats fresh hay.",
    "I see a star in the sky.",
    "The cake smells sweet.",
    "He fixed the broken chair.",
    "The bus is late again.",
    "Put the cups on the table.",
    "The leaves turn brown in autumn.",
    "Good night and sleep well.",
]
VOICES = ("en-us", "en-gb")
SPEEDS = (150, 175)  # words per minute
# voices (language + variant) and ranges for generated training speech
TRAIN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-us-nyc", "en-029", "en-gb-x-gbclan",
                "en-us+f2", "en-us+f4", "en-us+m3", "en-gb+f3", "en-gb+m5", "en-gb-x-rp+f1", "en-us-nyc+m7")
TRAIN_SPEEDS = (130, 145, 160, 175, 190)
TRAIN_PITCHES = (30, 40, 50, 60, 70)
# flite's English voices: US female, Scottish male, US male (keeps its own pitch: flite ignores f0_shift for it),
# US male (diphone)
FLITE_VOICES = ("flite:slt", "flite:awb", "flite:rms", "flite:kal16")
FLITE = "flite:"        # prefix of a flite voice name
ESPEAK_RATE = 175       # espeak-ng's default words/min: a flite voice at this speed keeps its own duration
SAMPLE_RATE = 16000
TELEPHONE_RATE = 8000   # narrowband telephony: speech band-limited below 4 kHz
MU = 255                # G.711 μ-law, 8-bit codes
DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "speech.parquet")


@dataclass(frozen=True)
class Utterance:
    """What to synthesise: ``text`` spoken by ``voice`` (espeak-ng's, or ``flite:NAME``) at ``speed`` words/min
    and ``pitch`` (0-99, 50 the voice's own; None: the voice's own)."""

    id: str
    text: str
    voice: str
    speed: int
    pitch: Optional[int] = None


@functools.lru_cache(maxsize=None)
def flite_voices() -> tuple:
    """The voices the installed flite offers, as ``flite:NAME`` (empty when flite is not installed)."""
    try:
        listing = subprocess.run(["flite", "-lv"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ()
    return tuple(FLITE + name for name in listing.split(":", 1)[-1].split())


def check_voice(voice: str) -> None:
    """Raise ``ValueError`` for a ``flite:`` voice the installed flite lacks (flite itself would silently fall
    back to its default voice); espeak-ng voices are checked by espeak-ng, which fails on an unknown one."""
    if voice.startswith(FLITE) and voice not in flite_voices():
        offered = ", ".join(flite_voices()) or "nothing (not installed: apt-get install -y flite)"
        raise ValueError(f"voice {voice!r}: flite offers {offered}")


def synthesize(text: str, voice: str, speed: int, pitch: Optional[int] = None):
    """(float32 mono samples at 16 kHz) for ``text`` spoken by ``voice``. For flite voices ``speed`` stretches the
    voice's durations by ``ESPEAK_RATE / speed`` and ``pitch`` scales its F0 by ``2 ** ((pitch - 50) / 100)``
    (30 ... 70: ×0.87 ... ×1.15), so one speed and pitch list serves both engines (``flite:rms`` keeps its own
    pitch whatever ``pitch`` says: flite applies ``f0_shift`` to the other voices only)."""
    from steermoe.audio import load_audio_file

    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "speech.wav")
        if voice.startswith(FLITE):
            check_voice(voice)
            pitch_args = [] if pitch is None else ["--setf", f"f0_shift={2 ** ((pitch - 50) / 100):.4f}"]
            command = ["flite", "-voice", voice[len(FLITE):], "--setf", f"duration_stretch={ESPEAK_RATE / speed:.4f}",
                       *pitch_args, "-t", text, "-o", wav]
        else:
            pitch_args = [] if pitch is None else ["-p", str(pitch)]
            command = ["espeak-ng", "-v", voice, "-s", str(speed), *pitch_args, "-w", wav, text]
        subprocess.run(command, check=True)
        return load_audio_file(wav)


def telephone_channel(audio, sample_rate: int = SAMPLE_RATE):
    """(float32 (S,) samples at ``sample_rate``) as a narrowband telephone line passes them: resampled to
    TELEPHONE_RATE (anti-aliased, so nothing above 4 kHz survives), μ-law companded (μ = 255, G.711's curve, not its
    segmented table) and quantised to a sign and 7 bits (255 levels, zero among them), decoded, resampled back to
    ``sample_rate``, trimmed to the input's length."""
    import numpy as np

    from steermoe.audio import resample

    audio = np.asarray(audio, dtype=np.float32)
    narrow = np.clip(resample(audio, sample_rate, TELEPHONE_RATE), -1.0, 1.0)
    companded = np.sign(narrow) * np.log1p(MU * np.abs(narrow)) / np.log1p(MU)
    decoded = np.round(companded * 127) / 127                          # codes -127..127
    narrow = np.sign(decoded) * np.expm1(np.abs(decoded) * np.log1p(MU)) / MU
    return resample(narrow.astype(np.float32), TELEPHONE_RATE, sample_rate)[: len(audio)]


def flac_bytes(audio) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def demo_utterances() -> List[Utterance]:
    """The bundled demo set: ``SENTENCES``, voices in turn, speeds in turn every two sentences."""
    return [Utterance(f"demo-{i:03d}", text, VOICES[i % len(VOICES)], SPEEDS[(i // len(VOICES)) % len(SPEEDS)])
            for i, text in enumerate(SENTENCES)]


def training_utterances(texts: Sequence[str], *, voices: Sequence[str] = TRAIN_VOICES,
                        speeds: Sequence[int] = TRAIN_SPEEDS, pitches: Sequence[int] = TRAIN_PITCHES,
                        seed: int = 0, prefix: str = "espeak") -> List[Utterance]:
    """One utterance per text, each with a seeded voice, speed and pitch; ids ``{prefix}-00000`` on."""
    for name, values in (("voices", voices), ("speeds", speeds), ("pitches", pitches)):
        if not values:
            raise ValueError(f"{name} must name at least one value")
    rng = random.Random(seed)
    return [Utterance(f"{prefix}-{i:05d}", text, rng.choice(voices), rng.choice(speeds), rng.choice(pitches))
            for i, text in enumerate(texts)]


def read_texts(path: str, column: str = "text") -> List[str]:
    """Non-blank transcripts of a parquet file's ``column``, or the non-blank lines of a text file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    else:
        with open(path, encoding="utf-8") as f:
            values = f.read().splitlines()
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _is_word(text: str) -> bool:
    """3+ lower-case ASCII letters: a word flite and espeak-ng speak as written (no names, no accents)."""
    return len(text) >= 3 and text.isascii() and text.isalpha() and text.islower()


def read_words(paths: Sequence[str], limit: Optional[int] = None) -> List[str]:
    """Words to draw ``--words`` texts from: the words of the first path that every other path holds too, in the
    first's order, the first ``limit`` of them (all when None). A path is a tokenizer directory (its tokens that
    decode to a space and a word, in token-id order: about frequency order for BPE; a SentencePiece tokenizer, which
    decodes one token without its space, has none) or a text file (its lines that are words, e.g.
    /usr/share/dict/words: after a tokenizer it keeps the tokenizer's word pieces out). A word is 3+ lower-case ASCII
    letters. Raises ``ValueError`` naming the path when a source, or what all of them hold, has no word."""
    sources = []
    for path in paths:
        if os.path.isdir(path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
            pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            words = [p[1:] for p in pieces if p[:1] == " " and _is_word(p[1:])]
        else:
            words = [w for w in read_texts(path) if _is_word(w)]
        if not words:
            raise ValueError(f"{path}: no words (3+ lower-case ASCII letters; for a tokenizer, a space and a word)")
        sources.append(words)
    others = [set(words) for words in sources[1:]]
    words = list(dict.fromkeys(w for w in sources[0] if all(w in other for other in others)))
    if not words:
        raise ValueError(f"{', '.join(paths)}: no word is in all of them")
    return words if limit is None else words[:limit]


def build_table(utterances: Optional[Sequence[Utterance]] = None, telephone: bool = False):
    """``utterances`` (default: the demo set) synthesised (through :func:`telephone_channel` when ``telephone``),
    as a pyarrow Table in the ``datasets`` Audio schema."""
    import pyarrow as pa

    utterances = demo_utterances() if utterances is None else utterances
    channel = telephone_channel if telephone else (lambda audio: audio)
    audio = [{"bytes": flac_bytes(channel(synthesize(u.text, u.voice, u.speed, u.pitch))), "path": f"{u.id}.flac"}
             for u in utterances]
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"audio": {"sampling_rate": SAMPLE_RATE, "_type": "Audio"},
                "text": {"dtype": "string", "_type": "Value"}, "id": {"dtype": "string", "_type": "Value"}}
    schema = pa.schema([("audio", audio_type), ("text", pa.string()), ("id", pa.string())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    return pa.table([pa.array(audio, audio_type), pa.array([u.text for u in utterances]),
                     pa.array([u.id for u in utterances])], schema=schema)


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> None:
    import pyarrow.parquet as pq

    from steermoe.demo.sentences import plain_words, telephone_prompts, templated_sentences, word_sequences

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="parquet file to write")
    parser.add_argument("--sentences", type=int, default=0, help="templated everyday sentences to speak")
    parser.add_argument("--prompts", type=int, default=0,
                        help="telephone-system texts to speak after the sentences: every letter, number word, month, "
                             "symbol name, ... once, then templated voicemail / conference / queue prompts")
    parser.add_argument("--words", type=int, default=0,
                        help="texts of 1-6 words drawn from --word-source to speak after the prompts (to hear words "
                             "outside the templates, with no context to guess them from)")
    parser.add_argument("--word-source", action="append", default=[],
                        help="where --words draws from: a tokenizer directory (its whole-word tokens) or a text "
                             "file (one word a line); repeated, the first's words that the others hold too, in the "
                             "first's order (give the tokenizer first)")
    parser.add_argument("--word-limit", type=int, default=10000,
                        help="draw from the first this many words (a tokenizer's most frequent when it comes first)")
    parser.add_argument("--exclude", action="append", default=[],
                        help="never speak these transcripts (a held-out set's): a parquet file or a text file, as "
                             "--texts; may be repeated")
    parser.add_argument("--texts", action="append", default=[],
                        help="also speak these transcripts: a parquet file (its 'text' column) or a text file; "
                             "may be repeated")
    parser.add_argument("--voices", type=_csv(str), default=list(TRAIN_VOICES),
                        help="comma-separated voices: espeak-ng's 'language[+variant]' or flite's 'flite:NAME' "
                             f"({', '.join(FLITE_VOICES)})")
    parser.add_argument("--speeds", type=_csv(int), default=list(TRAIN_SPEEDS),
                        help="words per minute, comma-separated")
    parser.add_argument("--pitches", type=_csv(int), default=list(TRAIN_PITCHES), help="0-99, comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sentences and each one's voice")
    parser.add_argument("--id-prefix", default="espeak",
                        help="ids of the generated utterances: '<prefix>-00000', ... (whichever engine speaks them); "
                             "give each set mixed into one run its own prefix (with --sentences, --prompts, "
                             "--words or --texts)")
    parser.add_argument("--telephone", action="store_true",
                        help="pass the speech through a telephone channel (8 kHz band limit, G.711 mu-law)")
    parser.add_argument("--row-group-size", type=int, default=64, help="rows per parquet row group")
    args = parser.parse_args(argv)
    for flag in ("sentences", "prompts", "words"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must be >= 0; got {getattr(args, flag)}")
    if args.word_limit < 1:
        parser.error(f"--word-limit must be >= 1; got {args.word_limit}")
    if bool(args.words) != bool(args.word_source):
        parser.error("--words needs --word-source (a tokenizer directory or a text file of words)" if args.words
                     else "--word-source needs --words (how many texts to draw from it)")
    for path in args.word_source:
        if not os.path.exists(path):
            parser.error(f"--word-source: no such file or directory: {path}")
    generated = args.sentences or args.prompts or args.words or args.texts
    if args.id_prefix != "espeak" and not generated:
        parser.error("--id-prefix names generated utterances: it needs --sentences, --prompts, --words or --texts "
                     "(the demo set's ids are fixed)")
    if not args.id_prefix.strip() or "~" in args.id_prefix:
        parser.error(f"--id-prefix must be non-blank and without '~' (marks a repeated row's copy); got "
                     f"{args.id_prefix!r}")
    if args.row_group_size < 1:
        parser.error(f"--row-group-size must be >= 1; got {args.row_group_size}")
    if any(speed <= 0 for speed in args.speeds):
        parser.error(f"--speeds must be words per minute > 0; got {args.speeds}")
    for voice in args.voices:
        try:
            check_voice(voice)
        except ValueError as err:
            parser.error(f"--voices: {err}")
    if generated:
        held_out = [text for path in args.exclude for text in read_texts(path)]
        texts = templated_sentences(args.sentences, seed=args.seed, exclude=held_out)
        texts += telephone_prompts(args.prompts, seed=args.seed, exclude=held_out)
        if args.words:
            try:
                words = read_words(args.word_source, args.word_limit)
            except ValueError as err:
                parser.error(f"--word-source: {err}")
            texts += word_sequences(args.words, words, seed=args.seed, exclude=[*held_out, *texts])
            print(f"--words: {args.words} texts from {len(words)} words of {', '.join(args.word_source)}")
        given = [text for path in args.texts for text in read_texts(path)]
        dropped = {plain_words(text) for text in held_out}
        kept = [text for text in given if plain_words(text) not in dropped]
        texts += kept
        if held_out:
            print(f"--exclude: {len(dropped)} held-out transcripts never spoken ({len(given) - len(kept)} lines of "
                  f"--texts dropped)")
        utterances = training_utterances(texts, voices=args.voices, speeds=args.speeds, pitches=args.pitches,
                                         seed=args.seed, prefix=args.id_prefix)
    else:
        utterances = demo_utterances()
    table = build_table(utterances, telephone=args.telephone)
    atomic_write(args.output, lambda tmp: pq.write_table(table, tmp, compression="zstd",
                                                        row_group_size=args.row_group_size))
    print(f"wrote {args.output}: {table.num_rows} utterances, {os.path.getsize(args.output) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
