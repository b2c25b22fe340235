"""PII redaction: each type found and replaced, checksums enforced, near-misses left alone."""

import pytest

from lmforge.data.pii import PIIRedactor, china_id_ok, iban_ok, luhn_ok, redact

FOUND = [
    ("write to jane.doe+news@mail.example.co.uk today", "EMAIL"),
    ("call +1 415-555-2671 now", "PHONE"),
    ("mobile 13812345678", "PHONE"),
    ("手机：+86 139-1234-5678。", "PHONE"),
    ("host 192.168.10.254 is down", "IP"),
    ("v6 2001:db8:85a3::8a2e:370:7334 up", "IP"),
    ("card 4111 1111 1111 1111 exp", "CARD"),
    ("card 5500-0000-0000-0004.", "CARD"),
    ("身份证号11010519491231002X", "CN_ID"),
    ("SSN 123-45-6789 on file", "US_SSN"),
    ("IBAN DE89 3704 0044 0532 0130 00 please", "IBAN"),
    ("aws AKIAIOSFODNN7EXAMPLE key", "SECRET"),
    ("token ghp_" + "a" * 36, "SECRET"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "PRIVATE_KEY"),
    ("db postgres://admin:s3cret@db.internal:5432/app", "URL_CREDENTIALS"),
]

NEAR_MISSES = [
    "Python 3.11.2 and numpy 1.26.4 were released",  # versions look like IPs
    "released on 2024-01-15 at 12:30:45",  # dates and times
    "ISBN 978-3-16-148410-0",  # ISBN-13 with hyphens
    "ISBN 9783161484100",  # 13 digits but fails Luhn
    "commit 4f2a1b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f90",  # a git hash
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "card 4111 1111 1111 1112",  # fails Luhn
    "id 110105194912310021",  # wrong checksum
    "ssn 000-12-3456",  # invalid area number
    "std::vector<int> and a::b::c in C++",  # not IPv6
    "IP 256.1.1.1 out of range",
    "order number 20240115123456789",
    "see https://example.com/path?q=1 for details",
    "user@localhost is not an e-mail address",
    "the ratio was 1234567890 to one",
]


@pytest.mark.parametrize("text,kind", FOUND)
def test_detects_and_replaces_with_typed_placeholder(text, kind):
    out, counts = redact(text)
    assert counts == {kind: 1}, (out, counts)
    assert f"<{kind}>" in out


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_are_not_redacted(text):
    assert redact(text) == (text, {})


def test_checksums_written_out():
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")  # the textbook example
    assert china_id_ok("11010519491231002X") and not china_id_ok("110105194912310021")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")


def test_redactor_step_counts_and_type_selection():
    d = {"text": "a@b.com and c@d.org, 10.0.0.1", "meta": {}}
    assert PIIRedactor()(d) is None
    assert d["text"] == "<EMAIL> and <EMAIL>, <IP>"
    assert d["meta"]["pii"] == {"EMAIL": 2, "IP": 1}
    d = {"text": "a@b.com 10.0.0.1", "meta": {}}
    PIIRedactor(types=["IP"])(d)
    assert d["text"] == "a@b.com <IP>"
    with pytest.raises(ValueError, match="unknown PII type 'PHONES'"):
        PIIRedactor(types=["PHONES"])
