"""What to tell an operator whose HSM cannot be reached: the causes a first deployment meets.

A PKCS#11 module answers a wrong module path, a SoftHSM2 configuration that is not there and a
mistyped token label with bare codes (``PKCS11Error``, ``GeneralError``, ``NoSuchToken``), and
SoftHSM2 answers a configuration that is a directory with an empty token list: "token not
found", which names the label when the configuration is at fault. These functions name the
setting that is wrong, from what can be seen without the PIN.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pkcs11.exceptions as p11x

#: The variable SoftHSM2 reads its configuration file from.
CONF_VARIABLE = "SOFTHSM2_CONF"
#: At most this many token labels are named.
_LABELS_SHOWN = 8


def module_problem(module_path: Path, error: BaseException) -> str:
    """Why ``module_path`` did not load or initialise, for the message: the loader's own words
    when it could not be loaded (its path and the system's reason, no secret)."""
    if not module_path.is_file():
        state = "is a directory" if module_path.is_dir() else "does not exist"
        return f"keybroker.pkcs11_module {module_path} {state}"
    if isinstance(error, p11x.PKCS11Error) and str(error).startswith("OS exception"):
        return str(error)
    return ""


def softhsm_conf_problem(module_path: Path, module_env: Mapping[str, str]) -> str:
    """What is wrong with the SoftHSM2 configuration the module reads (``keybroker.softhsm2_conf``,
    else, for a SoftHSM2 module, ``$SOFTHSM2_CONF``), or "" when it is a readable file or none
    is set."""
    configured = module_env.get(CONF_VARIABLE)
    if configured is None and "softhsm" not in module_path.name.lower():
        # A vendor's module never reads a $SOFTHSM2_CONF left in the environment: naming it
        # would send the operator to SoftHSM2 for a fault of the vendor's module.
        return ""
    where = "keybroker.softhsm2_conf" if configured is not None else f"${CONF_VARIABLE}"
    path = configured if configured is not None else os.environ.get(CONF_VARIABLE)
    if not path:
        return ""
    conf = Path(path)
    if conf.is_dir():
        return f"{where} {conf} is a directory, not SoftHSM2's configuration file"
    if not conf.is_file():
        return f"{where} {conf} does not exist"
    if not os.access(conf, os.R_OK):
        return f"{where} {conf} is not readable by this process"
    return ""


def present_labels(lib: Any) -> str:
    """The labels of the tokens the module lists, for a "token not found" message."""
    try:
        found = [slot.get_token().label for slot in lib.get_slots(token_present=True)]
    except p11x.PKCS11Error:
        return "the module's tokens could not be listed"
    # SoftHSM2 always lists one token not yet initialised, labelled with blanks.
    labels = sorted(label for label in found if label.strip())
    if not labels:
        return "the module lists no initialised token"
    shown = ", ".join(repr(label) for label in labels[:_LABELS_SHOWN])
    more = f" and {len(labels) - _LABELS_SHOWN} more" if len(labels) > _LABELS_SHOWN else ""
    return f"the module lists {shown}{more}"


def joined(*parts: str) -> str:
    """The non-empty ``parts`` as one clause for a message ("" for none)."""
    kept = [part for part in parts if part]
    return f": {'; '.join(kept)}" if kept else ""
