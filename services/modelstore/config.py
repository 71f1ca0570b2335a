"""The model store's own configuration section (``modelstore:``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from strongroom.modelstore.limits import DEFAULT_MAX_ARTIFACT_SIZE
from strongroom.runtime.config import ConfigError


@dataclass(frozen=True)
class ModelstoreConfig:
    """Where artifacts are stored and how large one may be."""

    data_dir: Path
    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_SIZE

    def __post_init__(self) -> None:
        if self.max_artifact_bytes < 1024:
            raise ConfigError("modelstore.max_artifact_bytes must be at least 1024")
