"""Simple English sentences for the pretraining corpus of the built-in tiny model.

The built-in model (:mod:`align.tiny`) is pretrained on generated text so that demos and tests need no
model hub or data download. This module generates the plain-English part of that text, so the model can
write simple, grammatical English as well as answer its number questions. It uses only the standard
library and word lists written in :mod:`align.english_words` (a few thousand word forms).

Scope of the grammar: declaratives in the present, past, future, progressive and with modals, with
subject-verb agreement and the right "a"/"an"; adjectives, adverbs, prepositional and time phrases that
agree with the tense; negation (with and without contractions); compound sentences with "and", "but",
"so", "because" and "when"; yes/no and wh- questions; imperatives and exclamations; numbers as words.
Nouns and verbs are grouped by kind so that a cat chases a mouse and a teacher reads a story, rather
than the other way round. Inflection and word frequency live in :mod:`align.english_forms`.

Output is a pure function of the ``random.Random`` state: choices are made from tuples only, never from
sets, whose order changes between processes with hash randomisation.
"""

from __future__ import annotations

import random

from align import english_words as W
from align.english_forms import VOCAB, Zipfian, ing, past, plural, third, words
from align.english_forms import nouns as _nouns
from align.english_forms import pool as _pool
from align.english_forms import verbs as _verbs

__all__ = ["VOCABULARY", "ing", "paragraph", "past", "plural", "sentence", "third", "words"]

_FEMALE, _MALE = _nouns(W.PEOPLE_F, W.A_LIVING + W.A_PEOPLE), _nouns(W.PEOPLE_M, W.A_LIVING + W.A_PEOPLE)
_NEUTRAL = _nouns(W.PEOPLE_N, W.A_LIVING + W.A_PEOPLE)
_PEOPLE = (_FEMALE, _MALE, _NEUTRAL, _NEUTRAL)
# (nouns, gender: 0 female, 1 male, 2 either, takes a possessive)
_PEOPLE_KINDS = ((_FEMALE, 0, False), (_MALE, 1, False)) + ((_NEUTRAL, 2, False),) * 4 + (
    (_nouns(W.PARENTS_F, W.A_LIVING, False), 0, True), (_nouns(W.PARENTS_M, W.A_LIVING, False), 1, True),
    (_nouns(W.SIBLINGS_F, W.A_LIVING), 0, True), (_nouns(W.SIBLINGS_M, W.A_LIVING), 1, True))
_FAMILY, _JOBS = _nouns(W.FAMILY, (), plurals=False), _nouns(W.JOBS, ())
_ANIMALS = _nouns(W.ANIMALS, W.A_LIVING + W.A_ANIMALS + W.COLORS)
_SMALL = _nouns(W.SMALL_THINGS, W.A_THINGS + W.COLORS)
_LARGE = _nouns(W.LARGE_THINGS, W.A_THINGS + W.COLORS)
_FOOD = _nouns(W.FOODS, W.A_FOOD)
_FOOD_MASS = _nouns(W.FOOD_MASS, [a for a in W.A_FOOD if a not in ("big", "small", "tiny", "huge")], False)
_DRINKS, _CONTAINERS = _pool(W.DRINKS), _pool(W.CONTAINERS)
_PLACES_IN, _PLACES_AT = _nouns(W.PLACES_IN, W.A_PLACES), _nouns(W.PLACES_AT, W.A_PLACES, plurals=False)
_SURFACES, _OPENABLE, _TRAVEL = _pool(W.SURFACES), _pool(W.OPENABLE), _pool(W.TRAVEL)
_TELLABLE, _PROBLEMS = _nouns(W.TELLABLE, W.A_IDEAS), _nouns(W.PROBLEMS, W.A_IDEAS)
_EVENTS, _PRIZES = _nouns(W.EVENTS, W.A_IDEAS), _nouns(W.PRIZES, W.A_IDEAS)
_IDEAS = _nouns(W.IDEAS, W.A_IDEAS)
_TIMES = _nouns(W.TIMES + W.SEASONS, W.A_WEATHER + ["lovely", "beautiful", "busy", "long"], plurals=False)
_NAMES = (_pool(W.NAMES_F), _pool(W.NAMES_M))
_CITIES = _pool(W.CITIES)
_COUNTRIES = _pool(dict.fromkeys(country for _, country in W.CITIES))
_PLACE_NAMES = _pool(c for c, _ in W.CITIES) + _COUNTRIES
_DAYS, _MONTHS, _WEEKLY = _pool(W.DAYS), _pool(W.MONTHS), _pool(d + "s" for d in W.DAYS)
_NUMBERS = _pool(W.NUMBERS)
_MANNER, _FREQUENCY, _DEGREE = _pool(W.MANNER), _pool(W.FREQUENCY), _pool(W.DEGREE)
_MANNER_SET = frozenset(_MANNER)  # membership tests only
_PRED_LIVING = _pool(W.A_LIVING + W.A_PEOPLE + W.A_PREDICATIVE)
_PRED_ANIMAL = _pool(W.A_LIVING + W.A_ANIMALS + W.A_PREDICATIVE)
_WEATHER = _pool(W.A_WEATHER)
_COMPARATIVES = _pool(p.split(":")[1] for p in W.COMPARATIVES)

