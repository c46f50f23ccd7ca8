"""Noun phrases for :mod:`align.english`: the noun and adjective pools, determiners, and the people,
animals and things that become subjects and objects, with the place phrases that follow them.

A subject is (tokens, agreement, subject pronoun, possessive, object pronoun, kind): agreement is "I",
"P" (you, we, they and plurals) or "S" (third person singular), kind "p" for people, "a" for animals,
"t" for things. Nouns are grouped by kind, so that a cat chases a mouse and a teacher reads a story.
"""

from __future__ import annotations

import random

from align import english_words as W
from align.english_forms import nouns as _nouns
from align.english_forms import pool as _pool

_FEMALE, _MALE = _nouns(W.PEOPLE_F, W.A_LIVING + W.A_PEOPLE), _nouns(W.PEOPLE_M, W.A_LIVING + W.A_PEOPLE)
_NEUTRAL = _nouns(W.PEOPLE_N, W.A_LIVING + W.A_PEOPLE)
_PEOPLE = (_FEMALE, _MALE, _NEUTRAL, _NEUTRAL)
# (nouns, gender: 0 female, 1 male, 2 either, takes a possessive)
_PEOPLE_KINDS = ((_FEMALE, 0, False), (_MALE, 1, False)) + ((_NEUTRAL, 2, False),) * 4 + (
    (_nouns(W.PARENTS_F, W.A_LIVING, False), 0, True), (_nouns(W.PARENTS_M, W.A_LIVING, False), 1, True),
    (_nouns(W.SIBLINGS_F, W.A_LIVING), 0, True), (_nouns(W.SIBLINGS_M, W.A_LIVING), 1, True))
_FAMILY, JOBS = _nouns(W.FAMILY, (), plurals=False), _nouns(W.JOBS, ())
ANIMALS = _nouns(W.ANIMALS, W.A_LIVING + W.A_ANIMALS + W.COLORS)
SMALL = _nouns(W.SMALL_THINGS, W.A_THINGS + W.COLORS)
LARGE = _nouns(W.LARGE_THINGS, W.A_THINGS + W.COLORS)
FOOD = _nouns(W.FOODS, W.A_FOOD)
_FOOD_MASS = _nouns(W.FOOD_MASS, [a for a in W.A_FOOD if a not in ("big", "small", "tiny", "huge")], False)
_DRINKS, _CONTAINERS = _pool(W.DRINKS), _pool(W.CONTAINERS)
PLACES_IN, PLACES_AT = _nouns(W.PLACES_IN, W.A_PLACES), _nouns(W.PLACES_AT, W.A_PLACES, plurals=False)
SURFACES, OPENABLE, TRAVEL = _pool(W.SURFACES), _pool(W.OPENABLE), _pool(W.TRAVEL)
TELLABLE, PROBLEMS = _nouns(W.TELLABLE, W.A_IDEAS), _nouns(W.PROBLEMS, W.A_IDEAS)
EVENTS, PRIZES = _nouns(W.EVENTS, W.A_IDEAS), _nouns(W.PRIZES, W.A_IDEAS)
IDEAS = _nouns(W.IDEAS, W.A_IDEAS)
TIMES = _nouns(W.TIMES + W.SEASONS, [*W.A_WEATHER, "lovely", "beautiful", "busy", "long"], plurals=False)
_NAMES = (_pool(W.NAMES_F), _pool(W.NAMES_M))
CITIES = _pool(W.CITIES)
_COUNTRIES = _pool(dict.fromkeys(country for _, country in W.CITIES))
PLACE_NAMES = (*_pool(c for c, _ in W.CITIES), *_COUNTRIES)
NUMBERS = _pool(W.NUMBERS)
PRED_LIVING = _pool(W.A_LIVING + W.A_PEOPLE + W.A_PREDICATIVE)
PRED_ANIMAL = _pool(W.A_LIVING + W.A_ANIMALS + W.A_PREDICATIVE)
WEATHER = _pool(W.A_WEATHER)
COMPARATIVES = _pool(p.split(":")[1] for p in W.COMPARATIVES)

# (word, agreement, subject pronoun, possessive, object pronoun)
PRONOUNS = (("I", "I", "I", "my", "me"), ("you", "P", "you", "your", "you"), ("he", "S", "he", "his", "him"),
            ("she", "S", "she", "her", "her"), ("we", "P", "we", "our", "us"),
            ("they", "P", "they", "their", "them"))
