"""The talking model's closed domain (`TALK-DOMAIN.md`): entities, requests, canonical answers.

Everything a conversation can contain comes from here, so the corpus generator, the evaluator and
any outside evaluation agree on the words. A `Memory` holds the facts a user has told so far; a
request is answered against it, and "told" requests update it (the newest fact wins).

Held-out values: a fixed tenth of the numbers and an eighth of the arithmetic problems (chosen by
a hash, so the choice is stable across runs and machines) are never used in training
conversations, so evaluation asks for values in combinations the model never heard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

NAMES = [
    "ada",
    "alice",
    "anna",
    "ben",
    "carl",
    "dana",
    "emma",
    "eric",
    "frank",
    "grace",
    "hannah",
    "ivan",
    "jack",
    "kate",
    "leo",
    "lucy",
    "mark",
    "max",
    "mia",
    "nick",
    "nora",
    "oscar",
    "paul",
    "rosa",
    "sam",
    "sara",
    "tom",
    "vera",
    "will",
    "zoe",
]
COLORS = [
    "red",
    "blue",
    "green",
    "yellow",
    "orange",
    "purple",
    "pink",
    "black",
    "white",
    "brown",
    "grey",
]
ANIMALS = ["cat", "dog", "horse", "rabbit", "lion", "tiger", "bird", "fish", "mouse", "bear"]
FOODS = ["pizza", "pasta", "rice", "bread", "soup", "cake", "apples", "bananas", "cheese", "salad"]
WORDS = [
    "cat",
    "dog",
    "sun",
    "tree",
    "book",
    "fish",
    "milk",
    "rain",
    "star",
    "moon",
    "door",
    "ship",
    "lamp",
    "frog",
    "bird",
    "cake",
    "hand",
    "ring",
    "wolf",
    "king",
]
PHRASES = (
    "good night",
    "thank you very much",
    "see you later",
    "the sky is blue",
    "i like green tea",
    "it is raining today",
    "the cat is sleeping",
    "we are going home",
    "happy birthday",
    "open the window",
)
FAVOURITES = {"color": COLORS, "animal": ANIMALS, "food": FOODS}
ACKS = ("okay", "uh huh", "right")

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = [
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

INTENTS = (
    "greet",
    "tell_name",
    "ask_name",
    "store_number",
    "ask_number",
    "tell_favorite",
    "ask_favorite",
    "arithmetic",
    "count",
    "spell",
    "repeat",
    "out_of_domain",
)
FACT_INTENTS = ("tell_name", "store_number", "tell_favorite")
ASK_INTENTS = ("ask_name", "ask_number", "ask_favorite")


def number_words(n: int) -> str:
    """0..999 as spoken words, no "and": 427 -> "four hundred twenty seven"."""
    if not 0 <= n <= 999:
        raise ValueError(f"number out of range 0..999: {n}")
    parts: list[str] = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        parts += [_ONES[hundreds], "hundred"]
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        parts.append(_TENS[tens])
        if ones:
            parts.append(_ONES[ones])
    elif rest >= 10:
        parts.append(_TEENS[rest - 10])
    elif rest or not parts:
        parts.append(_ONES[rest])
    return " ".join(parts)


def _hash(*key: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:4], "little")


def held_out_number(n: int) -> bool:
    """The tenth of 0..999 reserved for evaluation."""
    return _hash("number", n) % 10 == 0


def held_out_arithmetic(a: int, op: str, b: int) -> bool:
    """The eighth of arithmetic problems reserved for evaluation."""
    return _hash("arith", a, op, b) % 8 == 0


def normalize(text: str) -> str:
    """Lower case, punctuation removed, single spaces: how answers are compared."""
    out = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower())
    return " ".join(out.split())


@dataclass
class Memory:
    """The facts told so far in a conversation (the newest of each kind)."""

    name: str | None = None
    number: int | None = None
    favorites: dict[str, str] = field(default_factory=dict)

    def copy(self) -> Memory:
        return Memory(self.name, self.number, dict(self.favorites))


@dataclass
class Request:
    """One user request: what is said, where a pause may fall, and the model's answer.

    `pauses` are word indices i such that a pause may be put before word i: the words before it
    can never be a whole request. `fact` names what the request tells ("name", "number",
    "color", ...) or asks for (`asks`).
    """

    intent: str
    words: list[str]
    answer: str
    pauses: list[int] = field(default_factory=list)
    fact: str | None = None
    asks: str | None = None
    value: str | None = None

    @property
    def text(self) -> str:
        return " ".join(self.words)


def _pick(rng: np.random.Generator, xs: Sequence):
    return xs[int(rng.integers(len(xs)))]


def _number(rng: np.random.Generator, split: str) -> int:
    while True:
        n = int(rng.integers(1000))
        if held_out_number(n) == (split == "eval"):
            return n


def _arithmetic(rng: np.random.Generator, split: str) -> tuple[int, str, int, int]:
    while True:
        op = _pick(rng, ("plus", "minus", "times"))
        a, b = int(rng.integers(13)), int(rng.integers(13))
        if op == "minus" and b > a:
            a, b = b, a
        if held_out_arithmetic(a, op, b) == (split == "eval"):
            r = a + b if op == "plus" else a - b if op == "minus" else a * b
            return a, op, b, r


def out_of_domain_sentence(rng: np.random.Generator) -> str:
    """A sentence outside the domain: the speech corpus's general templates."""
    from duplex.data.speech import random_sentence

    return random_sentence(rng)


