"""Classification of python-pkcs11 exceptions into device failures, stale handles and the rest."""

from __future__ import annotations

import pkcs11.exceptions as p11x
import pytest

from strongroom.keybroker import _pkcs11_errors as errs


@pytest.mark.parametrize(
    "exc",
    [
        p11x.DeviceRemoved(),
        p11x.DeviceError(),
        p11x.TokenNotPresent(),
        p11x.SessionHandleInvalid(),
        p11x.SessionClosed(),
        p11x.UserNotLoggedIn(),
        p11x.PKCS11Error("Initialisation error (not initialized). Should never see this."),
    ],
)
def test_device_failures(exc: p11x.PKCS11Error) -> None:
    assert errs.is_device_failure(exc)
    assert not errs.is_stale_handle(exc)


@pytest.mark.parametrize(
    "exc", [p11x.WrappedKeyInvalid(), p11x.AttributeSensitive(), p11x.GeneralError()]
)
def test_not_device_failures(exc: p11x.PKCS11Error) -> None:
    # CKR_GENERAL_ERROR is ambiguous on SoftHSM2: the caller probes the token before deciding.
    assert not errs.is_device_failure(exc)


def test_stale_handles() -> None:
    assert errs.is_stale_handle(p11x.UnwrappingKeyHandleInvalid())
    assert errs.is_stale_handle(p11x.ObjectHandleInvalid())


def test_unmapped_codes() -> None:
    exc = p11x.PKCS11Error("Unmapped error code 0x68")
    assert errs.return_code(exc) == errs.CKR_KEY_FUNCTION_NOT_PERMITTED
    assert errs.is_function_not_permitted(exc)
    assert errs.describe(exc) == "PKCS11Error(CKR 0x68)"
    assert errs.return_code(p11x.GeneralError()) is None
    assert errs.describe(p11x.GeneralError()) == "GeneralError"
