"""Seeded, templated English sentences for synthetic training speech.

    templated_sentences(500, seed=0)    # 500 distinct everyday sentences, the same for the same seed
    telephone_prompts(500, seed=0)      # 500 distinct telephone-system prompts and single words
    word_sequences(500, words, seed=0)  # 500 distinct runs of 1-6 words drawn from a word list

Each sentence fills one of ``TEMPLATES`` with words drawn from ``VOCABULARY``: everyday statements, questions,
requests, dates, times, numbers and spoken-menu phrases, so that a model trained on them meets a broad
vocabulary, digits spoken as words, and the phrasing of telephone prompts. :func:`telephone_prompts` speaks the
single words a telephone system says on their own (:data:`CLOSED_CLASSES`: every letter, phonetic-alphabet word,
number and ordinal word, month, day and symbol name, each once) and then its prompts (:data:`PROMPT_TEMPLATES`:
voicemail, conference bridge, queue). :func:`word_sequences` strings together words of a large list (a tokenizer's
whole words: make_speech's ``--word-source``), so that the model hears words no template holds and cannot guess them
from the context. All three skip the texts they are told to ``exclude`` (a held-out set's).
"""
import random
import re
from typing import Callable, Dict, Iterable, List, Sequence

VOCABULARY: Dict[str, Sequence[str]] = {
    "name": ("Anna", "Ben", "Carlos", "Diana", "Emma", "Frank", "Grace", "Henry", "Isabel", "James", "Karen",
             "Leo", "Maria", "Nathan", "Olivia", "Peter", "Rachel", "Samuel", "Tina", "Victor", "William", "Zoe"),
    "person": ("my friend", "the teacher", "our neighbour", "the doctor", "the manager", "your sister",
               "the driver", "a customer", "the operator", "the new engineer", "his father", "her cousin",
               "the nurse", "the pilot", "the baker", "every student", "the caller", "the receptionist"),
    "place": ("the station", "the office", "the library", "the market", "the airport", "the hospital",
              "the school", "the museum", "the bank", "the hotel", "the kitchen", "the garden", "the harbour",
              "the city centre", "the post office", "the front desk", "the meeting room", "the village"),
    "object": ("the report", "a ticket", "the keys", "a letter", "the package", "the invoice", "a new phone",
               "the map", "an umbrella", "the laptop", "the contract", "a cup of tea", "the camera",
               "the schedule", "a blue folder", "the receipt", "the password", "the message", "the manual"),
    "verb_past": ("found", "opened", "sent", "lost", "signed", "checked", "printed", "carried", "ordered",
                  "returned", "cleaned", "forgot", "recorded", "deleted", "saved", "repaired", "answered"),
    "verb": ("find", "open", "send", "sign", "check", "print", "carry", "order", "return", "clean", "record",
             "delete", "save", "repair", "answer", "cancel", "confirm", "review", "update", "change"),
    "adjective": ("quiet", "busy", "closed", "ready", "full", "empty", "warm", "cold", "late", "early",
                  "expensive", "broken", "available", "locked", "safe", "bright", "crowded", "open"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "month": ("January", "February", "March", "April", "May", "June", "July", "August", "September",
              "October", "November", "December"),
    "digit": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "number": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
               "fifteen", "twenty", "thirty", "forty", "fifty", "sixty", "one hundred", "two hundred"),
    "ordinal": ("first", "second", "third", "fourth", "fifth", "sixth", "tenth", "twelfth", "twentieth"),
    "hour": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"),
    "unit": ("minutes", "hours", "days", "weeks", "dollars", "miles", "people", "messages", "pages", "calls"),
    "service": ("sales", "billing", "technical support", "the front desk", "an operator", "customer service",
                "the help desk", "reservations", "accounts", "the company directory", "shipping", "returns"),
    "item": ("account number", "extension", "password", "pin number", "room number", "phone number",
             "order number", "member number", "access code", "mailbox number", "zip code", "date of birth"),
    "key": ("pound", "star", "hash"),
    "status": ("busy", "unavailable", "not in service", "on another call", "away from the desk",
               "out of the office", "in a meeting", "on hold"),
    "weather": ("rain", "snow", "strong wind", "fog", "sunshine", "a storm", "thunder", "clear skies"),
    "food": ("bread", "soup", "rice", "apples", "cheese", "coffee", "pasta", "fresh fish", "oranges", "salad"),
}