def make_request(
    intent: str, rng: np.random.Generator, memory: Memory, split: str = "train", **fixed: str
) -> Request:
    """A request of `intent` in a random wording with random values, answered against `memory`
    (which it updates when it tells a fact). `fixed` may pin a value: name=, number=, kind=,
    value=."""
    if intent == "greet":
        w = _pick(rng, ("hello", "hi", "hey there", "good morning", "good evening"))
        return Request(intent, w.split(), "hello, how can i help?")
    if intent == "tell_name":
        name = fixed.get("name") or _pick(rng, NAMES)
        prefix = _pick(rng, ("my name is", "i am", "call me")).split()
        memory.name = name
        return Request(
            intent, [*prefix, name], f"nice to meet you, {name}.", [len(prefix)], "name", None, name
        )
    if intent == "ask_name":
        w = _pick(rng, ("what is my name", "do you remember my name", "who am i")).split()
        pauses = [len(w) - 1] if w[-1] == "name" else []
        ans = f"your name is {memory.name}." if memory.name else "i do not know your name yet."
        return Request(intent, w, ans, pauses, None, "name", memory.name)
    if intent == "store_number":
        n = int(fixed["number"]) if "number" in fixed else _number(rng, split)
        prefix = _pick(rng, ("remember the number", "please remember")).split()
        memory.number = n
        words = number_words(n)
        return Request(
            intent,
            [*prefix, *words.split()],
            f"okay, {words}.",
            [len(prefix)],
            "number",
            None,
            words,
        )
    if intent == "ask_number":
        w = _pick(rng, ("what number did i tell you", "what was the number")).split()
        if memory.number is None:
            ans = "you have not told me a number."
        else:
            ans = f"the number was {number_words(memory.number)}."
        value = None if memory.number is None else number_words(memory.number)
        return Request(intent, w, ans, [len(w) - 1], None, "number", value)
    if intent == "tell_favorite":
        kind = fixed.get("kind") or _pick(rng, tuple(FAVOURITES))
        value = fixed.get("value") or _pick(rng, FAVOURITES[kind])
        memory.favorites[kind] = value
        words = f"my favorite {kind} is {value}".split()
        return Request(intent, words, f"{value}, got it.", [2, 4], kind, None, value)
    if intent == "ask_favorite":
        kind = fixed.get("kind") or _pick(rng, tuple(FAVOURITES))
        words = f"what is my favorite {kind}".split()
        value = memory.favorites.get(kind)
        if value is None:
            ans = f"you have not told me your favorite {kind}."
        else:
            ans = f"your favorite {kind} is {value}."
        return Request(intent, words, ans, [3, 4], None, kind, value)
    if intent == "arithmetic":
        a, op, b, r = _arithmetic(rng, split)
        words = ["what", "is", *number_words(a).split(), op, *number_words(b).split()]
        spoken = f"{number_words(a)} {op} {number_words(b)} is {number_words(r)}."
        return Request(intent, words, spoken, [2, 3 + len(number_words(a).split())])
    if intent == "count":
        n = int(rng.integers(1, 11))
        ans = ", ".join(number_words(i) for i in range(1, n + 1)) + "."
        return Request(intent, ["count", "to", number_words(n)], ans, [2])
    if intent == "spell":
        word = _pick(rng, WORDS)
        prefix = _pick(rng, ("spell", "how do you spell")).split()
        return Request(intent, [*prefix, word], ", ".join(word) + ".", [len(prefix)])
    if intent == "repeat":
        phrase = _pick(rng, PHRASES)
        prefix = _pick(rng, ("say", "repeat after me")).split()
        return Request(intent, [*prefix, *phrase.split()], f"{phrase}.", [len(prefix)])
    if intent == "out_of_domain":
        s = out_of_domain_sentence(rng)
        return Request(intent, s.split(), "sorry, i did not understand that.")
    raise ValueError(f"unknown intent {intent!r}: one of {INTENTS}")


def vocabulary() -> list[str]:
    """Every word of the domain's requests and answers (out-of-domain sentences aside)."""
    words: set[str] = set(NAMES) | set(COLORS) | set(ANIMALS) | set(FOODS) | set(WORDS)
    words |= {c for w in WORDS for c in w}
    words |= set(_ONES) | set(_TEENS) | set(_TENS[2:]) | {"hundred"}
    for p in PHRASES:
        words |= set(p.split())
    for a in ACKS:
        words |= set(a.split())
    fixed = [
        "hello",
        "hi",
        "hey",
        "there",
        "good",
        "morning",
        "evening",
        "my",
        "name",
        "is",
        "i",
        "am",
        "call",
        "me",
        "what",
        "do",
        "you",
        "remember",
        "who",
        "the",
        "number",
        "please",
        "tell",
        "was",
        "favorite",
        "color",
        "animal",
        "food",
        "plus",
        "minus",
        "times",
        "count",
        "to",
        "spell",
        "how",
        "repeat",
        "after",
        "say",
        "nice",
        "meet",
        "your",
        "not",
        "know",
        "yet",
        "okay",
        "have",
        "told",
        "a",
        "got",
        "it",
        "sorry",
        "did",
        "understand",
        "that",
        "can",
        "help",
    ]
    words |= set(fixed)
    return sorted(words)