_INTRANS, _ANIMAL_INTRANS, _THING_INTRANS = (_verbs(W.INTRANSITIVE), _verbs(W.ANIMAL_INTRANSITIVE),
                                             _verbs(W.THING_INTRANSITIVE))
_NATURE = tuple((_pool([subject])[0], _verbs([verb])[0]) for subject, verb in W.NATURE)
_SOUNDS = tuple((_nouns([animal], W.A_LIVING + W.A_ANIMALS), _verbs([verb])[0])
                for animal, verb in W.ANIMAL_SOUNDS)
_HOBBIES = _pool(ing(v) for v in W.HOBBIES)
_GO, _LIVE, _WEATHER_VERBS = _verbs(["go"])[0], _verbs(["live", "work"]), _verbs(["rain", "snow"])
_WANT = _verbs(["want", "need", "like", "love", "hate", "try", "plan", "hope"], progressive=False)
_ENJOY = _verbs(["like", "love", "hate", "enjoy"], progressive=False)
_DITRANS = tuple((_verbs([v])[0], prep, kinds) for v, prep, kinds in W.DITRANSITIVE)

# Words the templates spell out themselves.
VOCAB.update(words("""a an the this that these those my your his her its our their some many every
I you he she it we they me him us them who what where when why how which and but so because than
of to for in at on under near behind beside next front by with not don't doesn't didn't won't isn't
aren't wasn't weren't can't cannot couldn't shouldn't am is are was were will can could should might
must be do does did has have had there please let's look put open close one years old color city famous
beautiful busy lovely going last next home school work outside inside upstairs downstairs"""))

PRES, PAST, FUT, PROG, PASTPROG, MODAL = range(6)
_TENSES = (PAST,) * 8 + (PRES,) * 6 + (FUT,) * 2 + (PROG,) * 2 + (PASTPROG, MODAL, MODAL)
# Time phrases by tense, so "yesterday" never meets "will".
_WHEN = {PAST: _pool(W.WHEN_PAST), PASTPROG: _pool(W.WHEN_PAST), PRES: _pool(W.WHEN_PRESENT),
         FUT: _pool(W.WHEN_FUTURE), PROG: _pool(W.WHEN_NOW), MODAL: _pool(W.WHEN_FUTURE)}
_MODALS = (("can", "cannot"), ("can", "can't"), ("could", "couldn't"), ("should", "shouldn't"),
           ("might", "might not"), ("must", "must not"))
# Agreement classes: "I" (am, was), "P" for you/we/they and plurals (are, were), "S" third singular.
_BE = {("I", PRES): "am", ("P", PRES): "are", ("S", PRES): "is",
       ("I", PAST): "was", ("P", PAST): "were", ("S", PAST): "was"}
_BE_NOT = {"are": "aren't", "is": "isn't", "was": "wasn't", "were": "weren't"}

# ---------------------------------------------------------------------------------- noun phrases
# A subject is (tokens, agreement, subject pronoun, possessive, object pronoun, kind), kind being
# "p" for people, "a" for animals, "t" for things.
_PRONOUNS = (("I", "I", "I", "my", "me"), ("you", "P", "you", "your", "you"), ("he", "S", "he", "his", "him"),
             ("she", "S", "she", "her", "her"), ("we", "P", "we", "our", "us"),
             ("they", "P", "they", "their", "them"))
