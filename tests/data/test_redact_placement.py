"""Every detector of `fmdist prepare --redact` against the places a value sits in real text.

Each value is planted at the end of a sentence, in brackets, in quotes, after punctuation and next to
another value, and the whole output is compared: the value is gone, the placeholder is there, and the
punctuation around it is kept. Names run through the real Presidio + spaCy engine (loaded once per
test process).
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from fmdist.data.deid import PLACEHOLDERS, Redactor

# Two values of each kind: the one planted, and a second one for "next to a value of the same kind".
VALUES = {
    "EMAIL": ("jane.doe@example.com", "r.smith+ml@mail.example.org"),
    "URL": ("https://intranet.example.com/patients?id=77", "www.example.net/profile"),
    "IPv4": ("10.231.97.48", "192.168.0.1"),
    "IPv6": ("2001:db8::8a2e:370:7334", "fe80::1"),
    "CREDIT_CARD": ("4111 1111 1111 1111", "5500-0000-0000-0004"),  # Luhn-valid test numbers
    "PHONE": ("+1 415-555-0132", "(212) 555-0187"),
    "PERSON": ("Thomas Ashworth", "Maria Garcia"),
}
KIND = {"IPv4": "IP", "IPv6": "IP"}
# For "next to a value of another kind": an IP beside everything but IPs, an e-mail beside IPs.
NEIGHBOURS = {
    kind: ("jane.doe@example.com", "EMAIL") if kind.startswith("IP") else ("10.0.0.7", "IP") for kind in VALUES
}

PLACEMENTS = {
    "end of sentence": "The request came from {v}.",
    "end of a question": "Was it really {v}?",
    "round brackets": "The sender ({v}) was blocked.",
    "square brackets": "Flagged by the filter [{v}] twice.",
    "double quotes": 'The form said "{v}" in the field.',
    "single quotes": "The form said '{v}' in the field.",
    "after a colon": "Reported by: {v}",
    "between dashes": "Owner - {v} - on file.",
    "after a comma, no space": "As agreed,{v} will be told.",
    "next to the same kind, comma": "Both {v},{o} were listed.",
    "next to the same kind, comma and space": "Both {v}, {o} were listed.",
    "before another kind": "Seen by {v} {n} yesterday.",
    "after another kind": "Seen by {n} {v} yesterday.",
    "another kind after a comma": "Seen by {v},{n} yesterday.",
}
# Where the whole output differs from the template's, and how many values are counted. Both are merged
# values that leak nothing: a comma is legal inside a URL, so a value glued to a URL by one is taken into
# the URL; and two names glued by a bare comma read as one name.
EXPECTED = {
    ("URL", "another kind after a comma"): ("Seen by <URL> yesterday.", 1),
    ("PERSON", "next to the same kind, comma"): ("Both <PERSON> were listed.", 1),
}


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    redactor = Redactor(entities=("PERSON",))
    redactor.redact("Warm up the engine with Jane Doe.")  # loads Presidio + spaCy once for the module
    return redactor


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("kind", list(VALUES))
def test_every_detector_in_every_placement(redactor, kind, placement):
    value, other = VALUES[kind]
    neighbour, neighbour_kind = NEIGHBOURS[kind]
    template = PLACEMENTS[placement]
    placeholder = PLACEHOLDERS[KIND.get(kind, kind)]
    redactor.counts.clear()

    out = redactor.redact(template.format(v=value, o=other, n=neighbour))

    expected = template.format(v=placeholder, o=placeholder, n=PLACEHOLDERS[neighbour_kind])
    expected_count = template.count("{v}") + template.count("{o}")
    expected, expected_count = EXPECTED.get((kind, placement), (expected, expected_count))
    assert out == expected
    assert redactor.counts[KIND.get(kind, kind)] == expected_count, redactor.counts


def test_ipv4_at_the_end_of_a_sentence_is_redacted():
    # The leak found in the issue: 400 of 400 addresses before a full stop went through.
    rng = random.Random(0)
    addresses = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(400)]
    out = Redactor().redact_many([f"The connection came from {a}." for a in addresses])

    assert out == ["The connection came from <IP>."] * 400


@pytest.mark.parametrize(
    "text",
    [
        "Upgraded to version 2.4.1.10.3 today.",  # a longer dotted number is not an address
        "Build 1.2.3.4.5 passed.",
        "Sections 10.0.0.1.5 and 3.1.4.1.5.9 apply.",
        "It ran 10.0.0.256 times.",  # four dotted numbers, but not an IPv4 address
        "Model 2001:db8::zz is not an address.",
    ],
)
def test_dotted_numbers_that_are_not_addresses_are_kept(text):
    assert Redactor().redact(text) == text


def test_an_ip_after_an_ellipsis_is_redacted():
    assert Redactor().redact("It came from...10.0.0.1, then 10.0.0.2...") == "It came from...<IP>, then <IP>..."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Card 4111 1111 1111 1111 123 (the CVV).", "Card <CREDIT_CARD> 123 (the CVV)."),
        ("Ref 12 4111111111111111 was paid.", "Ref 12 <CREDIT_CARD> was paid."),
        ("Card 4111 1111 1111 1112 is invalid.", "Card 4111 1111 1111 1112 is invalid."),  # fails the Luhn check
        # "18 4111 1111 1111 1111" passes the Luhn check too: the IP must be taken first.
        ("From 10.0.0.18 4111 1111 1111 1111.", "From <IP> <CREDIT_CARD>."),
    ],
)
def test_card_numbers_are_found_among_the_digits_around_them(text, expected):
    assert Redactor().redact(text) == expected
