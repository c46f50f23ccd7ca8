"""Verbs and clauses for :mod:`align.english`: tenses and agreement, the verb pools, predicates that
suit their subject, verb groups, time phrases that agree with the tense, and the clauses built from them.
"""

from __future__ import annotations

import random

from align import english_words as W
from align.english_forms import ing
from align.english_forms import nouns as _nouns
from align.english_forms import pool as _pool
from align.english_forms import verbs as _verbs
from align.english_nouns import (
    ANIMALS,
    EVENTS,
    IDEAS,
    JOBS,
    LARGE,
    PRED_ANIMAL,
    PRED_LIVING,
    PRIZES,
    PROBLEMS,
    SMALL,
    TELLABLE,
    drink_object,
    food_object,
    noun_phrase,
    person_object,
    place_name_object,
    place_object,
    place_phrase,
)

# A verb is (base, third person, past, -ing, stative), as align.english_forms.verbs makes it.
INTRANS, _ANIMAL_INTRANS, _THING_INTRANS = (_verbs(W.INTRANSITIVE), _verbs(W.ANIMAL_INTRANSITIVE),
                                            _verbs(W.THING_INTRANSITIVE))
NATURE = tuple((_pool([subject])[0], _verbs([verb])[0]) for subject, verb in W.NATURE)
SOUNDS = tuple((_nouns([animal], W.A_LIVING + W.A_ANIMALS), _verbs([verb])[0])
               for animal, verb in W.ANIMAL_SOUNDS)
HOBBIES = _pool(ing(v) for v in W.HOBBIES)
GO, LIVE, WEATHER_VERBS = _verbs(["go"])[0], _verbs(["live", "work"]), _verbs(["rain", "snow"])
WANT = _verbs(["want", "need", "like", "love", "hate", "try", "plan", "hope"], progressive=False)
ENJOY = _verbs(["like", "love", "hate", "enjoy"], progressive=False)
_DITRANS = tuple((_verbs([v])[0], prep, kinds) for v, prep, kinds in W.DITRANSITIVE)
MANNER, FREQUENCY, DEGREE = _pool(W.MANNER), _pool(W.FREQUENCY), _pool(W.DEGREE)
MANNER_SET = frozenset(MANNER)  # membership tests only

PRES, PAST, FUT, PROG, PASTPROG, MODAL = range(6)
TENSES = (PAST,) * 8 + (PRES,) * 6 + (FUT,) * 2 + (PROG,) * 2 + (PASTPROG, MODAL, MODAL)
_DAYS, _MONTHS, _WEEKLY = _pool(W.DAYS), _pool(W.MONTHS), _pool(d + "s" for d in W.DAYS)
# Time phrases by tense, so "yesterday" never meets "will".
_WHEN = {PAST: _pool(W.WHEN_PAST), PASTPROG: _pool(W.WHEN_PAST), PRES: _pool(W.WHEN_PRESENT),
         FUT: _pool(W.WHEN_FUTURE), PROG: _pool(W.WHEN_NOW), MODAL: _pool(W.WHEN_FUTURE)}
_MODALS = (("can", "cannot"), ("can", "can't"), ("could", "couldn't"), ("should", "shouldn't"),
           ("might", "might not"), ("must", "must not"))
# Agreement classes: "I" (am, was), "P" for you/we/they and plurals (are, were), "S" third singular.
BE = {("I", PRES): "am", ("P", PRES): "are", ("S", PRES): "is",
      ("I", PAST): "was", ("P", PAST): "were", ("S", PAST): "was"}
_BE_NOT = {"are": "aren't", "is": "isn't", "was": "wasn't", "were": "weren't"}


def time_phrase(rng: random.Random, tense: int) -> list[str]:
    """When it happens, in words that suit the tense: "yesterday", "on Mondays", "next Friday"."""
    if rng.random() < 0.7:
        return [rng.choice(_WHEN[tense])]
    if tense in (PRES, PROG):
        return ["on", rng.choice(_WEEKLY)] if tense == PRES else ["today"]
    if rng.random() < 0.5:
        return ["in", rng.choice(_MONTHS)]
    when = "last" if tense in (PAST, PASTPROG) else "next" if tense == FUT else "on"
    return [rng.choice((when, "on")), rng.choice(_DAYS)]


