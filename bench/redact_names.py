"""Person-name redaction (`fmdist prepare --redact`): recall and precision on a seeded planted set.

Names of many cultures (first + last, in the order they are usually written in English text) are planted
in sentences at varied positions: sentence start, middle, end before a period, in quotes, in brackets,
after a comma, and possessive ("X's"). Control sentences without any person name, full of capitalised
words that are not names (places, months, weekdays, holidays, products, organisations, some named after
people such as Tesla or Ford), measure false positives. The real redactor (Presidio + spaCy
en_core_web_sm, as `fmdist prepare --redact` runs it) redacts every sentence twice:

- text: the sentence as one string (`Redactor.redact_many`, a CSV/JSONL/text column); a word (a
  whitespace-separated piece, punctuation attached) counts as redacted when the output changed it (the
  words of input and output aligned with difflib);
- conll: the sentence as tokens (`Redactor.redact_tokens`, a CoNLL column: words, punctuation and "'s"
  split off), which are replaced one for one, so every token is either kept or replaced.

Figures are token-level: recall = name tokens redacted / name tokens planted; precision = name tokens
redacted / all tokens redacted (per culture and per position over those sentences only; the "all" row
includes the control sentences). "names fully removed" is name-level: the
share of planted names with no token left (a half-removed name still leaks). Sentences/s covers the
redaction only, after the engine is loaded; the load itself is reported apart.

    python bench/redact_names.py --seed 0 --sentences-per-name 4 --controls 400
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import os
import platform
import random
import re
import time
from collections import Counter
from dataclasses import dataclass

from fmdist.data.deid import Redactor, ner_engine

NAMES = {
    "English": ["James Whitaker", "Emily Hargreaves", "Oliver Bennett", "Charlotte Pemberton", "Thomas Ashworth",
                "Sophie Caldwell", "William Fairbanks", "Hannah Thornton", "George Ellison", "Lucy Marsh"],
    "Spanish": ["Alejandro Fernández", "Lucía Morales", "Javier Gutiérrez", "Carmen Rodríguez", "Diego Castillo",
                "Isabel Navarro", "Santiago Herrera", "Valentina Ortega", "Pablo Domínguez", "Marta Jiménez"],
    "Chinese": ["Zhang Wei", "Wang Fang", "Li Xiaoming", "Liu Yang", "Chen Jing", "Huang Lei", "Zhao Min",
                "Wu Hao", "Zhou Ting", "Xu Jianguo"],
    "Indian": ["Priya Sharma", "Arjun Patel", "Ananya Iyer", "Rohan Mehta", "Kavita Reddy", "Vikram Nair",
               "Sunita Desai", "Rahul Gupta", "Deepika Menon", "Sanjay Krishnan"],
    "Arabic": ["Ahmed Al-Farsi", "Fatima Haddad", "Omar Khalil", "Layla Mansour", "Youssef Nasser", "Amina Saleh",
               "Khalid Rahman", "Noor Aziz", "Tariq Hamdan", "Samira Qasim"],
    "Nigerian": ["Oluwaseun Adeyemi", "Adebayo Ogunleye", "Funmilayo Akinola", "Babatunde Olatunji",
                 "Yetunde Adewale", "Chukwuemeka Okafor", "Ngozi Eze", "Temitope Balogun", "Olufemi Adebisi",
                 "Aderonke Fashola"],
    "Japanese": ["Hiroshi Tanaka", "Yuki Nakamura", "Takeshi Yamamoto", "Aiko Watanabe", "Kenji Suzuki",
                 "Sakura Kobayashi", "Daisuke Ito", "Haruka Sato", "Ryo Matsumoto", "Emi Takahashi"],
    "Russian": ["Ivan Petrov", "Natalia Smirnova", "Dmitri Volkov", "Olga Ivanova", "Sergei Kuznetsov",
                "Anastasia Popova", "Mikhail Sokolov", "Ekaterina Lebedeva", "Alexei Morozov", "Tatiana Novikova"],
    "Vietnamese": ["Nguyen Van An", "Tran Thi Mai", "Le Minh Duc", "Pham Thu Ha", "Hoang Van Nam", "Vu Thi Lan",
                   "Dang Quoc Bao", "Bui Thanh Hai", "Do Thi Huong", "Ngo Minh Tuan"],
    "Turkish": ["Mehmet Öztürk", "Ayşe Yılmaz", "Mustafa Demir", "Zeynep Kaya", "Emre Şahin", "Elif Çelik",
                "Burak Arslan", "Selin Doğan", "Can Aydın", "Deniz Koç"],
    "Korean": ["Kim Min-jun", "Park Ji-woo", "Lee Seo-yeon", "Choi Hyun-woo", "Jung Ha-eun", "Kang Do-hyun",
               "Yoon Soo-ah", "Jang Min-seo", "Lim Jae-won", "Han Ye-jin"],
}  # fmt: skip

TEMPLATES = {
    "start": ["{N} joined the team last spring.", "{N} will present the results on Friday.",
              "{N} moved to Madrid in May."],
    "middle": ["Yesterday {N} reviewed the quarterly budget.", "The committee asked {N} to chair the panel.",
               "I think {N} already signed the lease."],
    "end": ["The award went to {N}.", "The parcel was delivered to {N}.", "Please forward the invoice to {N}."],
    "quotes": ['The note was signed "{N}" at the bottom.', 'The badge on the desk read "{N}".',
               "Her reply began with 'Dear {N}' and little else."],
    "brackets": ["The lead author ({N}) answered questions.", "Two referees (one of them {N}) disagreed."],
    "after comma": ["After the meeting, {N} sent the minutes.", "As agreed, {N} will cover the night shift."],
    "possessive": ["{N}'s application was approved on time.", "We read {N}'s report twice before lunch."],
}  # fmt: skip

CONTROL_TEMPLATES = [
    "{product} sales rose in {month} across {place}.",
    "The {org} office in {place} closes early on {day}.",
    "We upgraded to {product} just before {holiday}.",
    "{place} hosted the {event} in {month}.",
    "Flights from {place} to {place2} were cancelled on {day}.",
    "The {org} report on {topic} comes out in {month}.",
    "Our {product} stopped working after the {month} update.",
    "{day} mornings are busy at the {place} Central Library.",
    "{holiday} falls on a {day} this year, says the {org}.",
    "Prices at the {place} branch of {org} went up in {month}.",
]
CONTROL_WORDS = {
    "product": ["iPhone 15", "Kindle", "Toyota Corolla", "Microsoft Excel", "PlayStation 5",
                "Boeing 787", "Windows 11", "Tesla Model 3", "Adobe Photoshop", "Spotify Premium",
                "Ford Focus", "Dyson vacuum", "Mercedes Sprinter"],
    "place": ["London", "Lagos", "Tokyo", "Madrid", "Istanbul", "Hanoi", "Mumbai", "Cairo", "Moscow", "Shanghai",
              "Lima", "Nairobi", "Seoul", "São Paulo"],
    "month": ["January", "March", "April", "June", "August", "October", "December"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "holiday": ["Christmas", "Ramadan", "Diwali", "Easter", "Thanksgiving", "Lunar New Year", "Hanukkah"],
    "org": ["United Nations", "World Bank", "Red Cross", "Google", "Siemens", "BBC", "Unilever",
            "Stanford University", "Ministry of Health", "City Council"],
    "event": ["Olympics", "World Cup", "Book Fair", "Film Festival", "Grand Prix"],
    "topic": ["Climate Finance", "Malaria", "Trade", "Rural Broadband", "Pensions"],
}  # fmt: skip

_TOKEN = re.compile(r"'s\b|\w+(?:-\w+)*|[^\w\s]")


@dataclass(frozen=True)
class Sentence:
    text: str
    culture: str | None  # None for a control sentence
    position: str | None
    name_span: tuple[int, int] | None  # characters of the planted name


def planted_set(seed: int, sentences_per_name: int, controls: int) -> list[Sentence]:
    rng = random.Random(seed)
    positions = list(TEMPLATES)
    out = []
    for culture, names in NAMES.items():
        for i, name in enumerate(names):
            for k in range(sentences_per_name):
                position = positions[(i * sentences_per_name + k) % len(positions)]  # every position, evenly
                prefix, suffix = rng.choice(TEMPLATES[position]).split("{N}")
                out.append(Sentence(prefix + name + suffix, culture, position, (len(prefix), len(prefix) + len(name))))
    for _ in range(controls):
        words = {key: rng.choice(values) for key, values in CONTROL_WORDS.items()}
        words["place2"] = rng.choice([p for p in CONTROL_WORDS["place"] if p != words["place"]])
        text = rng.choice(CONTROL_TEMPLATES).format(**words)
        out.append(Sentence(text[0].upper() + text[1:], None, None, None))
    rng.shuffle(out)
    return out


def text_outcome(sentence: Sentence, redacted: str) -> tuple[list[bool], list[bool]]:
    """(is a name word, was redacted) for every whitespace-separated word of the sentence."""
    words = list(re.finditer(r"\S+", sentence.text))
    gold = [sentence.name_span is not None and w.start() < sentence.name_span[1] and sentence.name_span[0] < w.end()
            for w in words]  # fmt: skip
    changed = [True] * len(words)
    matcher = difflib.SequenceMatcher(a=[w.group() for w in words], b=redacted.split(), autojunk=False)
    for tag, a0, a1, _, _ in matcher.get_opcodes():
        if tag == "equal":
            changed[a0:a1] = [False] * (a1 - a0)
    return gold, changed


def tokens_of(sentence: Sentence) -> tuple[list[str], list[bool]]:
    tokens = list(_TOKEN.finditer(sentence.text))
    gold = [sentence.name_span is not None and sentence.name_span[0] <= t.start() < sentence.name_span[1]
            for t in tokens]  # fmt: skip
    return [t.group() for t in tokens], gold


@dataclass
class Tally:
    name_tokens: int = 0
    name_tokens_redacted: int = 0
    other_tokens_redacted: int = 0
    names: int = 0
    names_fully_removed: int = 0

    def add(self, gold: list[bool], redacted: list[bool]) -> None:
        self.name_tokens += sum(gold)
        self.name_tokens_redacted += sum(g and r for g, r in zip(gold, redacted, strict=True))
        self.other_tokens_redacted += sum(r and not g for g, r in zip(gold, redacted, strict=True))
        if any(gold):
            self.names += 1
            self.names_fully_removed += all(r for g, r in zip(gold, redacted, strict=True) if g)

    def recall(self) -> float:
        return self.name_tokens_redacted / max(self.name_tokens, 1)

    def precision(self) -> float:
        return self.name_tokens_redacted / max(self.name_tokens_redacted + self.other_tokens_redacted, 1)

    def fully_removed(self) -> float:
        return self.names_fully_removed / max(self.names, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sentences-per-name", type=int, default=4)
    parser.add_argument("--controls", type=int, default=400, help="sentences without a person name")
    args = parser.parse_args()

    sentences = planted_set(args.seed, args.sentences_per_name, args.controls)
    t0 = time.perf_counter()
    engine = ner_engine()
    load_s = time.perf_counter() - t0
    if engine is None:
        raise SystemExit("presidio-analyzer or the spaCy model is not installed: pip install 'fmdist[pii]'.")
    Redactor(entities=("PERSON",)).redact("Warm-up with Jane Doe.")

    results = {}
    false_positives: Counter = Counter()
    for path in ("text", "conll"):
        redactor = Redactor(entities=("PERSON",))
        tallies: dict[str, Tally] = {}
        t0 = time.perf_counter()
        if path == "text":
            outputs = redactor.redact_many([s.text for s in sentences])
        else:
            token_lists = [tokens_of(s) for s in sentences]
            outputs = redactor.redact_tokens([tokens for tokens, _ in token_lists])
        rate = len(sentences) / (time.perf_counter() - t0)
        for i, (sentence, output) in enumerate(zip(sentences, outputs, strict=True)):
            if path == "text":
                gold, redacted = text_outcome(sentence, output)
                words = sentence.text.split()
                false_positives.update(w for w, g, r in zip(words, gold, redacted, strict=True) if r and not g)
            else:
                tokens, gold = token_lists[i]
                redacted = [a != b for a, b in zip(tokens, output, strict=True)]
            for key in (sentence.culture or "controls", f"at {sentence.position}" if sentence.position else None,
                        "all"):  # fmt: skip
                if key is not None:
                    tallies.setdefault(key, Tally()).add(gold, redacted)
        results[path] = (tallies, rate, redactor.counts["PERSON"])

    planted = sum(s.culture is not None for s in sentences)
    print(f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, CPU; {engine.versions}")
    print(f"{planted} planted sentences ({len(NAMES)} cultures x {len(next(iter(NAMES.values())))} names x "
          f"{args.sentences_per_name}), {args.controls} control sentences, seed {args.seed}; engine load "
          f"{load_s:.1f} s (imports included)\n")  # fmt: skip
    text, conll = results["text"][0], results["conll"][0]
    print("| names | planted | text: token recall | text: names fully removed | text: token precision "
          "| CoNLL: token recall | CoNLL: names fully removed | CoNLL: token precision |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    keys = [*NAMES, *sorted(k for k in text if k.startswith("at ")), "all"]
    for key in keys:
        a, b = text[key], conll[key]
        label = f"**{key}**" if key == "all" else key
        print(f"| {label} | {a.names} | {a.recall():.3f} | {a.fully_removed():.3f} | {a.precision():.3f} "
              f"| {b.recall():.3f} | {b.fully_removed():.3f} | {b.precision():.3f} |")  # fmt: skip
    print(f"\ncontrol sentences (no name): words redacted in text {text['controls'].other_tokens_redacted}, "
          f"tokens redacted in CoNLL {conll['controls'].other_tokens_redacted}")  # fmt: skip
    print("words redacted that are not names (text, most frequent): "
          + ", ".join(f"{w} {n}" for w, n in false_positives.most_common(8)))  # fmt: skip
    print(f"sentences/s: text {results['text'][1]:.0f}, CoNLL {results['conll'][1]:.0f} "
          f"(PERSON replacements counted: text {results['text'][2]}, CoNLL {results['conll'][2]})")  # fmt: skip


if __name__ == "__main__":
    main()
