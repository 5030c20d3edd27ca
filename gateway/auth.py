"""API keys: a table of peppered digests, one keyed lookup per request, atomic reload.

**What is stored.** The keys file is JSON lines, one key per line (blank lines and ``#`` comments
are skipped)::

    {"id": "team-a", "digest": "<hex HMAC-SHA256(pepper, key)>", "role": "user", "rpm": 60,
     "tpm": 20000, "concurrency": 8, "default_class": "interactive", "models": ["*"]}

Limits left out are unlimited; ``models: ["*"]`` (or no ``models``) allows every model. One line per key
makes revoking a key deleting a line, and parsing costs about 2 us a line (a TOML file of 1 000
keys took 100 ms to parse, long enough to stall the event loop on every reload). The pepper is a
server secret that comes from an environment variable, never from the file, so a leaked keys file
cannot be brute-forced offline and cannot be used to log in. Plain keys are never stored or held in
memory beyond the one request that presents them; they are printed once, by
``python -m gateway.keys new``.

**Verification, and why it is constant-time enough.** ``authenticate`` computes the HMAC of the
presented key and looks the 32-byte digest up in a dict. The HMAC's two pad blocks are hashed once,
when the pepper is set (the precomputation RFC 2104 section 4 describes), so a request pays for two
copies of a SHA-256 state and two short updates: about 1 us, against 2 to 3 us for ``hmac.digest``,
which redoes the key schedule every call. Its duration depends only on the presented key's *length*,
which the client chose. The dict hashes the digest with SipHash (time independent of content) and
compares bytes only when a slot holds an entry with the same 64-bit hash. Keys are random (256 bits),
so the digest of a wrong key is a pseudo-random string nobody can steer without the pepper: a wrong
key that shares 30 bytes with a valid one produces a digest no closer to any stored digest than a
random key's does. So the lookup's timing carries no information about how close a guess is, which is
the property a scan with ``hmac.compare_digest`` over every key would give, at O(1) instead of
O(keys). What the timing can tell (hit or miss) is what the 401 says anyway.

**Reload.** ``reload()`` parses the whole file into a new dict and then replaces the table with one
attribute assignment; a request sees either the old table or the new one, never a mix. A file that
fails to parse leaves the old table in place, so a typo, or a line caught half-written, cannot lock
every client out (an emptied file is a valid file, though: replace the file by rename when editing it
wholesale). A revoked key is therefore rejected by the first request after one successful reload.
The parse touches no shared state until the swap, so it may run in a worker thread.

**Auth off.** With no keys file configured, :meth:`KeyStore.disabled` accepts every request as the
anonymous record: no limits, every model, role ``admin``. The network then is the only guard, on the
public listener and on the admin listener (which binds to loopback by default).

**Logging.** This module logs nothing. A :class:`KeyRecord` prints as its key id and policy; it never
holds the key or its digest, so logging a record cannot leak either. Error messages never echo the
presented key.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from typing import Annotated, Literal

import msgspec

from gateway.errors import GatewayError, model_not_found

PEPPER_ENV = "EDGE_GATEWAY_KEY_PEPPER"
MIN_PEPPER_BYTES = 16
KEY_PREFIX = "sk-egw-"
# Longer than any key we issue by far; bounds the HMAC work an unauthenticated client can ask for.
MAX_KEY_BYTES = 512

KeyId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
PerMinute = Annotated[int, msgspec.Meta(ge=1)]
KeyRole = Literal["user", "admin"]
TrafficClass = Literal["interactive", "batch"]


class KeyFileError(ValueError):
    """The keys file (or the pepper) cannot be used; the message names the file and the entry."""


class KeyRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What the gateway knows about an authenticated caller. Limits left out (None) are unlimited.

    ``burst_requests`` / ``burst_tokens`` size the token buckets; they default to one minute's worth.
    ``models`` of None means every model the gateway serves.
    """

    key_id: KeyId = msgspec.field(name="id")
    role: KeyRole = "user"
    rpm: PerMinute | None = None
    tpm: PerMinute | None = None
    concurrency: PerMinute | None = None
    burst_requests: PerMinute | None = None
    burst_tokens: PerMinute | None = None
    default_class: TrafficClass = "interactive"
    models: frozenset[str] | None = None

    def __repr__(self) -> str:
        # Explicit, so a field added later cannot end up in logs by accident.
        return (f"KeyRecord(id={self.key_id!r}, role={self.role!r}, rpm={self.rpm}, tpm={self.tpm}, "
                f"concurrency={self.concurrency}, class={self.default_class!r})")

    __str__ = __repr__

    @property
    def limited(self) -> bool:
        """Whether any per-key limit applies; an unlimited key skips the limiter entirely."""
        return self.rpm is not None or self.tpm is not None or self.concurrency is not None

    def check_model(self, model: str) -> None:
        """Refuse a model this key may not use with the very answer an unknown model gets
        (see ``router.py``), so a key cannot probe which models exist."""
        if self.models is not None and model not in self.models:
            raise model_not_found(model)

    def check_admin(self) -> None:
        if self.role != "admin":
            raise GatewayError("permission_denied", "this API key may not use the admin API")


