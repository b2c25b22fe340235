"""Privacy redaction (seed 002 §4.1.2): personal data and secrets replaced by typed placeholders.

Each detector is a regular expression plus, where the format has one, a checksum (Luhn for
payment cards, ISO 7064 mod 11-2 for Chinese resident IDs, mod 97 for IBAN), so that version
numbers, dates, ISBNs and hashes in code are left alone. Order matters: secrets and credential
URLs first (they contain e-mail-like and digit runs), phone numbers last (the loosest pattern).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable

import regex

# Boundaries in ASCII terms: "身份证号110105..." has a Han character (a \w) right before the digits.
_B = r"(?<![0-9A-Za-z_.+-])"  # left: not inside a word, number, dotted name or signed value
_E = r"(?![0-9A-Za-z_-]|\.[0-9A-Za-z])"  # right


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of payment card numbers (ISO/IEC 7812-1)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def china_id_ok(number: str) -> bool:
    """GB 11643-1999: 17 digits (region, birth date YYYYMMDD, sequence) and an ISO 7064 MOD 11-2
    check character."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    total = sum(int(d) * w for d, w in zip(number[:17], weights))
    month, day = int(number[10:12]), int(number[12:14])
    if not (1 <= month <= 12 and 1 <= day <= 31 and number[6:8] in ("18", "19", "20")):
        return False
    return "10X98765432"[total % 11] == number[17].upper()


def iban_ok(iban: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters to numbers, mod 97 == 1."""
    s = iban.replace(" ", "").upper()
    s = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in s)) % 97 == 1


def ssn_ok(ssn: str) -> bool:
    """US SSA rules: area not 000, 666 or 9xx; group not 00; serial not 0000."""
    area, group, serial = ssn.split("-")
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _card_ok(match: str) -> bool:
    digits = regex.sub(r"[ -]", "", match)
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _ip_ok(match: str) -> bool:
    try:
        ip = ipaddress.ip_address(match)
    except ValueError:
        return False
    # "::" alone or "1::" is too likely to be something else (C++ scopes, Rust paths).
    return ip.version == 4 or match.count(":") >= 3


# (type, pattern, validator): the first matching detector wins at a position.
DETECTORS: list[tuple[str, str, Callable[[str], bool] | None]] = [
    (
        "PRIVATE_KEY",
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
        None,
    ),
    (
        "SECRET",
        r"\b(?:AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36}|sk-[A-Za-z0-9_-]{20,}"
        r"|xox[abpr]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|sk_live_[0-9a-zA-Z]{24,})\b",
        None,
    ),
    ("URL_CREDENTIALS", r"\b[a-z][a-z0-9+.-]*://[^\s:/@]+:[^\s/@]+@[^\s]+", None),
    ("EMAIL", _B + r"[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b", None),
    ("IBAN", r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", iban_ok),
    (
        "CN_ID",
        _B + r"[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])\d{2}\d{3}[\dXx]" + _E,
        china_id_ok,
    ),
    ("CARD", _B + r"\d(?:[ -]?\d){12,18}" + _E, _card_ok),
    ("US_SSN", _B + r"\d{3}-\d{2}-\d{4}" + _E, ssn_ok),
    (
        "IP",
        _B
        + r"(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)"
        + _E
        + r"|(?<![\w:])(?:[0-9a-fA-F]{1,4}:){1,7}(?::|(?::[0-9a-fA-F]{1,4}){1,6}|[0-9a-fA-F]{1,4})"
        + r"(?![\w:])",
        _ip_ok,
    ),  # fmt: skip
    # Chinese mobile: 1[3-9]X XXXX XXXX, optionally +86; international: + country code and 7-14
    # more digits in groups. Bare digit runs without "+" are not phone numbers here (too many
    # false positives: counts, IDs, timestamps).
    (
        "PHONE",
        _B + r"(?:(?:\+?86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}"
        r"|\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}\d"
        r"|\(\d{3}\) ?\d{3}-\d{4})" + _E,
        lambda m: 9 <= sum(c.isdigit() for c in m) <= 15,
    ),
]
_ALL = regex.compile("|".join(f"(?P<{name}>{p})" for name, p, _ in DETECTORS))
_VALIDATE = {name: check for name, _, check in DETECTORS}


def redact(text: str, types: set[str] | None = None) -> tuple[str, Counter]:
    """`text` with each detected item replaced by `<TYPE>`, and the count per type."""
    counts: Counter = Counter()

    def replace(m: regex.Match) -> str:
        name = m.lastgroup
        value = m.group()
        check = _VALIDATE[name]
        if (types is not None and name not in types) or (check and not check(value)):
            return value
        counts[name] += 1
        return f"<{name}>"

    return _ALL.sub(replace, text), counts


class PIIRedactor:
    """Pipeline step: redact in place, counts per type in `meta["pii"]` and the stats."""

    def __init__(self, types: list[str] | None = None) -> None:
        known = [name for name, _, _ in DETECTORS]
        for t in types or []:
            if t not in known:
                raise ValueError(f"unknown PII type {t!r}; known: {', '.join(known)}")
        self.types = set(types) if types else None

    def __call__(self, doc: dict) -> str | None:
        doc["text"], counts = redact(doc["text"], self.types)
        if counts:
            doc["meta"]["pii"] = dict(counts)
        return None