# ------------------------------------------------------------------------------------- verb phrases
# Objects by kind: (verbs, object maker, may take a place phrase); repeated entries weight the choice.
def _obj(kind: tuple):
    return lambda rng, subject: noun_phrase(rng, kind, poss=subject[3])


PERSON_OBJECTS = ((_verbs(W.T_THINGS), _obj(SMALL), True),) * 4 + (
    (_verbs(W.T_LARGE), _obj(LARGE), True), (_verbs(W.T_FOOD), food_object, True),
    (_verbs(W.T_FOOD), food_object, True), (_verbs(W.T_DRINK), drink_object, True),
    (_verbs(W.T_PEOPLE), person_object, True), (_verbs(W.T_PEOPLE), person_object, True),
    (_verbs(W.T_ANIMALS), _obj(ANIMALS), True),
    (_verbs(W.T_TELLABLE), _obj(TELLABLE), True), (_verbs(W.T_PROBLEMS), _obj(PROBLEMS), True),
    (_verbs(W.T_EVENTS), _obj(EVENTS), True), (_verbs(W.T_PRIZES), _obj(PRIZES), True),
    (_verbs(W.T_IDEAS), _obj(IDEAS), True), (_verbs(W.T_PLACES), place_object, False),
    (_verbs(W.T_PLACE_NAMES), place_name_object, False))
_ANIMAL_OBJECTS = ((_verbs(W.ANIMAL_T), _obj(ANIMALS), True), (_verbs(W.ANIMAL_T), person_object, True),
                   (_verbs(W.ANIMAL_T_THINGS), _obj(SMALL), True),
                   (_verbs(["eat", "find", "smell"]), food_object, True))
_DITRANS_OBJECTS = {"t": _obj(SMALL), "f": food_object, "s": _obj(TELLABLE)}


def predicate(rng: random.Random, subject: tuple) -> tuple[tuple, list[str]]:
    """A verb that suits the subject, and what follows it."""
    kind, r, where = subject[5], rng.random(), True
    if kind == "t":
        verb, tail = rng.choice(_THING_INTRANS), []
    elif r < 0.3:
        verb, tail = rng.choice(INTRANS if kind == "p" else _ANIMAL_INTRANS), []
        if rng.random() < 0.15:  # "Anna played with her brother."
            if kind == "p":
                tail = ["with", *person_object(rng, subject)]
            else:
                tail = ["with", *noun_phrase(rng, ANIMALS, poss=subject[3])]
    elif kind == "a":
        verbs, make, where = rng.choice(_ANIMAL_OBJECTS)
        verb, tail = rng.choice(verbs), make(rng, subject)
    elif r < 0.4:
        verb, prep, kinds = rng.choice(_DITRANS)
        thing, person = _DITRANS_OBJECTS[rng.choice(kinds)](rng, subject), person_object(rng, subject)
        tail = person + thing if rng.random() < 0.5 else [*thing, prep, *person]
    else:
        verbs, make, where = rng.choice(PERSON_OBJECTS)
        verb, tail = rng.choice(verbs), make(rng, subject)
    if kind != "t" and not verb[4] and rng.random() < 0.2:  # not "liked the cat quietly"
        tail = [*tail, rng.choice(MANNER)]
    if where and rng.random() < (0.2 if tail else 0.45):
        tail = tail + place_phrase(rng)
    return verb, tail


def _fit(verb: tuple, tense: int) -> int:
    """State verbs take no progressive or modal: "Tom knows", never "Tom is knowing" or "can want"."""
    if verb[4] and tense in (PROG, PASTPROG, MODAL):
        return PAST if tense == PASTPROG else PRES
    return tense


