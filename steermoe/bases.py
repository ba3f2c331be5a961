"""Checks on the frozen base checkpoints before they load: a clear error for a folder that does not exist, a hub
id that cannot be fetched, or an LLM that is not a causal language model with a usable tokenizer.

Each failure is a :class:`BaseModelError` naming the base's role (``whisper`` or ``llm``) and the name it was given,
so that the caller can point at what the user wrote: the config key ``model.whisper`` / ``model.llm``, or a
checkpoint's stored path and the ``--whisper`` / ``--llm`` options that replace it.
"""
import contextlib
import os

MIN_VOCAB_SIZE = 100            # a language model's tokenizer has far more; a stub has one or a few
_PROBE_TEXT = "the quick brown fox jumps over the lazy dog"


class BaseModelError(ValueError):
    """A base checkpoint that cannot be used. ``role``: ``whisper`` | ``llm``; ``path``: the name given;
    ``reason``: what is wrong with it, as a sentence fragment."""

    def __init__(self, role: str, path: str, reason: str):
        super().__init__(f"{role} checkpoint {path}: {reason}")
        self.role, self.path, self.reason = role, path, reason


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(name: str) -> bool:
    """A name no hub id can be: absolute, starting with ``.`` / ``~``, or with more than one ``/``."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def _in_hub_cache(repo_id: str) -> bool:
    """Whether hub id ``repo_id``'s ``config.json`` is in the local hub cache (loadable offline)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:          # not a valid hub id
        return False


def check_base_exists(role: str, name: str) -> None:
    """Raise :class:`BaseModelError` unless ``name`` is a folder or may be fetched as a hub id."""
    if os.path.isdir(name):
        return
    if os.path.exists(name):
        raise BaseModelError(role, name, "is a file; expected a checkpoint folder (config.json, weights, ...)")
    if _looks_like_path(name):
        raise BaseModelError(role, name, "the folder does not exist")
    if hub_offline() and not _in_hub_cache(name):
        raise BaseModelError(role, name, "no such folder, and the hub is offline (HF_HUB_OFFLINE) so it cannot be "
                                         "fetched as a hub id (nor is it in the local hub cache)")


@contextlib.contextmanager
def loading(role: str, name: str):
    """Turn a failure to fetch hub id ``name`` (not a local folder) into a :class:`BaseModelError`."""
    from huggingface_hub.utils import HFValidationError

    try:
        yield
    except (OSError, HFValidationError) as err:
        if os.path.isdir(name):
            raise
        raise BaseModelError(role, name, f"no such folder, and fetching it as a hub id failed: {err}") from err


def check_whisper(name: str) -> None:
    """Raise :class:`BaseModelError` unless ``name``'s config is a Whisper model's."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    if config.model_type != "whisper":
        raise BaseModelError("whisper", name, f"is a {type(config).__name__} ({config.model_type}); expected a "
                                              "Whisper checkpoint (e.g. openai/whisper-base)")


def check_causal_lm(name: str) -> None:
    """Raise :class:`BaseModelError` unless ``name``'s config is a decoder-only model with a causal-LM class."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = AutoConfig.from_pretrained(name)
    kind = f"a {type(config).__name__} ({config.model_type})"
    if getattr(config, "is_encoder_decoder", False):
        raise BaseModelError("llm", name, f"is {kind}, an encoder-decoder model; expected a decoder-only causal LM "
                                          "(e.g. Llama, Qwen, SmolLM)")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BaseModelError("llm", name, f"is {kind}, which has no causal-LM class in transformers; expected a "
                                          "decoder-only causal LM (e.g. Llama, Qwen, SmolLM)")


def check_tokenizer(name: str, tokenizer) -> None:
    """Raise :class:`BaseModelError` unless the LLM's tokenizer has a language model's vocabulary and splits text
    into several known tokens."""
    size = len(tokenizer)
    if size < MIN_VOCAB_SIZE:
        raise BaseModelError("llm", name, f"its tokenizer ({type(tokenizer).__name__}) has {size} tokens; expected "
                                          f"a language model's vocabulary (at least {MIN_VOCAB_SIZE})")
    ids = tokenizer(_PROBE_TEXT, add_special_tokens=False)["input_ids"]
    known = [i for i in ids if i != tokenizer.unk_token_id]
    if len(known) < 2:
        raise BaseModelError("llm", name, f"its tokenizer ({type(tokenizer).__name__}) encodes {_PROBE_TEXT!r} as "
                                          f"{ids}; expected several known tokens")
