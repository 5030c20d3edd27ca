"""API keys: peppered digests, 401 for every bad header, atomic reload, and no key material in reprs."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import auth, keys, protocol
from gateway.auth import KeyFileError, KeyRecord, KeyStore
from gateway.errors import GatewayError
from gateway.relay import Call
from gateway.router import Router
from gateway.settings import Routing

PEPPER = b"test-pepper-0123456789abcdef"


class Issued:
    """Keys issued into one keys file, the way an operator would with ``gateway.keys``."""

    def __init__(self, path: Path):
        self.path = path
        self.keys: dict[str, str] = {}
        self.entries: dict[str, str] = {}

    def issue(self, record: KeyRecord, pepper: bytes = PEPPER) -> str:
        key = auth.new_key(record.key_id)
        self.keys[record.key_id] = key
        self.entries[record.key_id] = auth.render_entry(record, auth.key_digest(pepper, key))
        self.write()
        return key

    def revoke(self, key_id: str) -> None:
        del self.entries[key_id]
        self.write()

    def write(self) -> None:
        self.path.write_text("\n".join(self.entries.values()))


@pytest.fixture
def issued(tmp_path) -> Issued:
    return Issued(tmp_path / "keys.jsonl")


def bearer(key: str) -> bytes:
    return b"Bearer " + key.encode()


def secret_part(key: str) -> str:
    return key[len("sk-egw-team-a-"):]


def rejection(store: KeyStore, header: bytes | None) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        store.authenticate(header)
    return info.value


def test_issued_key_authenticates_to_its_record(issued):
    record = KeyRecord(key_id="team-a", rpm=60, tpm=20000, concurrency=8, default_class="batch",
                       models=frozenset({"m1", "m2"}))
    key = issued.issue(record)
    store = KeyStore.load(str(issued.path), PEPPER)
    assert store.authenticate(bearer(key)) == record


def test_keys_file_holds_the_hmac_sha256_of_the_key_under_the_pepper_and_not_the_key(issued):
    key = issued.issue(KeyRecord(key_id="team-a"))
    text = issued.path.read_text()
    assert hmac.new(PEPPER, key.encode(), hashlib.sha256).hexdigest() in text
    assert key not in text and secret_part(key) not in text


@given(pepper=st.binary(max_size=200), message=st.binary(max_size=300))
def test_peppered_hash_is_hmac_sha256(pepper, message):
    assert auth.PepperedHash(pepper)(message) == hmac.new(pepper, message, hashlib.sha256).digest()


def test_a_key_issued_under_another_pepper_is_rejected(issued):
    key = issued.issue(KeyRecord(key_id="team-a"), pepper=b"some-other-pepper-000000")
    store = KeyStore.load(str(issued.path), PEPPER)
    assert rejection(store, bearer(key)).kind.code == "invalid_api_key"


@pytest.mark.parametrize("header", [
    None, b"", b"   ", b"Bearer", b"Bearer ", b"Basic dXNlcjpwYXNz", b"sk-egw-team-a-xyz",
    b"Token sk-egw-team-a-xyz", b"Bearer " + b"x" * (auth.MAX_KEY_BYTES + 1), b"Bearer \xff\xfe\x00",
])
def test_missing_or_malformed_authorization_gets_401_invalid_api_key(issued, header):
    issued.issue(KeyRecord(key_id="team-a"))
    error = rejection(KeyStore.load(str(issued.path), PEPPER), header)
    assert error.kind.status == 401
    assert (error.kind.type, error.kind.code) == ("authentication_error", "invalid_api_key")
    assert (b"www-authenticate", b"Bearer") in error.headers()


def test_wrong_key_sharing_all_but_the_last_bytes_of_a_valid_key_is_rejected(issued):
    key = issued.issue(KeyRecord(key_id="team-a"))
    near = key[:-1] + ("A" if key[-1] != "A" else "B")
    error = rejection(KeyStore.load(str(issued.path), PEPPER), bearer(near))
    assert error.kind.code == "invalid_api_key"
    assert near not in error.message and key not in error.message


@given(st.binary(max_size=600))
def test_no_arbitrary_header_authenticates_and_every_one_is_refused_as_401(header):
    valid = auth.PepperedHash(PEPPER)(b"sk-egw-only-valid")
    store = KeyStore(None, PEPPER, {valid: KeyRecord(key_id="only")})
    assert rejection(store, header).kind.status == 401


def test_bearer_scheme_is_case_insensitive_and_surrounding_spaces_are_ignored(issued):
    key = issued.issue(KeyRecord(key_id="team-a"))
    store = KeyStore.load(str(issued.path), PEPPER)
    assert store.authenticate(b"  bearer   " + key.encode() + b"  ").key_id == "team-a"
    assert store.authenticate(b"BEARER " + key.encode()).key_id == "team-a"


def test_revoked_key_is_rejected_after_one_reload_and_new_key_accepted(issued):
    old = issued.issue(KeyRecord(key_id="old"))
    store = KeyStore.load(str(issued.path), PEPPER)
    assert store.authenticate(bearer(old)).key_id == "old"
    issued.revoke("old")
    new = issued.issue(KeyRecord(key_id="new"))
    assert store.authenticate(bearer(old)).key_id == "old"  # nothing changes before the reload
    changes = store.reload()
    assert (changes.added, changes.removed, changes.changed, changes.total) == (["new"], ["old"], [], 1)
    assert rejection(store, bearer(old)).kind.code == "invalid_api_key"
    assert store.authenticate(bearer(new)).key_id == "new"


def test_reload_reports_changed_limits_and_rotated_keys_and_applies_them(issued):
    issued.issue(KeyRecord(key_id="limits", rpm=60))
    rotated_old = issued.issue(KeyRecord(key_id="rotated"))
    issued.issue(KeyRecord(key_id="same"))
    store = KeyStore.load(str(issued.path), PEPPER)
    limits_key = issued.keys["limits"]
    issued.entries["limits"] = auth.render_entry(KeyRecord(key_id="limits", rpm=30),
                                                 auth.key_digest(PEPPER, limits_key))
    rotated_new = issued.issue(KeyRecord(key_id="rotated"))
    changes = store.reload()
    assert changes.changed == ["limits", "rotated"] and not changes.added and not changes.removed
    assert store.authenticate(bearer(limits_key)).rpm == 30
    assert rejection(store, bearer(rotated_old)).kind.code == "invalid_api_key"
    assert store.authenticate(bearer(rotated_new)).key_id == "rotated"


def test_reload_of_a_broken_file_keeps_the_previous_table(issued):
    key = issued.issue(KeyRecord(key_id="team-a"))
    store = KeyStore.load(str(issued.path), PEPPER)
    issued.path.write_text('{"id": "team-a", "digest": "not hex"}\n')
    with pytest.raises(KeyFileError, match="keys"):
        store.reload()
    assert store.authenticate(bearer(key)).key_id == "team-a"


GOOD = '{"id": "a", "digest": "%s"}' % ("ab" * 32)


@pytest.mark.parametrize("text, problem", [
    (GOOD + "\n" + GOOD.replace("ab", "cd"), r":2 \(id 'a'\): duplicate id"),
    (GOOD + "\n" + GOOD.replace('"a"', '"b"'), "same digest"),
    (GOOD.replace("}", ', "models": []}'), "models"),
    (GOOD.replace("}", ', "rpm": 0}'), "rpm"),
    (GOOD.replace("}", ', "role": "root"}'), "role"),
    (GOOD.replace("}", ', "key": "sk-plain"}'), "key"),
    (GOOD.replace('"a"', '"a b"'), "id"),
    (GOOD.replace("ab", "zz"), "digest"),
    ("# comment\n\n" + GOOD[:-1], ":3: invalid key entry"),
])
def test_invalid_keys_file_is_refused_with_a_message_naming_the_problem(tmp_path, text, problem):
    path = tmp_path / "keys.jsonl"
    path.write_text(text)
    with pytest.raises(KeyFileError, match=problem):
        KeyStore.load(str(path), PEPPER)


def test_short_or_missing_pepper_is_refused(issued):
    issued.issue(KeyRecord(key_id="team-a"))
    with pytest.raises(KeyFileError, match="pepper"):
        KeyStore.load(str(issued.path), b"short")
    with pytest.raises(KeyFileError, match="MY_PEPPER"):
        auth.pepper_from_env("MY_PEPPER", {})
    assert auth.pepper_from_env("MY_PEPPER", {"MY_PEPPER": PEPPER.decode()}) == PEPPER


def test_disabled_store_lets_everyone_in_as_anonymous_with_no_limits():
    store = KeyStore.disabled()
    record = store.authenticate(None)
    assert record is auth.ANONYMOUS and not store.enabled
    assert (record.rpm, record.tpm, record.concurrency, record.models) == (None, None, None, None)
    record.check_model("any-model")
    record.check_admin()
    with pytest.raises(KeyFileError):
        store.reload()


def test_model_outside_the_allowed_list_gets_the_unknown_model_answer_byte_for_byte():
    record = KeyRecord(key_id="team-a", models=frozenset({"m1"}))
    record.check_model("m1")
    with pytest.raises(GatewayError) as not_allowed:
        record.check_model("secret-model")
    decoded = protocol.decode_completion(b'{"model": "secret-model", "prompt": "hi"}')
    with pytest.raises(GatewayError) as unknown:
        Router([], Routing()).route(Call("completions", b"/v1/completions", b"rid", 0.0), {}.get, decoded, "",
                                    "interactive")
    assert not_allowed.value.kind == unknown.value.kind
    assert not_allowed.value.body() == unknown.value.body()
    assert not_allowed.value.headers() == unknown.value.headers()


def test_star_in_models_allows_every_model_and_default_class_comes_from_the_file(issued):
    key = issued.issue(KeyRecord(key_id="batchy", default_class="batch"))
    assert '"models":["*"]' in issued.path.read_text()
    record = KeyStore.load(str(issued.path), PEPPER).authenticate(bearer(key))
    assert record.models is None and record.default_class == "batch"
    record.check_model("whatever")


def test_user_key_is_refused_403_by_admin_check_and_admin_key_passes():
    with pytest.raises(GatewayError) as info:
        KeyRecord(key_id="u").check_admin()
    assert (info.value.kind.status, info.value.kind.type) == (403, "permission_error")
    KeyRecord(key_id="a", role="admin").check_admin()


def test_records_stores_and_errors_show_no_key_digest_or_pepper(issued):
    key = issued.issue(KeyRecord(key_id="team-a", rpm=60))
    digest = auth.key_digest(PEPPER, key)
    store = KeyStore.load(str(issued.path), PEPPER)
    record = store.authenticate(bearer(key))
    wrong = rejection(store, bearer(key + "x"))
    shown = " ".join([repr(record), str(record), f"{record}", repr(store), str(wrong), wrong.body().decode()])
    assert "team-a" in shown
    for secret in (key, secret_part(key), digest, PEPPER.decode()):
        assert secret not in shown


def test_new_keys_are_unique_prefixed_and_carry_256_random_bits():
    issued = {auth.new_key("team-a") for _ in range(100)}
    assert len(issued) == 100
    for key in issued:
        assert key.startswith("sk-egw-team-a-") and len(key) >= len("sk-egw-team-a-") + 43
    with pytest.raises(ValueError):
        auth.new_key("not a valid id")


def test_keys_cli_prints_the_key_once_and_an_entry_that_authenticates_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(auth.PEPPER_ENV, PEPPER.decode())
    assert keys.main(["new", "--id", "team-a", "--rpm", "60", "--tpm", "20000", "--concurrency", "8",
                      "--models", "m1, m2", "--class", "batch"]) == 0
    out = capsys.readouterr().out
    key, comment, entry = out.split("\n", 2)
    assert comment.startswith("#")
    assert out.count(key) == 1
    path = tmp_path / "keys.jsonl"
    path.write_text(comment + "\n" + entry)  # the comment line may go in the file too
    record = KeyStore.load(str(path), PEPPER).authenticate(bearer(key))
    assert record == KeyRecord(key_id="team-a", rpm=60, tpm=20000, concurrency=8, default_class="batch",
                               models=frozenset({"m1", "m2"}))


def test_keys_cli_append_writes_only_the_entry_to_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(auth.PEPPER_ENV, PEPPER.decode())
    path = tmp_path / "keys.jsonl"
    for key_id in ("a", "b"):
        keys.main(["new", "--id", key_id, "--role", "admin", "--append", str(path)])
    printed = capsys.readouterr().out.split()  # nothing but the two keys
    assert len(printed) == 2
    store = KeyStore.load(str(path), PEPPER)
    assert [store.authenticate(bearer(k)).key_id for k in printed] == ["a", "b"]
    assert not any(k in path.read_text() for k in printed)


def test_keys_cli_refuses_bad_limits_and_a_missing_pepper(capsys, monkeypatch):
    monkeypatch.delenv(auth.PEPPER_ENV, raising=False)
    with pytest.raises(SystemExit):
        keys.main(["new", "--id", "team-a"])
    assert auth.PEPPER_ENV in capsys.readouterr().err
    monkeypatch.setenv(auth.PEPPER_ENV, PEPPER.decode())
    with pytest.raises(SystemExit):
        keys.main(["new", "--id", "team-a", "--rpm", "0"])
    assert "rpm" in capsys.readouterr().err
