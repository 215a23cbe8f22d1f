"""A small deterministic CoNLL-2003-style corpus for tests: `token POS chunk NER`, IOB2 tags.

Sentences come from templates whose slots are filled from separate name lists (persons, places,
organisations, miscellaneous), so the entity type is carried by the words themselves and a tiny
model can learn it in a few hundred steps.
"""

from __future__ import annotations

import random
from pathlib import Path

PERSONS = [
    "Angela Merkel", "Nelson Mandela", "Boris Yeltsin", "Jacques Chirac", "Helmut Kohl", "Bill Clinton",
    "Yasser Arafat", "Tony Blair", "Kofi Annan", "Pete Sampras", "Steffi Graf", "Dole",
]  # fmt: skip
PLACES = [
    "Paris", "London", "Berlin", "Moscow", "Tokyo", "New York", "Hong Kong", "South Africa", "Germany",
    "Brazil", "Los Angeles", "Cairo",
]  # fmt: skip
ORGANISATIONS = [
    "Reuters", "United Nations", "European Union", "Bundesbank", "Ford Motor Co", "NATO", "World Bank",
    "Manchester United", "Bank of England", "Interfax",
]  # fmt: skip
MISCELLANEOUS = ["German", "French", "Olympic", "Russian", "Dutch", "Japanese", "Asian Games", "Euro"]
SLOTS = {"PER": PERSONS, "LOC": PLACES, "ORG": ORGANISATIONS, "MISC": MISCELLANEOUS}

TEMPLATES = [
    "{PER} visited {LOC} on Tuesday .",
    "{ORG} said on Monday that {PER} would resign .",
    "{PER} , the {MISC} minister , met {PER} in {LOC} .",
    "Shares in {ORG} rose 3 percent in {LOC} .",
    "{MISC} officials told {ORG} that talks in {LOC} had failed .",
    "The {ORG} spokesman declined to comment .",
    "{PER} won the {MISC} title in {LOC} .",
    "Police in {LOC} arrested two men on Friday .",
    "{ORG} and {ORG} signed a deal worth 40 million dollars .",
    "{PER} told reporters in {LOC} that the {MISC} economy was growing .",
    "Rain stopped play in {LOC} .",
    "{PER} joined {ORG} last year .",
    "The {MISC} team beat {LOC} 2-1 on Sunday .",
    "{ORG} shares fell after {PER} quit .",
    "Talks between {LOC} and {LOC} resumed in {LOC} .",
]

_POS_WORDS = {
    "IN": "on in that after between of",
    "DT": "the The a",
    "CD": "3 40 2-1 two million",
    "VBD": "visited said met rose told had declined won arrested signed stopped joined beat fell quit resumed was",
    "VBN": "failed",
    "VBG": "growing",
    "VB": "resign comment",
    "MD": "would",
    "TO": "to",
    "CC": "and",
    "JJ": "last",
    "NNP": "Tuesday Monday Friday Sunday Police Rain",
    "NNS": "Shares shares officials talks men dollars reporters Talks",
    ",": ",",
    ".": ".",
}
POS = {word: tag for tag, words in _POS_WORDS.items() for word in words.split()}
CHUNK_OF_POS = {"IN": "PP", "MD": "VP", "TO": "VP", "CC": None, ",": None, ".": None}


def _chunk(pos: str) -> str | None:
    """The phrase a POS tag belongs to: noun phrase by default, verbs VP, prepositions PP, punctuation none."""
    if pos in CHUNK_OF_POS:
        return CHUNK_OF_POS[pos]
    return "VP" if pos.startswith("VB") else "NP"


def _sentence(rng: random.Random) -> list[tuple[str, str, str]]:
    """(token, POS, NER) triples of one sentence, IOB2 entity tags."""
    out = []
    for word in rng.choice(TEMPLATES).split():
        if word.startswith("{"):
            kind = word[1:-1]
            tokens = rng.choice(SLOTS[kind]).split()
            out += [(t, "NNP", f"{'B' if i == 0 else 'I'}-{kind}") for i, t in enumerate(tokens)]
        else:
            out.append((word, POS.get(word, "NN"), "O"))
    return out


def conll_text(num_sentences: int, seed: int) -> str:
    """`num_sentences` sentences after a -DOCSTART- line; the same text for the same arguments."""
    rng = random.Random(seed)
    blocks = ["-DOCSTART- -X- -X- O"]
    for _ in range(num_sentences):
        lines, previous = [], None
        for token, pos, ner in _sentence(rng):
            phrase = _chunk(pos)
            chunk = "O" if phrase is None else f"{'I' if phrase == previous else 'B'}-{phrase}"
            lines.append(f"{token} {pos} {chunk} {ner}")
            previous = phrase
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def conll_file(path: Path, num_sentences: int, seed: int) -> Path:
    """Write `conll_text(num_sentences, seed)` to `path` and return it."""
    path = Path(path)
    path.write_text(conll_text(num_sentences, seed))
    return path
