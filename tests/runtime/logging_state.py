"""What logging keeps of every logger, to compare before and after a configuration (imported by
tests/runtime/test_logs.py and by the fresh interpreter one of its tests runs)."""

from __future__ import annotations

import logging

LOGGER_ATTRIBUTES = {
    "handlers": [],
    "level": logging.NOTSET,
    "filters": [],
    "propagate": True,
    "disabled": False,
}
"""What logging keeps of each logger that a configuration may change, and a new logger's."""


def logging_state() -> dict[tuple[str, str], object]:
    """Each logger's (the root's included) :data:`LOGGER_ATTRIBUTES`, and logging's ``disable``
    level."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    state: dict[tuple[str, str], object] = {("", "disable"): logging.Logger.manager.disable}
    for logger in loggers:
        if isinstance(logger, logging.Logger):  # not a PlaceHolder
            for name in LOGGER_ATTRIBUTES:
                value = getattr(logger, name)
                state[(logger.name, name)] = value[:] if isinstance(value, list) else value
    return state


def changed_between(
    before: dict[tuple[str, str], object], after: dict[tuple[str, str], object]
) -> set[tuple[str, str]]:
    """What differs between two :func:`logging_state`; a logger created in between is compared
    with a new logger's attributes."""
    return {
        key
        for key, value in after.items()
        if before.get(key, LOGGER_ATTRIBUTES.get(key[1])) != value
    }