_SUBJECT_PRONOUN = {p[2]: p for p in _PRONOUNS} | {"it": ("it", "S", "it", "its", "it")}
# Mostly "the" and "a", now and then a possessive ("~": the subject's own, so "Tom lost his key") or a
# demonstrative; "#" is a number.
_DET_SING = ("the",) * 9 + ("a",) * 6 + ("~",) * 4 + ("this", "that")
_DET_PLURAL = ("the",) * 6 + ("",) * 3 + ("#",) * 3 + ("some", "many", "these", "those", "~", "~")
_POSSESSIVES = ("my", "your", "his", "her", "our", "their")


def _det(rng: random.Random, is_plural: bool, poss: str | None) -> str:
    det = rng.choice(_DET_PLURAL if is_plural else _DET_SING)
    if det == "~":
        return poss or rng.choice(_POSSESSIVES)
    return rng.choice(_NUMBERS) if det == "#" else det


def _np(rng: random.Random, kind: tuple, is_plural: bool | None = None, det: str | None = None,
        adj: float = 0.35, poss: str | None = None) -> list[str]:
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
        return _np(rng, kind, is_plural, poss=poss)
    if is_plural is None:
        is_plural = rng.random() < 0.3
    return _np(rng, kind, is_plural, det=rng.choice(_DET_PEOPLE_PLURAL if is_plural else _DET_PEOPLE))


_DET_PEOPLE = ("the",) * 5 + ("a",) * 3 + ("this", "that")
_DET_PEOPLE_PLURAL = ("the", "the", "the", "some", "many", "", "two", "three", "four")


def _name(rng: random.Random) -> tuple[str, int]:
    female = rng.random() < 0.5
    return rng.choice(_NAMES[0] if female else _NAMES[1]), female


def _person(rng: random.Random) -> tuple:
    r = rng.random()
    if r < 0.3:
        name, female = _name(rng)
        return ([name], "S", *(("she", "her", "her") if female else ("he", "his", "him")), "p")
    if r < 0.5:
        return _pronoun_subject(rng.choice(_PRONOUNS))
    if r < 0.55:
        first, second = _name(rng)[0], _name(rng)[0]
        while second == first:
            second = _name(rng)[0]
        return ([first, "and", second], "P", "they", "their", "them", "p")
    kind, gender, family = rng.choice(_PEOPLE_KINDS)
    is_plural = kind[1] is not kind[0] and rng.random() < 0.3
    if family:
        tokens = _np(rng, kind, is_plural, det=rng.choice(_POSSESSIVES))
    else:
        tokens = _people(rng, kind, is_plural)
    if is_plural:
        return (tokens, "P", "they", "their", "them", "p")
    if gender == 2:
        gender = rng.randrange(2)
    return (tokens, "S", *(("she", "her", "her") if gender == 0 else ("he", "his", "him")), "p")


def _pronoun_subject(p: tuple) -> tuple:
    return ([p[0]], p[1], p[2], p[3], p[4], "p")


def _animal(rng: random.Random) -> tuple:
    is_plural = rng.random() < 0.3
    tokens = _np(rng, _ANIMALS, is_plural)
    return (tokens, "P", "they", "their", "them", "a") if is_plural else (tokens, "S", "it", "its", "it", "a")


def _thing(rng: random.Random) -> tuple:
    is_plural = rng.random() < 0.3
    tokens = _np(rng, _SMALL, is_plural)
    return (tokens, "P", "they", "their", "them", "t") if is_plural else (tokens, "S", "it", "its", "it", "t")


def _again(subject: tuple) -> tuple:
    """The subject pronoun that refers back to a subject: "Tom was tired, so he went home"."""
    p = _SUBJECT_PRONOUN[subject[2]]
    return ([p[0]], p[1], p[2], p[3], p[4], subject[5])


def _someone(rng: random.Random, subject: tuple) -> list[str]:
    """A person as an object, never the subject itself ("I saw me")."""
    r = rng.random()
    if r < 0.25:
        return [_name(rng)[0]]
    if r < 0.45:
        pronoun = rng.choice(_PRONOUNS)[4]
        return [pronoun] if pronoun != subject[4] else [_name(rng)[0]]
    if r < 0.75:
        det = subject[3] if subject[5] == "p" else rng.choice(_POSSESSIVES)  # not "the cat bit its son"
        family = _np(rng, _FAMILY, False, det=det)
        return family if family != subject[0] else [_name(rng)[0]]
    return _people(rng, rng.choice(_PEOPLE), poss=subject[3])


