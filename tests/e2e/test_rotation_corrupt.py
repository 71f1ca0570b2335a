"""A corrupt index entry does not stop a KEK rotation: ``keys rotate --rewrap-models`` re-wraps every
readable model and names the entry, ``keys disable`` waits for it, ``model ls`` marks it.

Real step-ca, mTLS, SoftHSM2 and model store, on each storage backend (the S3 one on moto's server);
each backend gets a stack of its own, since the corrupt entry would fail other modules' rotations.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from strongroom.artifact import StructureValidator
from strongroom.cli.main import main
from strongroom.dev.devstack import DevStack
from strongroom.dev.devstack.model import train
from strongroom.modelstore.storage import FilesystemStorage
from tests.conftest import stack_root
from tests.e2e.publishing import data_key, put_encrypted
from tests.modelstore import s3server
from tests.modelstore.artifacts import make_artifact
from tests.modelstore.backends import edit_index_entry

KEY = "corrupt-kek"
MODELS = ["c/a", "c/b", "c/c"]
CORRUPT = "c/b"


@pytest.fixture(scope="module", params=["filesystem", "s3"])
def corrupt_stack(
    request: pytest.FixtureRequest,
    step_ca_binary: Path,
    tmp_path_factory: pytest.TempPathFactory,
    simulated_tee_dir: Path,
) -> Iterator[DevStack]:
    """step-ca + key broker + a model store on ``request.param``'s backend."""
    root = stack_root(tmp_path_factory, "corrupt", simulated_tee_dir)
    with DevStack(root, step_ca_binary=step_ca_binary) as dev:
        dev.start_in_process("keybroker")
        if request.param == "filesystem":
            dev.start_in_process("modelstore")
            yield dev
            return
        with s3server.moto_server(tmp_path_factory.mktemp("moto")) as moto:
            secrets = root / "s3-secrets"
            secrets.mkdir(mode=0o700)
            for file, value in (("id", s3server.ACCESS_KEY), ("secret", s3server.SECRET_KEY)):
                (secrets / file).write_text(value)
                (secrets / file).chmod(0o600)
            storage = {
                "backend": "s3",
                "endpoint": moto.endpoint,
                "bucket": s3server.new_bucket(s3server.client(moto.endpoint)),
                "access_key_id_file": str(secrets / "id"),
                "secret_access_key_file": str(secrets / "secret"),
            }
            dev.start_in_process("modelstore", {"storage": storage})
            yield dev


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The command's exit code, standard output and standard error."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_rotation_rewraps_around_a_corrupt_entry_and_disable_waits_for_it(
    corrupt_stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One corrupt index entry (edited or damaged; possibly planted by whoever compromised the
    storage) failed every ListModels page covering it: ``keys rotate --rewrap-models`` re-wrapped
    nothing past it and ``keys disable``'s check could not run, so an operator could not rotate
    after a suspected compromise. Now the rotation re-wraps every readable model, then names the
    entry and exits 1; disabling the old version is refused while the entry is there (it might
    need it) unless the operator, having checked, passes --ignore-corrupt."""
    stack = corrupt_stack
    admin = str(stack.write_client_config("admin"))
    stack.create_release_key(stack.identity("admin"), KEY, policy_version="corrupt-1")
    model = train(tmp_path / "model.onnx")
    for name in MODELS:
        put_encrypted(stack, model.path, name, KEY, data_key(stack, KEY, name))
    storage = stack.services["modelstore"].handle.storage
    edit_index_entry(storage, storage.stat(CORRUPT, "1"), key_version=0)

    code, out, err = cli(capsys, "keys", "rotate", KEY, "--rewrap-models", "--client-config", admin)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith('{"')]
    results = [(line["name"], line["outcome"]) for line in lines if "outcome" in line]
    assert code == 1
    assert results == [("c/a", "rewrapped"), ("c/c", "rewrapped"), (CORRUPT, "corrupt")]
    (corrupt,) = [line for line in lines if line.get("outcome") == "corrupt"]
    assert corrupt["reason"] == "INDEX_CORRUPT" and "key_version" in corrupt["problem"]
    assert lines[-1] == {"key_id": KEY, "current_version": 2, "rewrapped": 2, "corrupt": 1}
    assert f"{CORRUPT} 1" in err and "INDEX_CORRUPT" in err

    code, out, err = cli(capsys, "model", "ls", "c/", "--client-config", admin)
    listed = {line.split("\t")[0]: line for line in out.splitlines()}
    assert code == 0 and sorted(listed) == MODELS
    assert "\tCORRUPT INDEX_CORRUPT: " in listed[CORRUPT]
    assert "CORRUPT" not in listed["c/a"] and "1 index entry marked CORRUPT" in err

    disable = ("keys", "disable", KEY, "--version", "1", "--client-config", admin)
    code, _, err = cli(capsys, *disable)
    assert code == 1
    assert "KEY_VERSION_IN_USE" in err and f"{CORRUPT} 1 (" in err and "--ignore-corrupt" in err
    code, _, _ = cli(capsys, *disable, "--ignore-corrupt")
    assert code == 0

    # Deleted (or restored from a backup), the entry no longer fails the rotation.
    code, _, _ = cli(capsys, "model", "rm", CORRUPT, "1", "--client-config", admin)
    assert code == 0
    code, out, _ = cli(capsys, "keys", "rewrap-models", KEY, "--client-config", admin)
    assert (code, json.loads(out.splitlines()[-1])) == (
        0,
        {"key_id": KEY, "current_version": 2, "current": 2},
    )


# Only a filesystem row can hold a name outside the grammar (S3 listings skip such keys).
@pytest.mark.parametrize("corrupt_stack", ["filesystem"], indirect=True)
def test_model_rm_corrupt_deletes_an_entry_outside_the_name_grammar(
    corrupt_stack: DevStack, capsys: pytest.CaptureFixture[str]
) -> None:
    """A filesystem index row whose name lies outside the name grammar is listed as CORRUPT, but
    ``model rm`` of it failed the request's validation (INVALID_ARGUMENT): only an edit of the
    index could remove it. ``model rm --corrupt`` deletes exactly the entry as listed."""
    storage = corrupt_stack.services["modelstore"].handle.storage
    assert isinstance(storage, FilesystemStorage)
    admin = str(corrupt_stack.write_client_config("admin"))
    storage.put([make_artifact("c/odd", "1", b"x")], StructureValidator())
    with contextlib.closing(sqlite3.connect(storage.root / "index.sqlite3")) as db, db:
        db.execute("UPDATE models SET name = 'c/odd odd' WHERE name = 'c/odd'")
    code, out, _ = cli(capsys, "model", "ls", "c/", "--client-config", admin)
    assert "c/odd odd\t1\t-\t-\t-\tCORRUPT INDEX_CORRUPT: name" in out
    code, _, err = cli(capsys, "model", "rm", "c/odd odd", "1", "--client-config", admin)
    assert code != 0 and "INVALID_MODEL_NAME" in err
    rm = ("model", "rm", "c/odd odd", "1", "--corrupt", "--client-config", admin)
    code, out, _ = cli(capsys, *rm)
    assert (code, out) == (0, "deleted the corrupt index entry c/odd odd/1\n")
    code, out, _ = cli(capsys, "model", "ls", "c/", "--client-config", admin)
    assert "c/odd" not in out


# Only a filesystem row can hold a name outside the grammar (S3 listings skip such keys).
@pytest.mark.parametrize("corrupt_stack", ["filesystem"], indirect=True)
def test_model_rm_corrupt_deletes_an_entry_as_model_ls_prints_it(
    corrupt_stack: DevStack, capsys: pytest.CaptureFixture[str]
) -> None:
    """``model ls`` prints a character that is not printable (a tab, an escape) as its Python
    escape, so that a planted name cannot drive the terminal; ``model rm --corrupt`` sent the
    name as typed, so the entry as printed was NOT_FOUND and could be deleted only by typing the
    raw character. It now deletes the one corrupt entry printed so, and refuses (nothing
    deleted) when several are."""
    storage = corrupt_stack.services["modelstore"].handle.storage
    assert isinstance(storage, FilesystemStorage)
    admin = str(corrupt_stack.write_client_config("admin"))
    for name in ("d/tab", "d/twin", "d/twin2"):
        storage.put([make_artifact(name, "1", b"x")], StructureValidator())
    with contextlib.closing(sqlite3.connect(storage.root / "index.sqlite3")) as db, db:
        db.execute("UPDATE models SET name = 'd/a' || char(9) || 'b' WHERE name = 'd/tab'")
        db.execute("UPDATE models SET name = 'd/c' || char(9) || 'd' WHERE name = 'd/twin'")
        db.execute("UPDATE models SET name = 'd/c\\td' WHERE name = 'd/twin2'")  # literal \t
    code, out, _ = cli(capsys, "model", "ls", "d/", "--client-config", admin)
    assert "d/a\\tb\t1\t-" in out and out.count("d/c\\td\t1\t-") == 2
    rm = ("model", "rm", "d/a\\tb", "1", "--corrupt", "--client-config", admin)
    code, out, _ = cli(capsys, *rm)
    assert (code, out) == (0, "deleted the corrupt index entry d/a\\tb/1\n")
    rm = ("model", "rm", "d/c\\td", "1", "--corrupt", "--client-config", admin)
    code, _, err = cli(capsys, *rm)
    assert code != 0 and "INDEX_ENTRY_AMBIGUOUS" in err
    code, out, _ = cli(capsys, "model", "ls", "d/", "--client-config", admin)
    assert "d/a" not in out and out.count("d/c\\td\t1\t-") == 2
