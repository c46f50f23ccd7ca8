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
than the other way round. Noun phrases live in :mod:`align.english_nouns`, verbs and clauses in
:mod:`align.english_verbs`, inflection and word frequency in :mod:`align.english_forms`; this
module makes the sentences.

Output is a pure function of the ``random.Random`` state: choices are made from tuples only, never from
sets, whose order changes between processes with hash randomisation.
"""

from __future__ import annotations

import random

from align.english_forms import VOCAB, Zipfian, ing, past, plural, third, words
from align.english_nouns import (
    ANIMALS,
    CITIES,
    COMPARATIVES,
    FOOD,
    LARGE,
    NUMBERS,
    OPENABLE,
    PLACE_NAMES,
    PLACES_AT,
    PLACES_IN,
    PRED_ANIMAL,
    PRED_LIVING,
    PRONOUNS,
    SMALL,
    SURFACES,
    TIMES,
    TRAVEL,
    WEATHER,
    animal_subject,
    any_subject,
    noun_phrase,
    person_object,
    person_subject,
    place_phrase,
    pronoun_subject,
    referring_pronoun,
)
from align.english_verbs import (
    BE,
    ENJOY,
    FUT,
    GO,
    HOBBIES,
    INTRANS,
    LIVE,
    MANNER,
    MANNER_SET,
    MODAL,
    NATURE,
    PAST,
    PASTPROG,
    PERSON_OBJECTS,
    PRES,
    PROG,
    SOUNDS,
    TENSES,
    WANT,
    WEATHER_VERBS,
    action_predicate,
    any_clause,
    predicate,
    question_verbs,
    time_phrase,
    verb_group,
)

__all__ = ["VOCABULARY", "ing", "paragraph", "past", "plural", "sentence", "third", "words"]

# Words the templates spell out themselves.
VOCAB.update(words("""a an the this that these those my your his her its our their some many every
I you he she it we they me him us them who what where when why how which and but so because than
of to for in at on under near behind beside next front by with not don't doesn't didn't won't isn't
aren't wasn't weren't can't cannot couldn't shouldn't am is are was were will can could should might
must be do does did has have had there please let's look put open close one years old color city famous
beautiful busy lovely going last next home school work outside inside upstairs downstairs"""))


# ---------------------------------------------------------------------------------------- sentences
# Each returns (tokens, final punctuation); a token "," joins the word before it.


def _statement(rng: random.Random) -> tuple[list[str], str]:
    return any_clause(rng, any_subject(rng), rng.choice(TENSES)), "."


def _compound(rng: random.Random) -> tuple[list[str], str]:
    subject, r = any_subject(rng), rng.random()
    tense = rng.choice((PAST, PRES)) if r < 0.2 else rng.choice(TENSES)
    first = any_clause(rng, subject, tense)
    second = any_clause(rng, referring_pronoun(subject) if rng.random() < 0.6 else any_subject(rng), tense)
    if r < 0.2:  # "when" takes no future: "When the rain stopped, ..."
        return ["when", *first, ",", *second], "."
    if r < 0.45:
        return [*first, "because", *second], "."
    return [*first, ",", rng.choice(("and", "but", "so", "and")), *second], "."


def _yes_no(rng: random.Random) -> tuple[list[str], str]:
    subject, tense = any_subject(rng), rng.choice(TENSES)
    if rng.random() < 0.3:
        tense = PAST if tense in (PAST, PASTPROG) else PRES
        adjectives = PRED_LIVING if subject[5] == "p" else PRED_ANIMAL if subject[5] == "a" else SMALL[2]
        rest = place_phrase(rng) if rng.random() < 0.3 else [rng.choice(adjectives)]
        return [BE[subject[1], tense], *subject[0], *rest], "?"
    verb, tail = predicate(rng, subject)
    aux, main = question_verbs(rng, subject, verb, tense)
    when = time_phrase(rng, tense) if rng.random() < 0.2 else []
    return [aux, *subject[0], main, *tail, *when], "?"


def _wh(rng: random.Random) -> tuple[list[str], str]:
    subject, tense, r = any_subject(rng), rng.choice(TENSES), rng.random()
    if subject[0][0] == "a":  # "Where was the plumber?", not "a plumber"
        subject = (["the", *subject[0][1:]], *subject[1:])
    if subject[5] == "t" or r < 0.08:
        is_plural = rng.random() < 0.3
        det = rng.choice(("the", "the", "your", "her", "his", "these" if is_plural else "this"))
        things = noun_phrase(rng, SMALL, is_plural, det, adj=0)
        return ["what", "color", "are" if is_plural else "is", *things], "?"
    if r < 0.2:
        aux, main = question_verbs(rng, subject, GO, tense)
        return ["where", aux, *subject[0], main], "?"
    if r < 0.28:
        return ["where", BE[subject[1], rng.choice((PRES, PAST))], *subject[0]], "?"
    if r < 0.4 and subject[5] == "p":
        (verbs, _, _), kind = rng.choice(((PERSON_OBJECTS[0], SMALL), (PERSON_OBJECTS[5], FOOD)))
        aux, main = question_verbs(rng, subject, rng.choice(verbs), tense)
        which = ["which", rng.choice(kind[0] if rng.random() < 0.7 else kind[1])] if r < 0.31 else ["what"]
        return [*which, aux, *subject[0], main], "?"
    if r < 0.52:
        who = ("who", "S", "he", "his", "him", subject[5])
        verb, tail = predicate(rng, who)
        return ["who", *verb_group(rng, who, verb, rng.choice((PAST, PAST, PRES, PROG, FUT))), *tail], "?"
    if r < 0.62:
        tense = rng.choice((PRES, PAST))
        adjectives = PRED_LIVING if subject[5] == "p" else PRED_ANIMAL
        return ["why", BE[subject[1], tense], *subject[0], rng.choice(adjectives)], "?"
    if r < 0.78:
        verb, tail = predicate(rng, subject)
        aux, main = question_verbs(rng, subject, verb, tense)
        wh = rng.choice(("why", "when", "where", "how"))
        if wh == "how":  # not "How did Tom run quickly?"
            tail = [t for t in tail if t not in MANNER_SET]
        return [wh, aux, *subject[0], main, *tail], "?"
    if r < 0.9 and subject[5] == "p":
        kind = rng.choice((SMALL, FOOD, ANIMALS))
        aux, _ = question_verbs(rng, subject, GO, rng.choice((PRES, PAST)))
        return ["how", "many", rng.choice(kind[1]), aux, *subject[0], "have"], "?"
    return ["how", "old", BE[subject[1], rng.choice((PRES, PAST))], *subject[0]], "?"


_HAVE = {("I", PRES): "have", ("P", PRES): "have", ("S", PRES): "has"}


def _have(rng: random.Random) -> tuple[list[str], str]:
    """"Tom has three green apples.", "There were two old boats near the bridge."."""
    kind = rng.choice((SMALL, SMALL, FOOD, ANIMALS, LARGE))
    count = rng.random() < 0.85
    things = noun_phrase(rng, kind, count, det=rng.choice(NUMBERS) if count else rng.choice(("a", "one")))
    tense = rng.choice((PRES, PAST, PAST, FUT))
    if rng.random() < 0.4:
        be = ["will", "be"] if tense == FUT else [BE["P" if count else "S", tense]]
        return ["there", *be, *things, *place_phrase(rng)], "."
    subject = person_subject(rng)
    have = ["will", "have"] if tense == FUT else ["had"] if tense == PAST else [_HAVE[subject[1], PRES]]
    when = time_phrase(rng, tense) if rng.random() < 0.2 else []
    return [*subject[0], *have, *things, *when], "."


def _imperative(rng: random.Random) -> tuple[list[str], str]:
    r = rng.random()
    please = ["please"] if rng.random() < 0.4 else []
    if r < 0.25:
        det = rng.choice(("the", "your"))
        return [*please, rng.choice(("open", "close")), det, rng.choice(OPENABLE)], "."
    if r < 0.35:
        return ["don't", rng.choice(INTRANS)[0], *place_phrase(rng)], "!"
    if r < 0.45:
        thing = noun_phrase(rng, SMALL, det=rng.choice(("the", "your")))
        return ["put", *thing, "on", "the", rng.choice(SURFACES)], "."
    if r < 0.55:
        return ["be", rng.choice(("careful", "quiet", "polite", "kind", "brave", "gentle", "patient"))], "!"
    if r < 0.65:
        return ["look", "at", *noun_phrase(rng, rng.choice((ANIMALS, LARGE, SMALL)), det="the")], "!"
    if r < 0.8:  # "Let's ..." is said by "we": "Let's clean our kitchen."
        verb, tail = action_predicate(rng, pronoun_subject(PRONOUNS[4]))
        return ["let's", verb[0], *tail], "."
    verb, tail = action_predicate(rng, pronoun_subject(PRONOUNS[1]))
    return [*please, verb[0], *tail], rng.choice((".", "!"))


def _exclaim(rng: random.Random) -> tuple[list[str], str]:
    kind = rng.choice((PLACES_IN, ANIMALS, SMALL, FOOD, TIMES, LARGE))
    i, adjective = rng.randrange(len(kind[0])), rng.choice(kind[2])
    if kind is TIMES or rng.random() < 0.7:
        return ["what", "a", adjective, kind[0][i]], "!"
    return ["what", adjective, kind[1][i]], "!"


def _other(rng: random.Random) -> tuple[list[str], str]:
    r, tense = rng.random(), rng.choice(TENSES)
    when = time_phrase(rng, tense) if rng.random() < 0.3 else []
    if r < 0.12:
        kind, verb = rng.choice(SOUNDS)
        animal = noun_phrase(rng, kind)
        subject = (animal, "P" if animal[-1] in kind[1] else "S", "it", "its", "it", "a")
        at = ["at", *person_object(rng, subject)] if rng.random() < 0.3 else []
        if not at and r < 0.06:
            at = [rng.choice(MANNER)]
        return [*animal, *verb_group(rng, subject, verb, tense), *at, *when], "."
    if r < 0.2:
        noun, verb = rng.choice(NATURE)
        return ["the", noun, *verb_group(rng, ([], "S"), verb, tense), *when], "."
    if r < 0.3:
        if rng.random() < 0.5:
            return ["it", *verb_group(rng, ([], "S"), rng.choice(WEATHER_VERBS), tense), *when], "."
        tense = rng.choice((PRES, PAST, FUT))
        be = ["will", "be"] if tense == FUT else [BE["S", tense]]
        more = ["and", rng.choice(WEATHER)] if rng.random() < 0.3 else []
        return ["it", *be, rng.choice(WEATHER), *more, *time_phrase(rng, tense)], "."
    if r < 0.4:
        subject = person_subject(rng)
        place = [rng.choice(PLACE_NAMES)] if rng.random() < 0.7 else noun_phrase(rng, PLACES_IN)
        where = ["in", *place]
        return [*subject[0], *verb_group(rng, subject, rng.choice(LIVE), tense), *where, *when], "."
    if r < 0.45:
        city, country = rng.choice(CITIES)
        return [city, "is", "a", *rng.choice(((), ("famous",), ("beautiful",), ("busy",))), "city", "in",
                country], "."
    if r < 0.55:
        subject = person_subject(rng) if rng.random() < 0.6 else animal_subject(rng)
        other = person_object(rng, subject) if subject[5] == "p" else noun_phrase(rng, ANIMALS)
        be = BE[subject[1], rng.choice((PRES, PAST))]
        return [*subject[0], be, rng.choice(COMPARATIVES), "than", *other], "."
    if r < 0.7:
        subject = person_subject(rng)
        if rng.random() < 0.5:
            tense = PRES if tense in (PROG, MODAL) else PAST if tense == PASTPROG else tense
            enjoys = verb_group(rng, subject, rng.choice(ENJOY), tense)
            return [*subject[0], *enjoys, rng.choice(HOBBIES)], "."
        verb, tail = action_predicate(rng, subject)
        if rng.random() < 0.4:
            going = [BE[subject[1], PRES], "going", "to"]
            return [*subject[0], *going, verb[0], *tail, *time_phrase(rng, FUT)], "."
        tense = PRES if tense in (PROG, MODAL, FUT) else PAST if tense == PASTPROG else tense
        return [*subject[0], *verb_group(rng, subject, rng.choice(WANT), tense), "to", verb[0], *tail], "."
    if r < 0.9:
        subject = person_subject(rng)
        place = [rng.choice(PLACE_NAMES)] if rng.random() < 0.4 else ["the", rng.choice(
            PLACES_AT[0] if rng.random() < 0.5 else PLACES_IN[0])]
        by = ["by", rng.choice(TRAVEL)] if place[0] != "the" and rng.random() < 0.4 else []
        return [*subject[0], *verb_group(rng, subject, GO, tense), "to", *place, *by, *when], "."
    # Ages for named people, pronouns and animals: "the old man" is not "two years old".
    subject = person_subject(rng) if rng.random() < 0.7 else animal_subject(rng)
    if subject[5] == "p" and len(subject[0]) > 1:
        subject = pronoun_subject(rng.choice(PRONOUNS))
    number = rng.choice(NUMBERS)
    return [*subject[0], BE[subject[1], rng.choice((PRES, PAST))], number, "years", "old"], "."


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