# The words a telephone system speaks one at a time, by class: ``telephone_prompts`` speaks each of them once.
CLOSED_CLASSES: Dict[str, Sequence[str]] = {
    "letter": tuple("abcdefghijklmnopqrstuvwxyz"),
    "phonetic": ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
                 "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform",
                 "victor", "whiskey", "x-ray", "yankee", "zulu"),
    "cardinal": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                 "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred",
                 "thousand", "million", "billion"),
    "nth": ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
            "eighteenth", "nineteenth", "twentieth", "thirtieth", "fortieth", "fiftieth", "sixtieth", "seventieth",
            "eightieth", "ninetieth", "hundredth", "thousandth", "millionth"),
    "month": VOCABULARY["month"],
    "day": VOCABULARY["day"],
    "symbol": ("period", "comma", "colon", "semicolon", "question mark", "exclamation point", "at sign",
               "dollar sign", "percent", "ampersand", "asterisk", "plus", "minus", "equals", "slash", "backslash",
               "underscore", "dash", "hyphen", "apostrophe", "quote", "left parenthesis", "right parenthesis",
               "tilde", "caret", "pound", "star", "dot", "space", "uppercase", "lowercase"),
    "word": ("yes", "no", "on", "off", "and", "or", "is", "are", "was", "press", "enter", "dial", "message",
             "messages", "mailbox", "extension", "number", "minute", "minutes", "seconds", "hour", "hours", "today",
             "tomorrow", "yesterday", "noon", "midnight", "A.M.", "P.M.", "new", "old", "saved", "urgent", "deleted",
             "enabled", "disabled", "activated", "goodbye", "hello", "thank you", "please", "sorry", "welcome",
             "invalid", "busy", "unavailable", "received", "from", "at", "to", "for", "the", "queue", "agent",
             "caller", "conference", "participant", "participants", "password", "greeting", "recording"),
}

# VOCABULARY and the fields only PROMPT_TEMPLATES use
PROMPT_VOCABULARY: Dict[str, Sequence[str]] = {
    **VOCABULARY,
    "date_nth": CLOSED_CLASSES["nth"][:20] + ("twenty-first", "twenty-second", "twenty-third", "twenty-fourth",
                                             "twenty-fifth", "thirtieth", "thirty-first"),
    "recording": ("message", "greeting", "recording", "introduction", "announcement", "name"),
    "caller_state": ("on hold", "in the queue", "connected", "next in line", "the only caller", "logged in",
                     "logged out"),
    "bridge_state": ("muted", "unmuted", "locked", "unlocked", "being recorded", "full", "empty"),
    "action": ("listen to", "save", "delete", "forward", "replay", "erase", "skip", "repeat", "review"),
    "done": ("saved", "deleted", "sent", "recorded", "forwarded", "updated", "processed", "transferred",
             "cancelled", "changed"),
    "sound": ("the tone", "the beep", "the signal"),
    "ampm": ("A.M.", "P.M.", "o'clock"),
}

TEMPLATES = (
    "{name} {verb_past} {object} at {place}.",
    "{person} {verb_past} {object} on {day}.",
    "Please {verb} {object} before {day}.",
    "Can you {verb} {object} for {person}?",
    "The meeting starts at {hour} o'clock on {day}.",
    "We will meet at {place} at half past {hour}.",
    "{place} is {adjective} on {day} mornings.",
    "The train to {place} leaves in {number} minutes.",
    "I waited for {number} {unit} at {place}.",
    "{name} was born on the {ordinal} of {month}.",
    "The {ordinal} floor of {place} is {adjective}.",
    "Expect {weather} on {day} and {weather} on {day}.",
    "{person} bought {food} and {food} at the market.",
    "Press {digit} for {service}.",
    "For {service}, press {digit}.",
    "To reach {service}, please press {digit} now.",
    "Please enter your {item} followed by the {key} key.",
    "Please enter your {item}, then press {key}.",
    "That {item} is not valid. Please try again.",
    "The person you are calling is {status}.",
    "{name} is {status}. Please leave a message after the tone.",
    "You have {number} new {unit}.",
    "Your call will be answered in about {number} minutes.",
    "Thank you for calling {place}. Please hold.",
    "Your {item} has been {verb_past}.",
    "Say or enter the {ordinal} digit of your {item}.",
    "The number you dialed is {status}.",
    "If you know the extension of {person}, dial it now.",
    "To {verb} {object}, press {digit}. To {verb} {object}, press {digit}.",
    "Goodbye, and thank you for calling {service}.",
    "Why did {person} {verb} {object} on {day}?",
    "{name} and {name} went to {place} in {month}.",
    "It costs {number} dollars to {verb} {object}.",
    "Dial {digit} {digit} {digit} {digit} to reach {place}.",
    "The office is {adjective} until {hour} in the evening.",
)

PROMPT_TEMPLATES = (
    "{digit} {digit}", "{date_nth} {month}", "{month} {date_nth}", "{hour} {ampm}",
    "Press {digit} to {action} this {recording}.",
    "To {action} your {recording}, press {digit}.",
    "You have {number} new messages and {number} saved messages.",
    "There are {number} other participants in the conference.",
    "You are now {caller_state}.",
    "The conference is now {bridge_state}.",
    "Your {recording} has been {done}.",
    "At {sound}, please say your {recording}. When finished, press {key}.",
    "After {sound}, record your {recording}, then press the {key} key.",
    "Please enter the number of the mailbox you wish to reach.",
    "That {item} is not available. Please try again later.",
    "Please hold while I try to connect you to {service}.",
    "You are caller number {number}. Your call is important to us.",
    "The {item} you entered is invalid.",
    "Message {digit} of {number}.",
    "Press {key} to return to the main menu.",
    "There is no mailbox at extension {digit} {digit} {digit}.",
    "Your {recording} is {number} seconds long.",
    "Enter your {item} and then press {key}.",
    "I am sorry, that is not a valid {item}.",
    "This call may be recorded for quality and training purposes.",
    "Please wait while your {recording} is {done}.",
    "Received at {hour} {ampm} on {day}, the {date_nth} of {month}.",
    "To hear the {recording} again, press {digit}.",
    "You will be connected to {service} in about {number} minutes.",
)

