"""``--header-sha256``: the pin of a model version that ``model publish`` printed."""

from __future__ import annotations

import argparse

from strongroom.identifiers import is_sha256_hex


def header_pin(text: str) -> bytes:
    """The digest as bytes, if ``text`` is 64 lower-case hex digits (as ``model publish`` prints
    ``header_sha256``). Anything else is a usage error here, rather than a pin that could never
    match (or a traceback)."""
    if not is_sha256_hex(text):
        raise argparse.ArgumentTypeError(
            f"{text[:80]!r} is not a header SHA-256: 64 lower-case hexadecimal digits, as "
            "`strongroom model publish` prints header_sha256"
        )
    return bytes.fromhex(text)


def add_header_pin_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """Adds ``--header-sha256 HEX`` (None when not given); ``what`` says what refuses another
    artifact."""
    parser.add_argument(
        "--header-sha256",
        type=header_pin,
        metavar="HEX",
        help="pin the artifact (a multi-part model's manifest) by the header_sha256 `model "
        "publish` printed: any other artifact the store serves for this name and version (an "
        f"older one published again) is refused by {what} with HEADER_PIN_MISMATCH before a key "
        "is released",
    )
