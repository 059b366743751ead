"""Writes the small datasets the MiniLM jobs train on (seeded, so the shipped files are exactly
what this script prints): run `python jobs/data/generate.py` from the repository root.

- sentiment/{train,eval}.jsonl — movie-review sentences, `{"text", "label"}` with label
  `negative` / `positive`. Negations ("was not dull") and contrasts ("a slow start, but …")
  make the words alone a poor guide, so an untrained head sits near chance.
- ner/{train,eval}.jsonl — CoNLL-2003-style sentences, `{"tokens", "tags"}` with BIO tags over
  PER, ORG, LOC and MISC. Some names and places appear only in eval, so eval measures context,
  not memorised names.
- chat/{train,eval}.jsonl — the two sets above as chat (`{"messages"}`) for a chat LLM: list the
  people, places and organisations of a sentence in an exact answer format, or name a review's
  sentiment in one word. Every eval sentence names only people, places and organisations that
  no training sentence names.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 2026

# -- sentiment ---------------------------------------------------------------------------------
SUBJECTS = [
    "the movie",
    "this film",
    "the plot",
    "the acting",
    "the soundtrack",
    "the ending",
    "the script",
    "the cast",
    "the dialogue",
    "the cinematography",
    "the story",
    "the direction",
    "the sequel",
    "the lead performance",
    "the pacing",
    "the finale",
]
POSITIVE = [
    "wonderful",
    "brilliant",
    "moving",
    "delightful",
    "gripping",
    "superb",
    "charming",
    "touching",
    "hilarious",
    "beautiful",
    "clever",
    "thrilling",
    "heartfelt",
    "stunning",
    "memorable",
    "excellent",
    "fresh",
    "powerful",
]
NEGATIVE = [
    "dull",
    "boring",
    "awful",
    "clumsy",
    "tedious",
    "predictable",
    "terrible",
    "lifeless",
    "painful",
    "forgettable",
    "bland",
    "messy",
    "shallow",
    "annoying",
    "weak",
    "dreadful",
    "flat",
    "pointless",
]
DEGREE = ["", "really ", "truly ", "rather ", "quite ", "very ", "utterly "]
VERDICT_POS = [
    "i would watch it again",
    "i recommend it to everyone",
    "it was worth every minute",
    "i left the cinema smiling",
    "my friends loved it too",
]
VERDICT_NEG = [
    "i want my money back",
    "i nearly fell asleep",
    "it was a waste of time",
    "i walked out early",
    "i would not recommend it",
]


def _review(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    good, bad = rng.choice(POSITIVE), rng.choice(NEGATIVE)
    subj, deg = rng.choice(SUBJECTS), rng.choice(DEGREE)
    kind = rng.randrange(6)
    if kind == 0:
        text = f"{subj} was {deg}{good if positive else bad}."
    elif kind == 1:  # negation flips the word's sentiment
        text = f"{subj} was not {bad if positive else good} at all."
    elif kind == 2:  # the clause after "but" decides
        first, second = (bad, good) if positive else (good, bad)
        text = f"{subj} started {first}, but it ended up {deg}{second}."
    elif kind == 3:
        verdict = rng.choice(VERDICT_POS if positive else VERDICT_NEG)
        text = f"{subj} was {good if positive else bad} and {verdict}."
    elif kind == 4:  # expectation vs. outcome
        expected, got = (bad, good) if positive else (good, bad)
        text = f"i expected {subj} to be {expected}, yet it was {deg}{got}."
    else:
        verdict = rng.choice(VERDICT_POS if positive else VERDICT_NEG)
        text = f"{verdict}; {subj} felt {deg}{good if positive else bad}."
    return text[0].upper() + text[1:], "positive" if positive else "negative"


def sentiment(n_train: int = 400, n_eval: int = 100) -> tuple[list[dict], list[dict]]:
    """Distinct reviews: (train, eval) with no text in both."""
    rng, seen, rows = random.Random(SEED), set(), []
    while len(rows) < n_train + n_eval:
        text, label = _review(rng)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows[:n_train], rows[n_train:]


# -- NER ---------------------------------------------------------------------------------------
FIRST = [
    "Maria",
    "John",
    "Wei",
    "Fatima",
    "Carlos",
    "Anna",
    "David",
    "Yuki",
    "Olga",
    "Ahmed",
    "Laura",
    "Peter",
    "Sofia",
    "Kwame",
    "Elena",
    "Marco",
    "Priya",
    "Lars",
    "Amara",
    "Tomas",
]
LAST = [
    "Garcia",
    "Smith",
    "Chen",
    "Khan",
    "Silva",
    "Novak",
    "Brown",
    "Tanaka",
    "Petrova",
    "Hassan",
    "Rossi",
    "Muller",
    "Jensen",
    "Mensah",
    "Ivanova",
    "Bianchi",
    "Sharma",
    "Larsen",
    "Okafor",
    "Dvorak",
]
LOCS = [
    ["Paris"],
    ["Berlin"],
    ["Tokyo"],
    ["New", "York"],
    ["Buenos", "Aires"],
    ["Cairo"],
    ["Madrid"],
    ["Lagos"],
    ["Oslo"],
    ["Mumbai"],
    ["Hong", "Kong"],
    ["Toronto"],
    ["Vienna"],
    ["Rio", "de", "Janeiro"],
    ["Nairobi"],
    ["Lisbon"],
    ["Seoul"],
    ["Chicago"],
    ["Prague"],
    ["Cape", "Town"],
]
ORGS = [
    ["Reuters"],
    ["Siemens"],
    ["United", "Nations"],
    ["Acme", "Corp"],
    ["Bank", "of", "England"],
    ["Toyota"],
    ["World", "Bank"],
    ["Red", "Cross"],
    ["Nokia"],
    ["European", "Commission"],
    ["Real", "Madrid"],
    ["Samsung"],
    ["Greenpeace"],
    ["Interpol"],
    ["Boeing"],
    ["Unilever"],
]
MISC = [
    ["German"],
    ["French"],
    ["Olympic", "Games"],
    ["Nobel", "Prize"],
    ["Japanese"],
    ["World", "Cup"],
    ["Brazilian"],
    ["Christmas"],
    ["Italian"],
    ["Grand", "Prix"],
]
# A template is a list of words and slots; slots become entities.
TEMPLATES = [
    "{PER} flew to {LOC} on Monday .",
    "{ORG} said {PER} would visit {LOC} next week .",
    "Shares of {ORG} rose 3 percent in {LOC} trading .",
    "{PER} , a spokesman for {ORG} , declined to comment .",
    "The {MISC} team beat {ORG} 2 - 1 in {LOC} .",
    "{PER} won the {MISC} after a long career .",
    "Police in {LOC} arrested {PER} on Friday .",
    "{ORG} opened a new office in {LOC} .",
    "{PER} met {PER} in {LOC} to discuss trade .",
    "The {MISC} minister told {ORG} that talks would resume .",
    "In {LOC} , {PER} thanked {ORG} for its support .",
    "{PER} joined {ORG} last year .",
    "Fans in {LOC} celebrated the {MISC} win .",
    "{ORG} and {ORG} agreed to merge , sources told {ORG} .",
    "Rain delayed the {MISC} in {LOC} for two hours .",
    "Officials said the {MISC} exports fell in May .",
]


def _person(rng: random.Random, first: list[str], last: list[str]) -> list[str]:
    return [rng.choice(first), rng.choice(last)] if rng.random() < 0.7 else [rng.choice(last)]


def _sentence(
    rng: random.Random, pools: dict[str, list[list[str]]], first: list[str], last: list[str]
) -> dict[str, list[str]]:
    tokens: list[str] = []
    tags: list[str] = []
    for word in rng.choice(TEMPLATES).split():
        if word.startswith("{") and word.endswith("}"):
            kind = word[1:-1]
            entity = _person(rng, first, last) if kind == "PER" else rng.choice(pools[kind])
            tokens += entity
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
        else:
            tokens.append(word)
            tags.append("O")
    return {"tokens": tokens, "tags": tags}


def ner(n_train: int = 400, n_eval: int = 100) -> tuple[list[dict], list[dict]]:
    """(train, eval) sentences; eval also draws on names and places train never shows."""
    rng = random.Random(SEED + 1)

    def split(pool: list) -> tuple[list, list]:
        cut = len(pool) * 3 // 4
        return pool[:cut], pool[cut:]

    (first_a, first_b), (last_a, last_b) = split(FIRST), split(LAST)
    pools_a, pools_b = {}, {}
    for kind, pool in (("LOC", LOCS), ("ORG", ORGS), ("MISC", MISC)):
        pools_a[kind], pools_b[kind] = split(pool)
    seen: set[str] = set()
    out: list[list[dict]] = [[], []]
    for i, n in enumerate((n_train, n_eval)):
        while len(out[i]) < n:
            if i == 0 or rng.random() < 0.5:
                row = _sentence(rng, pools_a, first_a, last_a)
            else:  # unseen names and places
                row = _sentence(rng, pools_b, first_b, last_b)
            key = " ".join(row["tokens"])
            if key not in seen:
                seen.add(key)
                out[i].append(row)
    return out[0], out[1]


# -- chat ----------------------------------------------------------------------------------------
SYSTEM = "You are a precise annotator. Answer in exactly the format asked, nothing else."
NER_ASK = (
    "List the people, places and organisations in this sentence as "
    "`people: ...; places: ...; organisations: ...` (names separated by commas, `none` where "
    "there are none).\nSentence: {text}"
)
SENTIMENT_ASK = "Is this movie review positive or negative? Answer with one word.\nReview: {text}"
KINDS = (("people", "PER"), ("places", "LOC"), ("organisations", "ORG"))


def entities(row: dict) -> dict[str, list[str]]:
    """Each entity type's names in a BIO-tagged sentence, in order."""
    out: dict[str, list[str]] = {kind: [] for _, kind in KINDS + (("misc", "MISC"),)}
    for token, tag in zip(row["tokens"], row["tags"], strict=True):
        if tag.startswith("B-"):
            out[tag[2:]].append(token)
        elif tag.startswith("I-"):
            out[tag[2:]][-1] += " " + token
    return out