class _Entry(KeyRecord, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One line of the keys file: a record plus the digest that finds it."""

    digest: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}$")]
    # The file spells "every model" as ["*"]; records spell it None.
    models: list[str] | None = None  # type: ignore[assignment]


ANONYMOUS = KeyRecord(key_id="anonymous", role="admin")


class KeyChanges(msgspec.Struct, frozen=True):
    """What a reload changed, by key id (for the admin API's answer and its audit line)."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    total: int


class KeyStore:
    """The key table. ``authenticate`` runs on every request; ``reload`` on SIGHUP or an admin call."""

    def __init__(self, path: str | None, pepper: bytes, table: dict[bytes, KeyRecord] | None):
        self.path = path
        self._digest = PepperedHash(pepper)
        self._table = table  # None: authentication is off

    @classmethod
    def load(cls, path: str, pepper: bytes) -> KeyStore:
        if len(pepper) < MIN_PEPPER_BYTES:
            raise KeyFileError(f"the key pepper must be at least {MIN_PEPPER_BYTES} bytes")
        return cls(path, pepper, _read_table(path))

    @classmethod
    def disabled(cls) -> KeyStore:
        return cls(None, b"", None)

    @property
    def enabled(self) -> bool:
        return self._table is not None

    def __len__(self) -> int:
        return len(self._table) if self._table is not None else 0

    def __repr__(self) -> str:
        return f"KeyStore(path={self.path!r}, keys={len(self)})" if self.enabled else "KeyStore(disabled)"

    def reload(self) -> KeyChanges:
        """Re-read the keys file and swap the table in one step; on any error keep the old table
        and raise :class:`KeyFileError`."""
        if self.path is None or self._table is None:
            raise KeyFileError("authentication is off: there is no keys file to reload")
        new = _read_table(self.path)
        # A rotated digest under the same id counts as changed: the old key stops working.
        before = {r.key_id: (d, r) for d, r in self._table.items()}
        after = {r.key_id: (d, r) for d, r in new.items()}
        self._table = new
        return KeyChanges(added=sorted(after.keys() - before.keys()),
                          removed=sorted(before.keys() - after.keys()),
                          changed=sorted(i for i in after.keys() & before.keys() if after[i] != before[i]),
                          total=len(new))

    def authenticate(self, authorization: bytes | None) -> KeyRecord:
        """The record of the key in an ``Authorization: Bearer <key>`` header value, or
        ``GatewayError("invalid_api_key")``. Constant-time in the sense of the module docstring."""
        table = self._table
        if table is None:
            return ANONYMOUS
        if not authorization:
            raise GatewayError("invalid_api_key", "Missing API key: send `Authorization: Bearer <key>`.")
        scheme, _, key = authorization.strip().partition(b" ")
        key = key.strip()
        if scheme.lower() != b"bearer" or not key or len(key) > MAX_KEY_BYTES:
            raise GatewayError("invalid_api_key", "Malformed Authorization header: expected `Bearer <key>`.")
        record = table.get(self._digest(key))
        if record is None:
            raise GatewayError("invalid_api_key", "Incorrect API key provided.")
        return record


class PepperedHash:
    """HMAC-SHA256 under one fixed key (the pepper), with both pad blocks absorbed up front."""

    __slots__ = ("_inner", "_outer")
    _BLOCK = 64  # SHA-256's block size

    def __init__(self, pepper: bytes):
        if len(pepper) > self._BLOCK:
            pepper = hashlib.sha256(pepper).digest()
        block = pepper.ljust(self._BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def __call__(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def __repr__(self) -> str:
        return "PepperedHash(<secret>)"


def key_digest(pepper: bytes, key: str) -> str:
    """The hex digest the keys file stores for ``key``."""
    return PepperedHash(pepper)(key.encode()).hex()


def new_key(key_id: str) -> str:
    """A fresh key: the public id (for humans reading their config) and 256 random bits."""
    msgspec.convert({"id": key_id}, KeyRecord)  # same id rule as the keys file
    return f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


def pepper_from_env(name: str = PEPPER_ENV, environ: dict[str, str] | None = None) -> bytes:
    value = (os.environ if environ is None else environ).get(name, "")
    if len(value.encode()) < MIN_PEPPER_BYTES:
        raise KeyFileError(f"environment variable {name} must hold the key pepper "
                           f"(at least {MIN_PEPPER_BYTES} bytes; `python -m gateway.keys pepper` makes one)")
    return value.encode()


def render_entry(record: KeyRecord, digest: str) -> str:
    """The keys-file line that :meth:`KeyStore.load` reads back as ``record``."""
    fields = msgspec.structs.asdict(record)
    line: dict[str, object] = {"id": fields.pop("key_id"), "digest": digest}
    line.update((name, value) for name, value in fields.items() if value is not None)
    line["models"] = ["*"] if record.models is None else sorted(record.models)
    return msgspec.json.encode(line).decode() + "\n"


_entry_decoder = msgspec.json.Decoder(_Entry)


def _read_table(path: str) -> dict[bytes, KeyRecord]:
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise KeyFileError(f"cannot read keys file {path}: {e}") from None
    table: dict[bytes, KeyRecord] = {}
    ids: set[str] = set()
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            entry = _entry_decoder.decode(line)
        except msgspec.DecodeError as e:  # ValidationError included
            raise KeyFileError(f"{path}:{number}: invalid key entry: {e}") from None
        where = f"{path}:{number} (id {entry.key_id!r})"
        if entry.key_id in ids:
            raise KeyFileError(f"{where}: duplicate id")
        ids.add(entry.key_id)
        digest = bytes.fromhex(entry.digest)
        if digest in table:
            raise KeyFileError(f"{where}: same digest as key {table[digest].key_id!r}")
        if entry.models is not None and not entry.models:
            raise KeyFileError(f"{where}: `models` is empty; use [\"*\"] for every model")
        fields = msgspec.structs.asdict(entry)
        del fields["digest"]
        fields["models"] = None if entry.models is None or "*" in entry.models else frozenset(entry.models)
        table[digest] = KeyRecord(**fields)
    return table
