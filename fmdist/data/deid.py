"""De-identification: replace personal data in text with typed placeholders before anything is written.

What is detected, and by what:
- e-mail addresses, URLs and IP addresses (v4 and v6): regular expressions (their syntax is regular);
- credit-card numbers: 13-19 digit runs that pass the Luhn check (others are left: they are not cards);
- phone numbers: Google's libphonenumber (the `phonenumbers` package), in international form and in
  the national form of `phone_regions`;
- person names: not detected. The well-kept detectors (presidio, scrubadub-spacy) need a spaCy NER
  model, and none is installable offline here; the manifest says so rather than implying names were
  removed.

The original values never leave this module: only counts per type are returned.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field

import phonenumbers

PLACEHOLDERS = {
    "EMAIL": "<EMAIL>",
    "URL": "<URL>",
    "IP": "<IP>",
    "CREDIT_CARD": "<CREDIT_CARD>",
    "PHONE": "<PHONE>",
}
NAMES_NOT_DETECTED = (
    "person names are not detected: presidio/scrubadub need a spaCy NER model, which is not installable offline"
)

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"']+[^\s<>\"'.,;:!?)\]]")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")


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


@dataclass
class Redactor:
    """Replaces personal data with placeholders and counts what it replaced, per type."""

    phone_regions: tuple[str, ...] = ("US", "GB")
    counts: Counter = field(default_factory=Counter)

    def _sub(self, pattern: re.Pattern, kind: str, text: str, accept=None) -> str:
        def repl(m: re.Match) -> str:
            if accept is not None and not accept(m.group(0)):
                return m.group(0)
            self.counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(repl, text)

    def _phones(self, text: str) -> str:
        for region in self.phone_regions:
            spans = [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, region)]
            for start, end in reversed(spans):
                self.counts["PHONE"] += 1
                text = text[:start] + PLACEHOLDERS["PHONE"] + text[end:]
        return text

    def redact(self, text: str) -> str:
        """`text` with every detected value replaced; order matters (URLs hold e-mails and IPs)."""
        if not text:
            return text
        text = self._sub(_EMAIL, "EMAIL", text)
        text = self._sub(_URL, "URL", text)
        text = self._sub(_CARD, "CREDIT_CARD", text, accept=lambda s: luhn_valid(re.sub(r"\D", "", s)))
        text = self._sub(_IPV4, "IP", text, accept=_is_ip)
        text = self._sub(_IPV6, "IP", text, accept=_is_ip)
        return self._phones(text)

    def report(self) -> dict:
        """What went into the manifest: counts per type and what is not covered."""
        return {
            "enabled": True,
            "replaced": {kind: self.counts.get(kind, 0) for kind in PLACEHOLDERS},
            "placeholders": PLACEHOLDERS,
            "not_covered": [NAMES_NOT_DETECTED],
        }
