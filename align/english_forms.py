"""Word forms and word frequency for :mod:`align.english`: inflection, the registry of every form the
generator can emit (``VOCAB``), and the skewed draw that makes common words common.

Inflection is by rule, with the irregular and tricky forms listed in :mod:`align.english_words`.
"""

from __future__ import annotations

import random
import re

from align import english_words as W

# ---------------------------------------------------------------------------------------- inflection

_IRREGULAR_PLURAL = dict(p.split(":") for p in W.IRREGULAR_PLURALS)
_IRREGULAR_PAST = dict(p.split(":") for p in W.IRREGULAR_PAST)
_DOUBLING = frozenset(W.DOUBLING)
_SIBILANT = ("s", "x", "z", "ch", "sh")


def _consonant_y(word: str) -> bool:
    return word.endswith("y") and word[-2] not in "aeiou"


def plural(noun: str) -> str:
    """Plural of a noun: box -> boxes, city -> cities, child -> children."""
    if noun in _IRREGULAR_PLURAL:
        return _IRREGULAR_PLURAL[noun]
    if noun.endswith(_SIBILANT):
        return noun + "es"
    return noun[:-1] + "ies" if _consonant_y(noun) else noun + "s"


def third(verb: str) -> str:
    """Third person singular present: carry -> carries, watch -> watches, go -> goes."""
    if verb == "have":
        return "has"
    if verb.endswith(_SIBILANT) or (verb.endswith("o") and verb[-2] not in "aeiou"):
        return verb + "es"
    return verb[:-1] + "ies" if _consonant_y(verb) else verb + "s"


def past(verb: str) -> str:
    """Simple past: go -> went, stop -> stopped, carry -> carried, smile -> smiled."""
    if verb in _IRREGULAR_PAST:
        return _IRREGULAR_PAST[verb]
    if verb.endswith("e"):
        return verb + "d"
    if _consonant_y(verb):
        return verb[:-1] + "ied"
    return verb + verb[-1] + "ed" if verb in _DOUBLING else verb + "ed"


def ing(verb: str) -> str:
    """Present participle: run -> running, make -> making, see -> seeing, tie -> tying."""
    if verb.endswith("ie"):
        return verb[:-2] + "ying"
    if verb.endswith("e") and not verb.endswith(("ee", "ye", "oe")) and verb != "be":
        return verb[:-1] + "ing"
    return verb + verb[-1] + "ing" if verb in _DOUBLING else verb + "ing"


# ------------------------------------------------------------------------------------- word pools
# Every pool the generator draws from is registered here, so VOCABULARY is exactly what it can emit.

VOCAB: set[str] = set()
"""Every word form registered by :func:`pool` (and so drawable by the grammar)."""
_STATIVE = frozenset(W.STATIVE)


def pool(items) -> tuple:
    items = tuple(items)
    for item in items:
        VOCAB.update(words(" ".join(item) if isinstance(item, tuple) else item))
    return items


def verbs(lemmas, progressive: bool = True) -> tuple:
    """(base, third person, past, -ing, stative) per verb; -ing forms only where they can be used."""
    out = tuple((v, third(v), past(v), ing(v), v in _STATIVE) for v in dict.fromkeys(lemmas))
    pool(f[:4] if progressive and not f[4] else f[:3] for f in out)
    return out


def nouns(lemmas, adjectives, plurals=True) -> tuple:
    """(singular forms, plural forms, adjectives), indexed together."""
    lemmas = tuple(dict.fromkeys(lemmas))
    return (pool(lemmas), pool(plural(n) for n in lemmas) if plurals else lemmas, pool(adjectives))


def words(text: str) -> list[str]:
    """The lower-cased words of a text: runs of letters and apostrophes."""
    return re.findall(r"[a-z']+", text.lower())


class Zipfian:
    """Draws from ``rng`` with word choices skewed as in natural text: in a list of more than
    ``_FLAT_UP_TO`` items, ranked shortest first (short words are the common ones), item ``i`` of ``n`` is
    drawn with probability falling off roughly as a power of ``i``. Every word still occurs, but a small
    model sees the common ones often enough to learn them; short lists (grammatical choices) stay uniform."""

    def __init__(self, rng: random.Random):
        self._rng = rng
        self.random, self.randint = rng.random, rng.randint

    def __getattr__(self, name):
        return getattr(self._rng, name)

    def randrange(self, n: int) -> int:
        """An index into a list of ``n`` words, skewed towards its start (lists put common words first)."""
        return self._rng.randrange(n) if n <= _FLAT_UP_TO else int(n * self._rng.random() ** _SKEW)

    def choice(self, items):
        if len(items) <= _FLAT_UP_TO:
            return self._rng.choice(items)
        ranked = _RANKED.get(id(items))
        if ranked is None or ranked[0] is not items:
            words_only = all(_rank_key(item) is not None for item in items)
            ranked = _RANKED[id(items)] = (items, sorted(items, key=_rank_key) if words_only else None)
        if ranked[1] is None:  # not words: sentence patterns and the like
            return self._rng.choice(items)
        return ranked[1][int(len(items) * self._rng.random() ** _SKEW)]


_FLAT_UP_TO = 12
_SKEW = 2.5
"""A fraction q of the draws falls on the first q ** (1 / _SKEW) of a ranked list: 40% on its top tenth."""
_RANKED: dict[int, tuple] = {}


def _rank_key(item) -> tuple[int, str] | None:
    """(length, text) of a word, or of the first word in a tuple of forms; None for anything else."""
    while isinstance(item, tuple):
        item = next((part for part in item if isinstance(part, (str, tuple))), None)
    return (len(item), item) if isinstance(item, str) else None