def _food(rng: random.Random, subject: tuple) -> list[str]:
    if rng.random() < 0.6:
        return _np(rng, _FOOD, poss=subject[3])
    return _np(rng, _FOOD_MASS, False, det=rng.choice(("some", "the", "", "")))


def _drink(rng: random.Random, subject: tuple) -> list[str]:
    if rng.random() < 0.4:
        return [rng.choice(("a", "a", "the", subject[3])), rng.choice(_CONTAINERS), "of", rng.choice(_DRINKS)]
    det = rng.choice(("some", "the", "", subject[3]))
    return [det, rng.choice(_DRINKS)] if det else [rng.choice(_DRINKS)]


def _place(rng: random.Random, subject: tuple) -> list[str]:
    if rng.random() < 0.1:
        return _np(rng, _PLACES_IN, True, det=rng.choice(("the", subject[3])))
    return _np(rng, _PLACES_IN, False, det=rng.choice(("the", "the", "a", subject[3])))


def _place_name(rng: random.Random, subject: tuple) -> list[str]:
    return [rng.choice(_PLACE_NAMES)]


def _where(rng: random.Random) -> list[str]:
    r = rng.random()
    if r < 0.3:
        return ["in", *_np(rng, _PLACES_IN, False, det="the")]
    if r < 0.45:
        return ["at", *_np(rng, _PLACES_AT, False, det="the", adj=0.1)]
    if r < 0.7:
        return [rng.choice(("on", "under", "on", "under", "near", "beside")), "the", rng.choice(_SURFACES)]
    if r < 0.85:
        prep = rng.choice(("near", "behind", "beside", "next to", "in front of"))
        return [prep, *_np(rng, _LARGE, False, det="the", adj=0.2)]
    if r < 0.93:
        return ["in", rng.choice(_PLACE_NAMES)]
    return [rng.choice(("at home", "at school", "at work", "outside", "inside", "upstairs", "downstairs"))]


def _when(rng: random.Random, tense: int) -> list[str]:
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
    return lambda rng, subject: _np(rng, kind, poss=subject[3])


_PERSON_OBJECTS = ((_verbs(W.T_THINGS), _obj(_SMALL), True),) * 4 + (
    (_verbs(W.T_LARGE), _obj(_LARGE), True), (_verbs(W.T_FOOD), _food, True), (_verbs(W.T_FOOD), _food, True),
    (_verbs(W.T_DRINK), _drink, True), (_verbs(W.T_PEOPLE), _someone, True),
    (_verbs(W.T_PEOPLE), _someone, True), (_verbs(W.T_ANIMALS), _obj(_ANIMALS), True),
    (_verbs(W.T_TELLABLE), _obj(_TELLABLE), True), (_verbs(W.T_PROBLEMS), _obj(_PROBLEMS), True),
    (_verbs(W.T_EVENTS), _obj(_EVENTS), True), (_verbs(W.T_PRIZES), _obj(_PRIZES), True),
    (_verbs(W.T_IDEAS), _obj(_IDEAS), True), (_verbs(W.T_PLACES), _place, False),
    (_verbs(W.T_PLACE_NAMES), _place_name, False))
_ANIMAL_OBJECTS = ((_verbs(W.ANIMAL_T), _obj(_ANIMALS), True), (_verbs(W.ANIMAL_T), _someone, True),
                   (_verbs(W.ANIMAL_T_THINGS), _obj(_SMALL), True),
                   (_verbs(["eat", "find", "smell"]), _food, True))
_DITRANS_OBJECTS = {"t": _obj(_SMALL), "f": _food, "s": _obj(_TELLABLE)}


