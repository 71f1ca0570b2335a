"""ListKeys pages against the broker's send limit, with more keys than a test HSM holds quickly.

The servicer runs as it is; only the key inventory behind it is made up (creating 10,000 keys on
SoftHSM2 would take minutes). `tests/e2e/test_key_admin.py` pages a real broker over mTLS.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from strongroom.api.keybroker.v1 import keybroker_pb2 as pb
from strongroom.keybroker.keys import KeyInfo, KeyState, KeyVersionInfo
from strongroom.keybroker.service import MESSAGE_LIMITS, KeyAdminServicer

WHEN = datetime(2026, 12, 1, tzinfo=UTC)


class _Inventory:
    def __init__(self, keys: int, versions: int) -> None:
        self.keys = [
            KeyInfo(
                f"model-key-{i:06d}",
                tuple(KeyVersionInfo(v, KeyState.ENABLED, WHEN) for v in range(1, versions + 1)),
            )
            for i in range(keys)
        ]

    def list_keys(self) -> list[KeyInfo]:
        return list(reversed(self.keys))  # the HSM's order is no order

    def policy_version(self, key_id: str) -> str:
        return "2026-12-01.1"


def _walk(servicer: KeyAdminServicer, page_size: int = 0) -> list[pb.ListKeysResponse]:
    pages, token = [], ""
    while True:
        request = pb.ListKeysRequest(page_size=page_size, page_token=token)
        page = servicer.ListKeys(request, context=None)  # type: ignore[arg-type]
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages


@pytest.mark.parametrize(("keys", "versions"), [(10_000, 1), (300, 400)], ids=["many", "deep"])
def test_every_page_fits_the_send_limit_and_every_key_is_listed_once(
    keys: int, versions: int
) -> None:
    inventory = _Inventory(keys, versions)
    servicer = KeyAdminServicer(inventory)  # type: ignore[arg-type]
    pages = _walk(servicer)
    assert max(page.ByteSize() for page in pages) < MESSAGE_LIMITS.send
    listed = [k.key_id for page in pages for k in page.keys]
    assert listed == sorted(k.key_id for k in inventory.keys)


def test_page_size_is_honoured() -> None:
    servicer = KeyAdminServicer(_Inventory(7, 1))  # type: ignore[arg-type]
    sizes: list[Any] = [len(page.keys) for page in _walk(servicer, page_size=3)]
    assert sizes == [3, 3, 1]