def _conversation(ask: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": ask},
            {"role": "assistant", "content": answer},
        ]
    }


def ner_chat(row: dict) -> dict:
    """A NER sentence as a chat item with its exact expected answer."""
    found = entities(row)
    answer = "; ".join(f"{name}: {', '.join(found[kind]) or 'none'}" for name, kind in KINDS)
    return _conversation(NER_ASK.format(text=" ".join(row["tokens"])), answer)


def sentiment_chat(row: dict) -> dict:
    return _conversation(SENTIMENT_ASK.format(text=row["text"]), row["label"])


def chat(
    n_train: int = 600, n_eval_ner: int = 40, n_eval_sentiment: int = 20
) -> tuple[list[dict], list[dict]]:
    """(train, eval) chat items, half NER half sentiment in train; eval NER items name no person,
    place or organisation that any training item names."""
    rng = random.Random(SEED + 2)
    s_train, s_eval = sentiment()
    n_train_rows, n_eval_rows = ner()
    train = [ner_chat(r) for r in n_train_rows[: n_train // 2]]
    train += [sentiment_chat(r) for r in s_train[: n_train // 2]]
    rng.shuffle(train)
    seen = {name for r in n_train_rows for _, kind in KINDS for name in entities(r)[kind]}
    unseen = [
        r for r in n_eval_rows if not {n for _, kind in KINDS for n in entities(r)[kind]} & seen
    ]
    ner_items = [ner_chat(r) for r in unseen[:n_eval_ner]]
    sentiment_items = [sentiment_chat(r) for r in s_eval[:n_eval_sentiment]]
    # Interleaved (two NER items, one review), so any first N items hold both tasks.
    evals = []
    for i, item in enumerate(ner_items):
        evals.append(item)
        if i % 2 == 1 and i // 2 < len(sentiment_items):
            evals.append(sentiment_items[i // 2])
    return train, evals + sentiment_items[len(ner_items) // 2 :]


def write(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> int:
    for name, (train, evals) in (("sentiment", sentiment()), ("ner", ner()), ("chat", chat())):
        write(train, HERE / name / "train.jsonl")
        write(evals, HERE / name / "eval.jsonl")
        print(f"{name}: {len(train)} train, {len(evals)} eval → {HERE / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