def _predicate(rng: random.Random, subject: tuple) -> tuple[tuple, list[str]]:
    """A verb that suits the subject, and what follows it."""
    kind, r, where = subject[5], rng.random(), True
    if kind == "t":
        verb, tail = rng.choice(_THING_INTRANS), []
    elif r < 0.3:
        verb, tail = rng.choice(_INTRANS if kind == "p" else _ANIMAL_INTRANS), []
        if rng.random() < 0.15:  # "Anna played with her brother."
            tail = ["with", *(_someone(rng, subject) if kind == "p" else _np(rng, _ANIMALS, poss=subject[3]))]
    elif kind == "a":
        verbs, make, where = rng.choice(_ANIMAL_OBJECTS)
        verb, tail = rng.choice(verbs), make(rng, subject)
    elif r < 0.4:
        verb, prep, kinds = rng.choice(_DITRANS)
        thing, person = _DITRANS_OBJECTS[rng.choice(kinds)](rng, subject), _someone(rng, subject)
        tail = person + thing if rng.random() < 0.5 else thing + [prep] + person
    else:
        verbs, make, where = rng.choice(_PERSON_OBJECTS)
        verb, tail = rng.choice(verbs), make(rng, subject)
    if kind != "t" and not verb[4] and rng.random() < 0.2:  # not "liked the cat quietly"
        tail = tail + [rng.choice(_MANNER)]
    if where and rng.random() < (0.2 if tail else 0.45):
        tail = tail + _where(rng)
    return verb, tail


def _fit(verb: tuple, tense: int) -> int:
    """State verbs take no progressive or modal: "Tom knows", never "Tom is knowing" or "can want"."""
    if verb[4] and tense in (PROG, PASTPROG, MODAL):
        return PAST if tense == PASTPROG else PRES
    return tense


def _action(rng: random.Random, subject: tuple) -> tuple[tuple, list[str]]:
    """A predicate whose verb is an action, for "wants to ...", "is going to ..." and imperatives."""
    verb, tail = _predicate(rng, subject)
    while verb[4]:
        verb, tail = _predicate(rng, subject)
    return verb, tail


def _finite(rng: random.Random, subject: tuple, verb: tuple, tense: int, neg: bool = False) -> list[str]:
    """The verb group, agreeing with the subject: "sleeps", "did not see", "will be", "is running"."""
    agr, tense = subject[1], _fit(verb, tense)
    short = rng.random() < 0.5
    if tense == PRES:
        if neg:
            do = "does" if agr == "S" else "do"
            return [do + "n't", verb[0]] if short else [do, "not", verb[0]]
        adverb = [rng.choice(_FREQUENCY)] if rng.random() < 0.15 else []
        return adverb + [verb[1] if agr == "S" else verb[0]]
    if tense == PAST:
        if neg:
            return ["didn't", verb[0]] if short else ["did", "not", verb[0]]
        return [verb[2]]
    if tense == FUT:
        return (["won't"] if short else ["will", "not"]) + [verb[0]] if neg else ["will", verb[0]]
    if tense == MODAL:
        modal = rng.choice(_MODALS)
        return [modal[1], verb[0]] if neg else [modal[0], verb[0]]
    be = _BE[agr, PRES if tense == PROG else PAST]
    if neg:
        return [_BE_NOT[be], verb[3]] if short and be != "am" else [be, "not", verb[3]]
    return [be, verb[3]]


def _clause(rng: random.Random, subject: tuple, tense: int, neg: bool = False) -> list[str]:
    verb, tail = _predicate(rng, subject)
    tense = _fit(verb, tense)
    when = _when(rng, tense) if rng.random() < 0.3 else []
    return subject[0] + _finite(rng, subject, verb, tense, neg) + tail + when


def _be_clause(rng: random.Random, subject: tuple, tense: int, neg: bool = False) -> list[str]:
    """"The soup was very hot.", "My aunt is a pilot.", "The dog is not in the garden."""
    tense = rng.choice((PRES, PAST, FUT)) if tense not in (PRES, PAST) else tense
    if tense == FUT:
        be = ["won't", "be"] if neg else ["will", "be"]
    else:
        be = _BE[subject[1], tense]
        be = ([_BE_NOT[be]] if be != "am" and rng.random() < 0.5 else [be, "not"]) if neg else [be]
    r, kind = rng.random(), subject[5]
    if r < 0.2:
        return subject[0] + be + _where(rng)
    if r < 0.35 and kind == "p":
        job = _np(rng, _JOBS, subject[1] == "P", det="" if subject[1] == "P" else "a")
        return subject[0] + be + job
    adjectives = _PRED_LIVING if kind == "p" else _PRED_ANIMAL if kind == "a" else _SMALL[2]
    degree = [rng.choice(_DEGREE)] if rng.random() < 0.3 else []
    return subject[0] + be + degree + [rng.choice(adjectives)]


def _subject(rng: random.Random) -> tuple:
    r = rng.random()
    return _person(rng) if r < 0.65 else _animal(rng) if r < 0.88 else _thing(rng)


