"""Publishing as the stack's publisher does it with the client (:func:`publish`), and as a key
holder does it by hand: an artifact encrypted under a key from GenerateDataKey (or under another
key, as an attacker or a legacy publisher would), stored with PutModel."""

from __future__ import annotations

from pathlib import Path

from strongroom.api.keybroker.v1 import keybroker_pb2 as kb_pb
from strongroom.api.keybroker.v1 import keybroker_pb2_grpc as kb_grpc
from strongroom.api.modelstore.v1 import modelstore_pb2 as store_pb
from strongroom.api.modelstore.v1 import modelstore_pb2_grpc as store_grpc
from strongroom.artifact import StructureValidator
from strongroom.artifact.format import FORMAT_VERSION
from strongroom.client.publish import publish_model
from strongroom.dev.devstack import DevStack
from strongroom.dev.devstack.publishing import encrypted_pieces
from strongroom.modelstore.service import model_info
from tests.keybroker.helpers import data_key_request


def publish(stack: DevStack, path: Path, name: str, key_id: str, version: str = "1") -> None:
    """Publishes the model at ``path`` as ``name`` ``version`` under ``key_id``, as the stack's
    publisher does (:func:`~strongroom.client.publish.publish_model`)."""
    publisher = stack.identity("publisher")
    publish_model(
        path,
        name=name,
        version=version,
        key_id=key_id,
        broker=stack.channel(publisher, "keybroker"),
        store=stack.channel(publisher, "modelstore"),
    )


def data_key(stack: DevStack, key_id: str, name: str) -> kb_pb.GenerateDataKeyResponse:
    """A data key for ``name`` version 1, as a publisher gets it."""
    broker = kb_grpc.KeyBrokerServiceStub(stack.channel(stack.identity("publisher"), "keybroker"))
    return broker.GenerateDataKey(data_key_request(key_id, (name, "1")), timeout=30)


def put_encrypted(
    stack: DevStack,
    path: Path,
    name: str,
    key_id: str,
    key: kb_pb.GenerateDataKeyResponse,
    *,
    format_version: int = FORMAT_VERSION,
    dek: bytearray | None = None,
) -> store_pb.ModelInfo:
    """Encrypts ``path`` under the data key ``key`` (or ``dek``, which it wipes) and stores it as
    ``name`` version 1 with ``key``'s wrapped key in its slot, as a publisher holding them would.

    An older (unbound) ``format_version`` is one stored before format 3, which PutModel no longer
    takes (modelstore.accept_unbound_uploads): it goes into the store's storage directly, as the
    store it was uploaded to kept it."""
    publisher = stack.identity("publisher")
    pieces = encrypted_pieces(path, name, "1", key_id, key, format_version=format_version, dek=dek)
    if format_version != FORMAT_VERSION:
        storage = stack.services["modelstore"].handle.storage
        return model_info(storage.put(pieces, StructureValidator()))
    store = store_grpc.ModelStoreServiceStub(stack.channel(publisher, "modelstore"))
    return store.PutModel(iter(store_pb.PutModelRequest(data=p) for p in pieces), timeout=30).model