_FIELD = re.compile(r"\{(\w+)\}")


def _capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _check_count(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0; got {n!r}")


def plain_words(text: str) -> str:
    """``text`` lower-cased, punctuation dropped, single-spaced: the form ``exclude`` compares ("Is." == "is")."""
    return " ".join(re.sub(r"[^a-z0-9']+", " ", text.lower()).split())


def _distinct(n: int, draw: Callable[[], str], exclude: Iterable[str], what: str) -> List[str]:
    """The first ``n`` texts of ``draw()`` that differ from each other and from ``exclude`` as :func:`plain_words`;
    ``ValueError`` when ``100 n + 1000`` draws do not give them."""
    seen = {plain_words(text) for text in exclude}
    out: List[str] = []
    for _ in range(100 * n + 1000):
        if len(out) == n:
            break
        text = draw()
        key = plain_words(text)
        if key not in seen:
            seen.add(key)
            out.append(text)
    if len(out) < n:
        raise ValueError(f"cannot make {n} distinct {what} (made {len(out)})")
    return out


def templated_sentences(n: int, seed: int = 0, templates: Sequence[str] = TEMPLATES,
                        vocabulary: Dict[str, Sequence[str]] = VOCABULARY, exclude: Iterable[str] = ()) -> List[str]:
    """``n`` distinct sentences from ``templates`` and ``vocabulary``, deterministic for ``seed``, none equal to a
    text of ``exclude`` (compared as :func:`plain_words`: held-out transcripts are never spoken).

    Templates are used in turn (a seeded order each round) so that every phrasing is frequent; each field gets a
    seeded draw from its word list; a template ending in "." or "?" is a sentence and starts with a capital.
    Raises ``ValueError`` when ``n`` is not an int >= 0, ``templates`` is empty, or they cannot make ``n``.
    """
    _check_count(n)
    if isinstance(templates, str) or not templates:
        raise ValueError(f"templates must be a non-empty sequence of strings; got {templates!r}")
    rng = random.Random(seed)
    order: List[str] = []

    def draw() -> str:
        if not order:
            order.extend(templates)
            rng.shuffle(order)
        template = order.pop()
        sentence = _FIELD.sub(lambda m: rng.choice(vocabulary[m.group(1)]), template)
        # a sentence starts with a capital; a fragment ("{digit} {digit}") stays as drawn
        return _capitalise(sentence) if template.endswith((".", "?")) else sentence

    return _distinct(n, draw, exclude, "sentences from the templates")


def telephone_prompts(n: int, seed: int = 0, exclude: Iterable[str] = ()) -> List[str]:
    """``n`` distinct telephone-system texts: first every word of :data:`CLOSED_CLASSES` once (in class order), then
    :data:`PROMPT_TEMPLATES` filled from :data:`PROMPT_VOCABULARY`; none equal to a text of ``exclude``."""
    _check_count(n)
    seen = {plain_words(text) for text in exclude}
    words = []
    for word in (w for ws in CLOSED_CLASSES.values() for w in ws):
        key = plain_words(word)
        if key not in seen:
            seen.add(key)
            words.append(word)
    words = words[:n]
    return words + templated_sentences(n - len(words), seed, PROMPT_TEMPLATES, PROMPT_VOCABULARY, exclude=seen)


def word_sequences(n: int, words: Sequence[str], seed: int = 0, min_words: int = 1, max_words: int = 6,
                   exclude: Iterable[str] = ()) -> List[str]:
    """``n`` distinct texts of ``min_words``..``max_words`` words (a uniform count), each drawn uniformly from the
    distinct words of ``words`` (as :func:`plain_words` writes them: lower case, no punctuation; an entry that it
    splits stays one draw), deterministic for ``seed``; none equal to a text of ``exclude``.

    Raises ``ValueError`` when ``n`` is not an int >= 0, ``words`` holds no word, the counts are not
    1 <= min_words <= max_words, or ``100 n + 1000`` draws do not give ``n`` distinct texts.
    """
    _check_count(n)
    vocabulary = sorted({plain_words(word) for word in words} - {""})
    if not vocabulary:
        raise ValueError(f"words must hold at least one word; got {list(words)[:5]!r}")
    if not (isinstance(min_words, int) and isinstance(max_words, int) and 1 <= min_words <= max_words):
        raise ValueError(f"need 1 <= min_words <= max_words; got {min_words!r}, {max_words!r}")
    rng = random.Random(seed)
    return _distinct(n, lambda: " ".join(rng.choice(vocabulary) for _ in range(rng.randint(min_words, max_words))),
                     exclude, f"texts from {len(vocabulary)} words")