def action_predicate(rng: random.Random, subject: tuple) -> tuple[tuple, list[str]]:
    """A predicate whose verb is an action, for "wants to ...", "is going to ..." and imperatives."""
    verb, tail = predicate(rng, subject)
    while verb[4]:
        verb, tail = predicate(rng, subject)
    return verb, tail


def verb_group(rng: random.Random, subject: tuple, verb: tuple, tense: int, neg: bool = False) -> list[str]:
    """The verb group, agreeing with the subject: "sleeps", "did not see", "will be", "is running"."""
    agr, tense = subject[1], _fit(verb, tense)
    short = rng.random() < 0.5
    if tense == PRES:
        if neg:
            do = "does" if agr == "S" else "do"
            return [do + "n't", verb[0]] if short else [do, "not", verb[0]]
        adverb = [rng.choice(FREQUENCY)] if rng.random() < 0.15 else []
        return [*adverb, verb[1] if agr == "S" else verb[0]]
    if tense == PAST:
        if neg:
            return ["didn't", verb[0]] if short else ["did", "not", verb[0]]
        return [verb[2]]
    if tense == FUT:
        return (["won't"] if short else ["will", "not"]) + [verb[0]] if neg else ["will", verb[0]]
    if tense == MODAL:
        modal = rng.choice(_MODALS)
        return [modal[1], verb[0]] if neg else [modal[0], verb[0]]
    be = BE[agr, PRES if tense == PROG else PAST]
    if neg:
        return [_BE_NOT[be], verb[3]] if short and be != "am" else [be, "not", verb[3]]
    return [be, verb[3]]


def _clause(rng: random.Random, subject: tuple, tense: int, neg: bool = False) -> list[str]:
    verb, tail = predicate(rng, subject)
    tense = _fit(verb, tense)
    when = time_phrase(rng, tense) if rng.random() < 0.3 else []
    return subject[0] + verb_group(rng, subject, verb, tense, neg) + tail + when


def _be_clause(rng: random.Random, subject: tuple, tense: int, neg: bool = False) -> list[str]:
    """"The soup was very hot.", "My aunt is a pilot.", "The dog is not in the garden."""
    tense = rng.choice((PRES, PAST, FUT)) if tense not in (PRES, PAST) else tense
    if tense == FUT:
        be = ["won't", "be"] if neg else ["will", "be"]
    else:
        be = BE[subject[1], tense]
        be = ([_BE_NOT[be]] if be != "am" and rng.random() < 0.5 else [be, "not"]) if neg else [be]
    r, kind = rng.random(), subject[5]
    if r < 0.2:
        return subject[0] + be + place_phrase(rng)
    if r < 0.35 and kind == "p":
        job = noun_phrase(rng, JOBS, subject[1] == "P", det="" if subject[1] == "P" else "a")
        return subject[0] + be + job
    adjectives = PRED_LIVING if kind == "p" else PRED_ANIMAL if kind == "a" else SMALL[2]
    degree = [rng.choice(DEGREE)] if rng.random() < 0.3 else []
    return subject[0] + be + degree + [rng.choice(adjectives)]


def any_clause(rng: random.Random, subject: tuple, tense: int) -> list[str]:
    """A clause with a verb, or now and then one with "be"; either may be negated."""
    if rng.random() < 0.3:
        return _be_clause(rng, subject, tense, rng.random() < 0.15)
    return _clause(rng, subject, tense, rng.random() < 0.12)


def question_verbs(rng: random.Random, subject: tuple, verb: tuple, tense: int) -> tuple[str, str]:
    """Question word order: ("does", "sleep"), ("is", "sleeping"), ("can", "swim")."""
    tense = _fit(verb, tense)
    if tense == PROG:
        return BE[subject[1], PRES], verb[3]
    if tense in (PAST, PASTPROG):
        return "did", verb[0]
    if tense == FUT:
        return "will", verb[0]
    if tense == MODAL:
        return rng.choice(("can", "could", "should")), verb[0]
    return ("does" if subject[1] == "S" else "do"), verb[0]
