"""The production validator for uploads: ``strongroom.artifact``'s keyless structure validator.

:class:`HeaderAwareValidator` adds :meth:`~HeaderAwareValidator.identity` (name and version as soon
as the header is parsed) so the store can reserve the version and turn away a duplicate upload
after its first few KiB, and it passes the store's size limit down so that a header declaring an
oversized artifact fails before any body byte is accepted.
"""

from __future__ import annotations

from strongroom.artifact import ArtifactSummary, StructureValidator
from strongroom.modelstore.validator import ValidatorFactory


class HeaderAwareValidator:
    """A :class:`strongroom.artifact.StructureValidator` that also reports the model's identity."""

    def __init__(self, *, max_artifact_size: int | None = None) -> None:
        self._inner = StructureValidator(max_artifact_size=max_artifact_size)

    def feed(self, data: bytes, /) -> None:
        """Checks the next bytes (InvalidArtifact / ArtifactTooLarge as soon as they are wrong)."""
        self._inner.feed(data)

    def identity(self) -> tuple[str, str] | None:
        """(name, version) from the header once it has been parsed, else None."""
        header = self._inner.header
        return None if header is None else (header.model_name, header.model_version)

    def finish(self) -> ArtifactSummary:
        """The artifact's summary if its length is exactly what the header implies."""
        return self._inner.finish()


def structure_validator_factory(max_artifact_size: int | None = None) -> ValidatorFactory:
    """The validator factory a production ModelStoreServicer should use.

    Pass the storage's ``max_artifact_size`` so oversized artifacts are refused from the header.
    """

    def make() -> HeaderAwareValidator:
        return HeaderAwareValidator(max_artifact_size=max_artifact_size)

    return make
