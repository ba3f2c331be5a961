"""Seeded, templated English sentences for synthetic training speech.

    templated_sentences(500, seed=0)   # 500 distinct sentences, the same for the same seed

Each sentence fills one of ``TEMPLATES`` with words drawn from ``VOCABULARY``: everyday statements, questions,
requests, dates, times, numbers and spoken-menu phrases, so that a model trained on them meets a broad
vocabulary, digits spoken as words, and the phrasing of telephone prompts.
"""
import random
import re
from typing import Dict, List, Sequence

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

_FIELD = re.compile(r"\{(\w+)\}")


def _capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def templated_sentences(n: int, seed: int = 0) -> List[str]:
    """``n`` distinct sentences from :data:`TEMPLATES` and :data:`VOCABULARY`, deterministic for ``seed``.

    Templates are used in turn (a seeded order each round) so that every phrasing is frequent; each field gets a
    seeded draw from its word list. Raises ``ValueError`` when ``n`` is not an int >= 0.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0; got {n!r}")
    rng = random.Random(seed)
    out: List[str] = []
    seen = set()
    order: List[str] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot make {n} distinct sentences from the templates (made {len(out)})")
        if not order:
            order = list(TEMPLATES)
            rng.shuffle(order)
        template = order.pop()
        sentence = _capitalise(_FIELD.sub(lambda m: rng.choice(VOCABULARY[m.group(1)]), template))
        if sentence not in seen:
            seen.add(sentence)
            out.append(sentence)
    return out