def _any_clause(rng: random.Random, subject: tuple, tense: int) -> list[str]:
    if rng.random() < 0.3:
        return _be_clause(rng, subject, tense, rng.random() < 0.15)
    return _clause(rng, subject, tense, rng.random() < 0.12)


# ---------------------------------------------------------------------------------------- sentences
# Each returns (tokens, final punctuation); a token "," joins the word before it.


def _statement(rng: random.Random) -> tuple[list[str], str]:
    return _any_clause(rng, _subject(rng), rng.choice(_TENSES)), "."


def _compound(rng: random.Random) -> tuple[list[str], str]:
    subject, r = _subject(rng), rng.random()
    tense = rng.choice((PAST, PRES)) if r < 0.2 else rng.choice(_TENSES)
    first = _any_clause(rng, subject, tense)
    second = _any_clause(rng, _again(subject) if rng.random() < 0.6 else _subject(rng), tense)
    if r < 0.2:  # "when" takes no future: "When the rain stopped, ..."
        return ["when", *first, ",", *second], "."
    if r < 0.45:
        return [*first, "because", *second], "."
    return [*first, ",", rng.choice(("and", "but", "so", "and")), *second], "."


def _aux(rng: random.Random, subject: tuple, verb: tuple, tense: int) -> tuple[str, str]:
    """Question word order: ("does", "sleep"), ("is", "sleeping"), ("can", "swim")."""
    tense = _fit(verb, tense)
    if tense == PROG:
        return _BE[subject[1], PRES], verb[3]
    if tense in (PAST, PASTPROG):
        return "did", verb[0]
    if tense == FUT:
        return "will", verb[0]
    if tense == MODAL:
        return rng.choice(("can", "could", "should")), verb[0]
    return ("does" if subject[1] == "S" else "do"), verb[0]


def _yes_no(rng: random.Random) -> tuple[list[str], str]:
    subject, tense = _subject(rng), rng.choice(_TENSES)
    if rng.random() < 0.3:
        tense = PAST if tense in (PAST, PASTPROG) else PRES
        adjectives = _PRED_LIVING if subject[5] == "p" else _PRED_ANIMAL if subject[5] == "a" else _SMALL[2]
        rest = _where(rng) if rng.random() < 0.3 else [rng.choice(adjectives)]
        return [_BE[subject[1], tense], *subject[0], *rest], "?"
    verb, tail = _predicate(rng, subject)
    aux, main = _aux(rng, subject, verb, tense)
    when = _when(rng, tense) if rng.random() < 0.2 else []
    return [aux, *subject[0], main, *tail, *when], "?"


def _wh(rng: random.Random) -> tuple[list[str], str]:
    subject, tense, r = _subject(rng), rng.choice(_TENSES), rng.random()
    if subject[0][0] == "a":  # "Where was the plumber?", not "a plumber"
        subject = (["the", *subject[0][1:]], *subject[1:])
    if subject[5] == "t" or r < 0.08:
        is_plural = rng.random() < 0.3
        det = rng.choice(("the", "the", "your", "her", "his", "these" if is_plural else "this"))
        return ["what", "color", "are" if is_plural else "is", *_np(rng, _SMALL, is_plural, det, adj=0)], "?"
    if r < 0.2:
        aux, main = _aux(rng, subject, _GO, tense)
        return ["where", aux, *subject[0], main], "?"
    if r < 0.28:
        return ["where", _BE[subject[1], rng.choice((PRES, PAST))], *subject[0]], "?"
    if r < 0.4 and subject[5] == "p":
        (verbs, _, _), kind = rng.choice(((_PERSON_OBJECTS[0], _SMALL), (_PERSON_OBJECTS[5], _FOOD)))
        aux, main = _aux(rng, subject, rng.choice(verbs), tense)
        which = ["which", rng.choice(kind[0] if rng.random() < 0.7 else kind[1])] if r < 0.31 else ["what"]
        return [*which, aux, *subject[0], main], "?"
    if r < 0.52:
        who = ("who", "S", "he", "his", "him", subject[5])
        verb, tail = _predicate(rng, who)
        return ["who", *_finite(rng, who, verb, rng.choice((PAST, PAST, PRES, PROG, FUT))), *tail], "?"
    if r < 0.62:
        tense = rng.choice((PRES, PAST))
        adjectives = _PRED_LIVING if subject[5] == "p" else _PRED_ANIMAL
        return ["why", _BE[subject[1], tense], *subject[0], rng.choice(adjectives)], "?"
    if r < 0.78:
        verb, tail = _predicate(rng, subject)
        aux, main = _aux(rng, subject, verb, tense)
        wh = rng.choice(("why", "when", "where", "how"))
        if wh == "how":  # not "How did Tom run quickly?"
            tail = [t for t in tail if t not in _MANNER_SET]
        return [wh, aux, *subject[0], main, *tail], "?"
    if r < 0.9 and subject[5] == "p":
        kind = rng.choice((_SMALL, _FOOD, _ANIMALS))
        aux, _ = _aux(rng, subject, _GO, rng.choice((PRES, PAST)))
        return ["how", "many", rng.choice(kind[1]), aux, *subject[0], "have"], "?"
    return ["how", "old", _BE[subject[1], rng.choice((PRES, PAST))], *subject[0]], "?"