_SUBJECT_PRONOUN = {p[2]: p for p in PRONOUNS} | {"it": ("it", "S", "it", "its", "it")}
# Mostly "the" and "a", now and then a possessive ("~": the subject's own, so "Tom lost his key") or a
# demonstrative; "#" is a number.
_DET_SING = ("the",) * 9 + ("a",) * 6 + ("~",) * 4 + ("this", "that")
_DET_PLURAL = ("the",) * 6 + ("",) * 3 + ("#",) * 3 + ("some", "many", "these", "those", "~", "~")
_POSSESSIVES = ("my", "your", "his", "her", "our", "their")


def _det(rng: random.Random, is_plural: bool, poss: str | None) -> str:
    det = rng.choice(_DET_PLURAL if is_plural else _DET_SING)
    if det == "~":
        return poss or rng.choice(_POSSESSIVES)
    return rng.choice(NUMBERS) if det == "#" else det


def noun_phrase(rng: random.Random, kind: tuple, is_plural: bool | None = None, det: str | None = None,
                adj: float = 0.35, poss: str | None = None) -> list[str]:
    """A determiner, now and then an adjective, and a noun of ``kind`` (singular forms, plural forms,
    adjectives): "the old boat", "three cats". ``det`` fixes the determiner ("" for none); ``poss`` is the
    subject's possessive, used when the determiner drawn is a possessive."""
    singular, plurals, adjectives = kind
    if is_plural is None:
        is_plural = plurals is not singular and rng.random() < 0.3
    i = rng.randrange(len(singular))
    out = [det if det is not None else _det(rng, is_plural, poss)]
    if adjectives and rng.random() < adj:
        out.append(rng.choice(adjectives))
    out.append(plurals[i] if is_plural else singular[i])
    return out if out[0] else out[1:]


def _people(rng: random.Random, kind: tuple, is_plural: bool | None = None, poss: str | None = None):
    """People: "the queen", "a doctor", "their teachers"; only some nouns take a possessive ("our man")."""
    if kind is _NEUTRAL:
        return noun_phrase(rng, kind, is_plural, poss=poss)
    if is_plural is None:
        is_plural = rng.random() < 0.3
    det = rng.choice(_DET_PEOPLE_PLURAL if is_plural else _DET_PEOPLE)
    return noun_phrase(rng, kind, is_plural, det=det)


_DET_PEOPLE = ("the",) * 5 + ("a",) * 3 + ("this", "that")
_DET_PEOPLE_PLURAL = ("the", "the", "the", "some", "many", "", "two", "three", "four")


def _name(rng: random.Random) -> tuple[str, int]:
    female = rng.random() < 0.5
    return rng.choice(_NAMES[0] if female else _NAMES[1]), female


def person_subject(rng: random.Random) -> tuple:
    """A person as subject: a name, a pronoun, two names, or "the queen", "my brother", "some doctors"."""
    r = rng.random()
    if r < 0.3:
        name, female = _name(rng)
        return ([name], "S", *(("she", "her", "her") if female else ("he", "his", "him")), "p")
    if r < 0.5:
        return pronoun_subject(rng.choice(PRONOUNS))
    if r < 0.55:
        first, second = _name(rng)[0], _name(rng)[0]
        while second == first:
            second = _name(rng)[0]
        return ([first, "and", second], "P", "they", "their", "them", "p")
    kind, gender, family = rng.choice(_PEOPLE_KINDS)
    is_plural = kind[1] is not kind[0] and rng.random() < 0.3
    if family:
        tokens = noun_phrase(rng, kind, is_plural, det=rng.choice(_POSSESSIVES))
    else:
        tokens = _people(rng, kind, is_plural)
    if is_plural:
        return (tokens, "P", "they", "their", "them", "p")
    if gender == 2:
        gender = rng.randrange(2)
    return (tokens, "S", *(("she", "her", "her") if gender == 0 else ("he", "his", "him")), "p")


def pronoun_subject(p: tuple) -> tuple:
    """The subject made from one row of ``PRONOUNS``."""
    return ([p[0]], p[1], p[2], p[3], p[4], "p")


