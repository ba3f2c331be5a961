"""Synthesise the bundled demo set ``speech.parquet`` with espeak-ng (``apt-get install -y espeak-ng``).

    python -m steermoe.demo.make_speech [--output steermoe/demo/speech.parquet]

Short English sentences spoken by two espeak-ng voices at two speeds, resampled to 16 kHz, stored as FLAC bytes in
the schema Hugging Face ``datasets`` writes for an ``Audio`` column (struct ``{bytes, path}``), with ``text`` and
``id`` columns. The output is deterministic for a given espeak-ng build.
"""
import argparse
import io
import json
import os
import subprocess
import tempfile

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
SAMPLE_RATE = 16000
DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "speech.parquet")


def synthesize(text: str, voice: str, speed: int):
    """(float32 mono samples at 16 kHz) for ``text`` spoken by espeak-ng."""
    from steermoe.audio import load_audio_file

    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "speech.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", wav, text], check=True)
        return load_audio_file(wav)


def flac_bytes(audio) -> bytes:
    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def build_table():
    """The demo set as a pyarrow Table in the ``datasets`` Audio schema."""
    import pyarrow as pa

    ids, audio, texts = [], [], []
    for i, text in enumerate(SENTENCES):
        voice, speed = VOICES[i % len(VOICES)], SPEEDS[(i // len(VOICES)) % len(SPEEDS)]
        ids.append(f"demo-{i:03d}")
        audio.append({"bytes": flac_bytes(synthesize(text, voice, speed)), "path": f"demo-{i:03d}.flac"})
        texts.append(text)
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"audio": {"sampling_rate": SAMPLE_RATE, "_type": "Audio"},
                "text": {"dtype": "string", "_type": "Value"}, "id": {"dtype": "string", "_type": "Value"}}
    schema = pa.schema([("audio", audio_type), ("text", pa.string()), ("id", pa.string())],
                       metadata={"huggingface": json.dumps({"info": {"features": features}})})
    return pa.table([pa.array(audio, audio_type), pa.array(texts), pa.array(ids)], schema=schema)


def main(argv=None) -> None:
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="parquet file to write")
    args = parser.parse_args(argv)
    table = build_table()
    atomic_write(args.output, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    print(f"wrote {args.output}: {table.num_rows} utterances, {os.path.getsize(args.output) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
