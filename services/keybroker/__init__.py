"""Strongroom key broker: HSM-backed key-encryption keys, data keys, attested release and audit.

Library modules (the gRPC servicer lives in ``service.py``):

- :mod:`strongroom.keybroker.hsm` — the PKCS#11 backend (one worker thread, recovery, deadlines)
- :mod:`strongroom.keybroker.keys` — key lifecycle, data keys and release re-wrap (:class:`KeyManager`)
- :mod:`strongroom.oaep` — the negotiated RSA-OAEP hash
- :mod:`strongroom.keybroker.ephemeral` — validation of the TEE's ephemeral RSA public key
- :mod:`strongroom.keybroker.audit` — the hash-chained, signed-head audit log
- :mod:`strongroom.dev.softhsm` — SoftHSM2 tokens for development, tests and the demo
"""