_HAVE = {("I", PRES): "have", ("P", PRES): "have", ("S", PRES): "has"}


def _have(rng: random.Random) -> tuple[list[str], str]:
    """"Tom has three green apples.", "There were two old boats near the bridge."."""
    kind = rng.choice((_SMALL, _SMALL, _FOOD, _ANIMALS, _LARGE))
    count = rng.random() < 0.85
    things = _np(rng, kind, count, det=rng.choice(_NUMBERS) if count else rng.choice(("a", "one")))
    tense = rng.choice((PRES, PAST, PAST, FUT))
    if rng.random() < 0.4:
        be = ["will", "be"] if tense == FUT else [_BE["P" if count else "S", tense]]
        return ["there", *be, *things, *_where(rng)], "."
    subject = _person(rng)
    have = ["will", "have"] if tense == FUT else ["had"] if tense == PAST else [_HAVE[subject[1], PRES]]
    when = _when(rng, tense) if rng.random() < 0.2 else []
    return [*subject[0], *have, *things, *when], "."


def _imperative(rng: random.Random) -> tuple[list[str], str]:
    r = rng.random()
    please = ["please"] if rng.random() < 0.4 else []
    if r < 0.25:
        det = rng.choice(("the", "your"))
        return [*please, rng.choice(("open", "close")), det, rng.choice(_OPENABLE)], "."
    if r < 0.35:
        return ["don't", rng.choice(_INTRANS)[0], *_where(rng)], "!"
    if r < 0.45:
        thing = _np(rng, _SMALL, det=rng.choice(("the", "your")))
        return ["put", *thing, "on", "the", rng.choice(_SURFACES)], "."
    if r < 0.55:
        return ["be", rng.choice(("careful", "quiet", "polite", "kind", "brave", "gentle", "patient"))], "!"
    if r < 0.65:
        return ["look", "at", *_np(rng, rng.choice((_ANIMALS, _LARGE, _SMALL)), det="the")], "!"
    if r < 0.8:  # "Let's ..." is said by "we": "Let's clean our kitchen."
        verb, tail = _action(rng, _pronoun_subject(_PRONOUNS[4]))
        return ["let's", verb[0], *tail], "."
    verb, tail = _action(rng, _pronoun_subject(_PRONOUNS[1]))
    return [*please, verb[0], *tail], rng.choice((".", "!"))


def _exclaim(rng: random.Random) -> tuple[list[str], str]:
    kind = rng.choice((_PLACES_IN, _ANIMALS, _SMALL, _FOOD, _TIMES, _LARGE))
    i, adjective = rng.randrange(len(kind[0])), rng.choice(kind[2])
    if kind is _TIMES or rng.random() < 0.7:
        return ["what", "a", adjective, kind[0][i]], "!"
    return ["what", adjective, kind[1][i]], "!"


