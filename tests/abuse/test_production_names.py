"""A production service refuses a certificate that carries localhost (issue 11, finding 5)."""

from __future__ import annotations

import pytest

from strongroom.dev.devstack import DevStack
from strongroom.errors import FailedPrecondition
from strongroom.pki import WorkloadIdentity
from strongroom.runtime.bootstrap import refuse_loopback_names


def test_a_certificate_with_localhost_is_refused_in_production(stack: DevStack) -> None:
    ca = stack.start_ca()
    with (
        WorkloadIdentity.enrol(
            ca.client(), stack.token("modelstore", ["modelstore", "localhost"]), auto_renew=False
        ) as dev_cert,
        pytest.raises(FailedPrecondition) as info,
    ):
        refuse_loopback_names(dev_cert)
    assert info.value.reason == "LOOPBACK_NAME_IN_PRODUCTION"
    assert "localhost" in info.value.message
    with WorkloadIdentity.enrol(
        ca.client(), stack.token("modelstore", ["modelstore"]), auto_renew=False
    ) as production_cert:
        refuse_loopback_names(production_cert)
