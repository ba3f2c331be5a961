"""The ``steermoe`` command: ``train`` | ``eval`` | ``transcribe`` | ``demo`` | ``plot``.

Errors a user can fix (a missing file, a bad config key, an unreadable or mismatched checkpoint) end the command
with one line on stderr and a non-zero exit code; set ``STEERMOE_DEBUG=1`` to see the traceback instead.
"""
import argparse
import json
import math
import os
import sys
import tempfile
from typing import List, Optional

from .checkpoint import CheckpointError
from .config import ConfigError

EXIT_USAGE = 2
EXIT_FAILURE = 1


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser that takes its positionals anywhere among the options, e.g. the overrides of
    ``train --config X a=1 --overwrite b=2`` (``parse_intermixed_args`` for the subcommand's arguments)."""

    _parsing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._parsing:          # the intermixed parse's own passes over the options, then the positionals
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steermoe", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,transcribe,demo,plot}",
                                parser_class=_IntermixedParser)

    p = sub.add_parser("train", help="train the steering tensors and projector",
                       description="Train from a YAML config; section.key=value pairs override it.")
    p.add_argument("--config", help="YAML run configuration")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    mode.add_argument("--overwrite", action="store_true", help="delete output_dir's checkpoints and start over")

    p = sub.add_parser("eval", help="WER/CER of a checkpoint on whole parquet sets")
    _checkpoint_args(p)
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="parquet files, directories or globs")
    p.add_argument("--output", help="per-utterance JSONL (id, reference, hypothesis); the summary goes next to it "
                                    "as <output>.summary.json")
    p.add_argument("--batch_size", type=_positive_int, default=8)
    p.add_argument("--audio_column", default="audio")
    p.add_argument("--text_column", default="text")
    p.add_argument("--prompt_column")
    p.add_argument("--id_column")

    p = sub.add_parser("transcribe", help="print one transcript per audio file")
    _checkpoint_args(p)
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3)")

    p = sub.add_parser("demo", help="train tiny random models on the bundled speech, offline on CPU")
    p.add_argument("--output_dir", help="where models, checkpoints and logs go (default: a temporary directory)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of the demo config")

    p = sub.add_parser("plot", help="PNG charts of a run's metrics (needs matplotlib: pip install -e \".[plot]\")",
                       description="Charts of RUN_DIR/metrics.jsonl: loss, learning rates and gradient norm, eval "
                                   "WER over steps, and the latest eval's gate usage per layer and expert.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output_dir")
    p.add_argument("--output_dir", help="where the PNGs go (default: RUN_DIR/plots)")
    return parser


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the option in its error)."""
    try:
        if int(text) >= 1:
            return int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected an int >= 1; got {text!r}")


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run's output_dir (its newest)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="frozen-weight dtype (default: the checkpoint's; float32 on CPU)")
    p.add_argument("--max_new_tokens", type=_positive_int, default=128)
    p.add_argument("--whisper", help="Whisper checkpoint to use instead of the one the checkpoint names")
    p.add_argument("--llm", help="LLM checkpoint to use instead of the one the checkpoint names")


def _load_model(args):
    """SteerMoEModel from ``--checkpoint`` (frozen bases reloaded from where its config names them)."""
    from .checkpoint import resolve_checkpoint
    from .model import SteerMoEModel
    from .train import resolve_device

    path = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    overrides = {k: getattr(args, k) for k in ("whisper", "llm", "dtype") if getattr(args, k)}
    if device.type == "cpu":
        overrides.setdefault("dtype", "float32")
    try:
        model = SteerMoEModel.from_trainable(path, device=device, **overrides)
    except Exception as err:  # noqa: BLE001 - safetensors, json, torch and transformers each raise their own
        raise CheckpointError(f"cannot load checkpoint {path}: {err}") from err
    return model.eval(), path


def cmd_train(args) -> int:
    from .config import load_config
    from .train import train

    result = train(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite)
    if result["checkpoint"]:
        print(f"checkpoint: {result['checkpoint']}")
    return 0


def _check_output(path: str) -> str:
    """Raise unless ``path`` and its summary ``<path>.summary.json`` can be written; returns the summary's path."""
    summary = f"{os.path.splitext(path)[0]}.summary.json"
    for target in (path, summary):
        if os.path.isdir(target):
            raise IsADirectoryError(f"--output {path}: {target} is a directory; expected a file path")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):     # creating a file there is the only reliable writability test
        pass
    return summary


def cmd_eval(args) -> int:
    from .config import DataConfig
    from .evaluate import eval_batches, evaluate, text_normalizer, write_summary
    from .train import open_source

    data = DataConfig(audio_column=args.audio_column, text_column=args.text_column,
                      prompt_column=args.prompt_column, id_column=args.id_column)
    source = open_source(data, list(args.data), for_eval=True)    # bad data paths fail before the model loads
    summary_path = _check_output(args.output) if args.output else None
    model, path = _load_model(args)
    summary = evaluate(model, eval_batches(source, args.batch_size), normalize=text_normalizer(model.config["whisper"]),
                       max_new_tokens=args.max_new_tokens, records_path=args.output)
    summary = {"checkpoint": path, "data": list(args.data), **summary, "skipped": dict(source.skipped)}
    print(json.dumps({k: v for k, v in summary.items() if k != "gating"}, indent=2))
    if summary["gating"]:
        g = summary["gating"]
        log_e = math.log(g["num_experts"])
        print(f"gating over {g['num_frames']} frames (usage entropy in nats; log E = {log_e:.3f}):")
        for layer in g["layers"]:
            print(f"  layer {layer['layer']:>2}: usage entropy {layer['usage_entropy']:.3f}  "
                  f"top share {layer['top_share']:.3f}  frame entropy {layer['entropy']:.3f}  "
                  f"top experts {layer['top_experts']}")
    if args.output:
        write_summary(summary, summary_path)
        print(f"per-utterance results: {args.output}; summary with gating statistics: {summary_path}")
    return 0


def cmd_transcribe(args) -> int:
    from .audio import load_audio_file
    from .evaluate import transcribe_files

    for path in args.audio:     # a file that cannot be transcribed fails before the model loads
        load_audio_file(path)
    model, _ = _load_model(args)
    for path, text in zip(args.audio, transcribe_files(model, args.audio, max_new_tokens=args.max_new_tokens)):
        print(f"{path}\t{text}")
    return 0


def cmd_demo(args) -> int:
    from .demo.demo import run_demo

    run_demo(args.output_dir, args.overrides)
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run

    for name, path in plot_run(args.run_dir, args.output_dir).items():
        print(f"{name}: {path}" if path else f"{name}: nothing to plot (no such records in the metrics)")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "transcribe": cmd_transcribe, "demo": cmd_demo, "plot": cmd_plot}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``steermoe`` console script; returns the exit code."""
    from .train import TrainingError

    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, TrainingError, OSError, ValueError, ImportError) as err:
        if os.environ.get("STEERMOE_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"steermoe {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, ConfigError) else EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"steermoe {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