def _other(rng: random.Random) -> tuple[list[str], str]:
    r, tense = rng.random(), rng.choice(_TENSES)
    when = _when(rng, tense) if rng.random() < 0.3 else []
    if r < 0.12:
        kind, verb = rng.choice(_SOUNDS)
        animal = _np(rng, kind)
        subject = (animal, "P" if animal[-1] in kind[1] else "S", "it", "its", "it", "a")
        at = ["at", *_someone(rng, subject)] if rng.random() < 0.3 else []
        if not at and r < 0.06:
            at = [rng.choice(_MANNER)]
        return [*animal, *_finite(rng, subject, verb, tense), *at, *when], "."
    if r < 0.2:
        noun, verb = rng.choice(_NATURE)
        return ["the", noun, *_finite(rng, ([], "S"), verb, tense), *when], "."
    if r < 0.3:
        if rng.random() < 0.5:
            return ["it", *_finite(rng, ([], "S"), rng.choice(_WEATHER_VERBS), tense), *when], "."
        tense = rng.choice((PRES, PAST, FUT))
        be = ["will", "be"] if tense == FUT else [_BE["S", tense]]
        more = ["and", rng.choice(_WEATHER)] if rng.random() < 0.3 else []
        return ["it", *be, rng.choice(_WEATHER), *more, *_when(rng, tense)], "."
    if r < 0.4:
        subject = _person(rng)
        where = ["in", rng.choice(_PLACE_NAMES)] if rng.random() < 0.7 else ["in", *_np(rng, _PLACES_IN)]
        return [*subject[0], *_finite(rng, subject, rng.choice(_LIVE), tense), *where, *when], "."
    if r < 0.45:
        city, country = rng.choice(_CITIES)
        return [city, "is", "a", *rng.choice(((), ("famous",), ("beautiful",), ("busy",))), "city", "in",
                country], "."
    if r < 0.55:
        subject = _person(rng) if rng.random() < 0.6 else _animal(rng)
        other = _someone(rng, subject) if subject[5] == "p" else _np(rng, _ANIMALS)
        be = _BE[subject[1], rng.choice((PRES, PAST))]
        return [*subject[0], be, rng.choice(_COMPARATIVES), "than", *other], "."
    if r < 0.7:
        subject = _person(rng)
        if rng.random() < 0.5:
            tense = PRES if tense in (PROG, MODAL) else PAST if tense == PASTPROG else tense
            return [*subject[0], *_finite(rng, subject, rng.choice(_ENJOY), tense), rng.choice(_HOBBIES)], "."
        verb, tail = _action(rng, subject)
        if rng.random() < 0.4:
            going = [_BE[subject[1], PRES], "going", "to"]
            return [*subject[0], *going, verb[0], *tail, *_when(rng, FUT)], "."
        tense = PRES if tense in (PROG, MODAL, FUT) else PAST if tense == PASTPROG else tense
        return [*subject[0], *_finite(rng, subject, rng.choice(_WANT), tense), "to", verb[0], *tail], "."
    if r < 0.9:
        subject = _person(rng)
        place = [rng.choice(_PLACE_NAMES)] if rng.random() < 0.4 else ["the", rng.choice(
            _PLACES_AT[0] if rng.random() < 0.5 else _PLACES_IN[0])]
        by = ["by", rng.choice(_TRAVEL)] if place[0] != "the" and rng.random() < 0.4 else []
        return [*subject[0], *_finite(rng, subject, _GO, tense), "to", *place, *by, *when], "."
    # Ages for named people, pronouns and animals: "the old man" is not "two years old".
    subject = _person(rng) if rng.random() < 0.7 else _animal(rng)
    if subject[5] == "p" and len(subject[0]) > 1:
        subject = _pronoun_subject(rng.choice(_PRONOUNS))
    number = rng.choice(_NUMBERS)
    return [*subject[0], _BE[subject[1], rng.choice((PRES, PAST))], number, "years", "old"], "."


_SENTENCES = (_statement,) * 9 + (_compound,) * 4 + (_yes_no,) * 2 + (_wh,) * 2 + (
    _have, _imperative, _other, _other, _other, _other, _exclaim)


def sentence(rng: random.Random) -> str:
    """One sentence: capitalised, with final punctuation and the right "a"/"an"."""
    if not isinstance(rng, Zipfian):
        rng = Zipfian(rng)
    tokens, end = rng.choice(_SENTENCES)(rng)
    for i in range(len(tokens) - 1):
        if tokens[i] == "a" and tokens[i + 1][0] in "aeiou":
            tokens[i] = "an"
    text = " ".join(tokens).replace(" ,", ",") + end
    return text[0].upper() + text[1:]


def paragraph(rng: random.Random, sentences: int) -> str:
    """``sentences`` sentences joined by single spaces."""
    rng = Zipfian(rng)
    return " ".join([sentence(rng) for _ in range(sentences)])


VOCABULARY: frozenset[str] = frozenset(VOCAB)
