"""The ``steermoe`` command: ``train`` | ``eval`` | ``transcribe`` | ``demo`` | ``plot`` | ``info``.

Errors a user can fix (a missing file, a bad config key, an unreadable or mismatched checkpoint) end the command
with one line on stderr and a non-zero exit code; set ``STEERMOE_DEBUG=1`` to see the traceback instead.
Parsing imports neither torch nor transformers (``--help`` and ``--version`` answer at once); each command imports
what it runs.
"""
import argparse
import json
import math
import os
import signal
import sys
import tempfile
from typing import List, Optional

from . import __version__
from .interrupts import SignalInterrupt, interrupt_on_stop_signals

EXIT_USAGE = 2
EXIT_FAILURE = 1
DESCRIPTION = ("Train, evaluate and run SteerMoE: a frozen Whisper encoder, steered layer by layer, feeding a frozen "
               "LLM.")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help when it has a default worth naming and does not name one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False and default is not argparse.SUPPRESS
                and "default" not in text):
            text += " (default: %(default)s)"
        return text


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser that takes its positionals anywhere among the options, e.g. the overrides of
    ``train --config X a=1 --overwrite b=2`` (``parse_intermixed_args`` for the subcommand's arguments)."""

    _parsing = False

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        if self._parsing:          # the intermixed parse's own passes over the options, then the positionals
            return super().parse_known_args(args, namespace)
        self._parsing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing = False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steermoe", description=DESCRIPTION, formatter_class=_HelpFormatter,
                                     epilog="Run 'steermoe COMMAND --help' for a command's options.")
    parser.add_argument("-V", "--version", action="version", version=f"steermoe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                                parser_class=_IntermixedParser)

    p = sub.add_parser("train", help="train the steering tensors and projector",
                       description="Train from a YAML config; section.key=value pairs override it "
                                   "(README: Config keys).")
    p.add_argument("--config", help="YAML run configuration")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    mode.add_argument("--overwrite", action="store_true", help="delete output_dir's checkpoints and start over")

    p = sub.add_parser("eval", help="WER/CER of a checkpoint on whole parquet sets",
                       description="Greedy WER/CER of a checkpoint on whole parquet sets, with per-layer expert usage.")
    _checkpoint_args(p)
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="parquet files, directories or globs")
    p.add_argument("--output", help="per-utterance JSONL (id, reference, hypothesis); the summary goes next to it "
                                    "as <output>.summary.json")
    p.add_argument("--batch_size", type=_positive_int, default=8, help="utterances per forward")
    p.add_argument("--audio_column", default="audio", help="column holding the audio")
    p.add_argument("--text_column", default="text", help="column holding the reference transcript")
    p.add_argument("--prompt_column", help="column holding a per-utterance instruction (default: the model's prompt)")
    p.add_argument("--id_column", help="column holding the utterance ids (default: <file>:<row>)")
    p.add_argument("--long_form", action="store_true",
                   help="transcribe utterances over 30 s in windows (scored by WER/CER only); otherwise they are "
                        "skipped and counted as too_long")

    p = sub.add_parser("transcribe", help="print one transcript per audio file",
                       description="Print 'PATH<tab>transcript' for each audio file.")
    _checkpoint_args(p)
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3); those over 30 s are transcribed in "
                                            "windows cut at quiet points")
    p.add_argument("--batch_size", type=_positive_int, default=8, help="30 s windows transcribed together")

    p = sub.add_parser("demo", help="train tiny random models on the bundled speech, offline on CPU",
                       description="Build tiny random Whisper and LLM checkpoints, train on the bundled speech and "
                                   "print the loss and WER before and after (offline, CPU, a few minutes).")
    p.add_argument("--output_dir", help="where models, checkpoints and logs go (default: a temporary directory)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of the demo config")

    p = sub.add_parser("plot", help="PNG charts of a run's metrics (needs matplotlib: pip install -e \".[plot]\")",
                       description="Charts of RUN_DIR/metrics.jsonl: loss, learning rates and gradient norm, eval "
                                   "WER over steps, and the latest eval's gate usage per layer and expert.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output_dir")
    p.add_argument("--output_dir", help="where the PNGs go (default: RUN_DIR/plots)")

    p = sub.add_parser("info", help="versions, devices and the steering op's backends",
                       description="Print steermoe's version, the versions of Python, torch, triton and "
                                   "transformers, the devices, and which backends of the steering op can run on "
                                   "each (with the reason when one cannot). Paste it into bug reports.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the option in its error)."""
    try:
        if int(text) >= 1:
            return int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected an int >= 1; got {text!r}")


def _rate_or_none(text: str):
    """argparse type: a number > 0, or ``none`` (returned as the string: the option was given, with no cap)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        if 0 < float(text) < float("inf"):
            return float(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a number > 0 or 'none'; got {text!r}")


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory, or a run's output_dir (its newest)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="frozen-weight dtype (default: the checkpoint's; float32 on CPU)")
    p.add_argument("--max_new_tokens", type=_positive_int,
                   help="greedy decoding budget per utterance (default: the checkpoint's, model.max_new_tokens of "
                        "its run)")
    p.add_argument("--max_tokens_per_second", type=_rate_or_none, metavar="RATE",
                   help="cap each utterance's budget at ceil(RATE × its seconds) tokens, or 'none' for no cap "
                        "(default: the checkpoint's, model.max_tokens_per_second of its run)")
    p.add_argument("--whisper", help="Whisper checkpoint to use instead of the one the checkpoint names")
    p.add_argument("--llm", help="LLM checkpoint to use instead of the one the checkpoint names")


def _load_model(args):
    """SteerMoEModel from ``--checkpoint`` (frozen bases reloaded from where its config names them)."""
    from .bases import BaseModelError
    from .checkpoint import CheckpointError, resolve_checkpoint
    from .model import SteerMoEModel
    from .train import resolve_device

    path = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    overrides = {k: getattr(args, k) for k in ("whisper", "llm", "dtype", "max_new_tokens", "max_tokens_per_second")
                 if getattr(args, k)}
    if overrides.get("max_tokens_per_second") == "none":
        overrides["max_tokens_per_second"] = None
    if device.type == "cpu":
        overrides.setdefault("dtype", "float32")
    try:
        model = SteerMoEModel.from_trainable(path, device=device, **overrides)
    except BaseModelError as err:       # e.g. a base folder moved since training, or a wrong --whisper / --llm
        if err.role in overrides:
            raise CheckpointError(f"--{err.role} {err.path}: {err.reason}") from None
        raise CheckpointError(f"checkpoint {path} names the {err.role} checkpoint {err.path}: {err.reason}; pass "
                              f"--{err.role} PATH to load it from where it is now") from None
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
    if args.long_form:
        data.max_seconds = math.inf
    source = open_source(data, list(args.data), for_eval=True)    # bad data paths fail before the model loads
    summary_path = _check_output(args.output) if args.output else None
    model, path = _load_model(args)
    summary = evaluate(model, eval_batches(source, args.batch_size), normalize=text_normalizer(model.config["whisper"]),
                       max_new_tokens=args.max_new_tokens, records_path=args.output, long_form=args.long_form,
                       total=source.num_rows)
    summary = {"checkpoint": path, "data": list(args.data),
               **{k: model.config[k] for k in ("max_new_tokens", "max_tokens_per_second")}, **summary,
               "skipped": dict(source.skipped)}
    if source.skipped["too_long"]:
        print(f"steermoe eval: {source.skipped['too_long']} utterances over {data.max_seconds:g} s skipped (too_long); "
              "--long_form transcribes them in windows", file=sys.stderr)
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
    """One ``path<TAB>transcript`` line per file on stdout, in order, and one error line on stderr naming each file
    that cannot be transcribed; exit 1 when any failed (files whose header cannot be read fail before the model loads,
    which it does not at all when none can)."""
    from .audio import check_audio_file
    from .evaluate import transcribe_paths

    failed = 0

    def fail(err: Exception) -> None:
        nonlocal failed
        failed += 1
        print(f"steermoe transcribe: error: {' '.join(str(err).split())}", file=sys.stderr)

    readable = []
    for path in args.audio:
        try:
            check_audio_file(path)
            readable.append(path)
        except ValueError as err:
            fail(err)
    if readable:
        model, _ = _load_model(args)
        for path, text in transcribe_paths(model, readable, max_new_tokens=args.max_new_tokens,
                                           batch_size=args.batch_size):
            if isinstance(text, ValueError):
                fail(text)
            else:
                print(f"{path}\t{text}", flush=True)
    return EXIT_FAILURE if failed else 0


def cmd_demo(args) -> int:
    from .demo.demo import run_demo

    run_demo(args.output_dir, args.overrides)
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run

    for name, path in plot_run(args.run_dir, args.output_dir).items():
        print(f"{name}: {path}" if path else f"{name}: nothing to plot (no such records in the metrics)")
    return 0


def cmd_info(args) -> int:
    from .environment import environment_info, format_environment

    info = environment_info()
    print(json.dumps(info, indent=2) if args.json else format_environment(info))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "transcribe": cmd_transcribe, "demo": cmd_demo, "plot": cmd_plot,
            "info": cmd_info}


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``steermoe`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .train import TrainingError

    restore_signals = interrupt_on_stop_signals()
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, TrainingError, OSError, ValueError, ImportError) as err:
        if os.environ.get("STEERMOE_DEBUG"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"steermoe {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, ConfigError) else EXIT_FAILURE
    except KeyboardInterrupt as err:    # Ctrl-C, or SIGTERM / SIGUSR1 outside the training loop
        name, signum = (err.name, err.signum) if isinstance(err, SignalInterrupt) else ("Ctrl-C", signal.SIGINT)
        print(f"steermoe {args.command}: interrupted ({name})", file=sys.stderr)
        return 128 + signum
    finally:
        restore_signals()
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