def animal_subject(rng: random.Random) -> tuple:
    """An animal as subject: "the dog", "three brown cats"."""
    is_plural = rng.random() < 0.3
    tokens = noun_phrase(rng, ANIMALS, is_plural)
    return (tokens, "P", "they", "their", "them", "a") if is_plural else (tokens, "S", "it", "its", "it", "a")


def _thing(rng: random.Random) -> tuple:
    is_plural = rng.random() < 0.3
    tokens = noun_phrase(rng, SMALL, is_plural)
    return (tokens, "P", "they", "their", "them", "t") if is_plural else (tokens, "S", "it", "its", "it", "t")


def referring_pronoun(subject: tuple) -> tuple:
    """The subject pronoun that refers back to a subject: "Tom was tired, so he went home"."""
    p = _SUBJECT_PRONOUN[subject[2]]
    return ([p[0]], p[1], p[2], p[3], p[4], subject[5])


def person_object(rng: random.Random, subject: tuple) -> list[str]:
    """A person as an object, never the subject itself ("I saw me")."""
    r = rng.random()
    if r < 0.25:
        return [_name(rng)[0]]
    if r < 0.45:
        pronoun = rng.choice(PRONOUNS)[4]
        return [pronoun] if pronoun != subject[4] else [_name(rng)[0]]
    if r < 0.75:
        det = subject[3] if subject[5] == "p" else rng.choice(_POSSESSIVES)  # not "the cat bit its son"
        family = noun_phrase(rng, _FAMILY, False, det=det)
        return family if family != subject[0] else [_name(rng)[0]]
    return _people(rng, rng.choice(_PEOPLE), poss=subject[3])


def food_object(rng: random.Random, subject: tuple) -> list[str]:
    """Something to eat: "an apple", "her sandwiches", "some rice"."""
    if rng.random() < 0.6:
        return noun_phrase(rng, FOOD, poss=subject[3])
    return noun_phrase(rng, _FOOD_MASS, False, det=rng.choice(("some", "the", "", "")))


def drink_object(rng: random.Random, subject: tuple) -> list[str]:
    """Something to drink: "a cup of tea", "some water"."""
    if rng.random() < 0.4:
        return [rng.choice(("a", "a", "the", subject[3])), rng.choice(_CONTAINERS), "of", rng.choice(_DRINKS)]
    det = rng.choice(("some", "the", "", subject[3]))
    return [det, rng.choice(_DRINKS)] if det else [rng.choice(_DRINKS)]


def place_object(rng: random.Random, subject: tuple) -> list[str]:
    """A place as an object: "the kitchen", "a library", "their gardens"."""
    if rng.random() < 0.1:
        return noun_phrase(rng, PLACES_IN, True, det=rng.choice(("the", subject[3])))
    return noun_phrase(rng, PLACES_IN, False, det=rng.choice(("the", "the", "a", subject[3])))


def place_name_object(rng: random.Random, subject: tuple) -> list[str]:
    """A city or country as an object."""
    return [rng.choice(PLACE_NAMES)]


def place_phrase(rng: random.Random) -> list[str]:
    """Where: "in the kitchen", "under the table", "near the old bridge", "in Paris", "at home"."""
    r = rng.random()
    if r < 0.3:
        return ["in", *noun_phrase(rng, PLACES_IN, False, det="the")]
    if r < 0.45:
        return ["at", *noun_phrase(rng, PLACES_AT, False, det="the", adj=0.1)]
    if r < 0.7:
        return [rng.choice(("on", "under", "on", "under", "near", "beside")), "the", rng.choice(SURFACES)]
    if r < 0.85:
        prep = rng.choice(("near", "behind", "beside", "next to", "in front of"))
        return [prep, *noun_phrase(rng, LARGE, False, det="the", adj=0.2)]
    if r < 0.93:
        return ["in", rng.choice(PLACE_NAMES)]
    return [rng.choice(("at home", "at school", "at work", "outside", "inside", "upstairs", "downstairs"))]


def any_subject(rng: random.Random) -> tuple:
    """A subject: a person, an animal or (least often) a thing."""
    r = rng.random()
    return person_subject(rng) if r < 0.65 else animal_subject(rng) if r < 0.88 else _thing(rng)
