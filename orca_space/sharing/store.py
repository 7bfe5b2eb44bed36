"""Conversation links' snapshots in SQLite, by unguessable id. Pure: the standard library only.

One file in the data directory, in WAL mode so that reading a link never waits for someone
creating one. Each operation opens its own connection: gradio runs handlers on a pool of
threads, and a connection costs far less than the request around it. Writes take the write
lock at once (`BEGIN IMMEDIATE`), so the check against the total size and the insert that
follows it cannot interleave with another writer's.

The schema is versioned (`PRAGMA user_version`) and created on first use, never at start-up:
a locked, damaged or unwritable database is a `StoreUnavailable` for that one request, with
a sentence a visitor can read (the log names the file), and everything else keeps working.
After a failure the schema is checked again on the next use, so a damaged file that the owner
moves aside is replaced by a fresh one without a restart.

An id is 128 random bits and nothing lists them. The delete token is kept only as its SHA-256,
so a copy of the file cannot delete anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DB_FILENAME = "conversation-links.sqlite3"
SPACES_PERSISTENT_MOUNT = Path("/data")  # where a Space's persistent storage is mounted
ID_BYTES = 16  # 128 random bits
TOKEN_BYTES = 24
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")  # token_urlsafe(16)
DEFAULT_MAX_SNAPSHOT_BYTES = 1 << 20  # as an imported file
DEFAULT_MAX_TOTAL_BYTES = 1 << 30
BUSY_TIMEOUT_S = 5.0

SCHEMA_VERSION = 1
# MIGRATIONS[n] takes the schema from version n - 1 to n; each runs in one transaction.
MIGRATIONS: Mapping[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE links (
            id TEXT PRIMARY KEY,
            delete_hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL,
            size INTEGER NOT NULL,
            snapshot TEXT NOT NULL
        )""",
        "CREATE INDEX links_by_expiry ON links (expires_at) WHERE expires_at IS NOT NULL",
        # The snapshots' total size, kept by triggers so that the limit costs one row's read.
        "CREATE TABLE usage (bytes INTEGER NOT NULL)",
        "INSERT INTO usage (bytes) VALUES (0)",
        "CREATE TRIGGER count_new AFTER INSERT ON links BEGIN UPDATE usage SET bytes = bytes + NEW.size; END",
        "CREATE TRIGGER count_gone AFTER DELETE ON links BEGIN UPDATE usage SET bytes = bytes - OLD.size; END",
    ),
}

# What a visitor reads when the database cannot be used, by SQLite's primary error name.
BUSY = "the conversation-link database is busy (another process holds its lock); try again in a moment"
UNAVAILABLE = {
    "SQLITE_BUSY": BUSY,
    "SQLITE_LOCKED": BUSY,
    "SQLITE_CORRUPT": "the conversation-link database is damaged; its owner must move the file aside",
    "SQLITE_NOTADB": "the conversation-link database is damaged (not an SQLite file); its owner must move it aside",
    "SQLITE_FULL": "the disk that keeps conversation links is full",
}
CANNOT_WRITE = "the conversation-link database cannot be opened or written (see the app's log)"
NEWER_SCHEMA = "the conversation-link database was written by a newer version of this app"


class LinkError(Exception):
    """A conversation link could not be made, read or deleted; the message says why, for a visitor."""


class LinkRefused(LinkError):
    """Refused by a limit (too large, the store full, too many links): nothing was stored."""


class StoreUnavailable(LinkError):
    """The database cannot be used now (locked, damaged, unwritable): nothing changed."""


@dataclass(frozen=True)
class StoreLimits:
    max_snapshot_bytes: int = DEFAULT_MAX_SNAPSHOT_BYTES
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    expiry_s: float | None = None  # None: links last until deleted

    def __post_init__(self) -> None:
        if self.max_snapshot_bytes < 1:
            raise ValueError("max_snapshot_bytes must be at least 1")
        if self.max_total_bytes < 1:
            raise ValueError("max_total_bytes must be at least 1")
        if self.expiry_s is not None and not self.expiry_s > 0:
            raise ValueError("expiry_s must be positive, or None for no expiry")


@dataclass(frozen=True)
class NewLink:
    id: str
    delete_token: str  # shown to the sharer once; only its hash is stored
    created_at: float  # Unix time
    expires_at: float | None


@dataclass(frozen=True)
class StoredLink:
    id: str
    snapshot: str
    created_at: float
    expires_at: float | None


def default_data_dir(environ: Mapping[str, str], spaces_mount: Path = SPACES_PERSISTENT_MOUNT) -> Path:
    """Where the app keeps its data: a Space's persistent storage when it has some (mounted at
    /data; without it, a Space's disk is wiped on every restart), else the user's cache."""
    if environ.get("SPACE_ID") and spaces_mount.is_dir() and os.access(spaces_mount, os.W_OK):
        return spaces_mount / "orca-space"
    cache = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(cache) / "orca-space"


def is_link_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class LinkStore:
    """Snapshots by id in the SQLite file `path` (created with its folder on first use)."""

    def __init__(
        self,
        path: Path,
        limits: StoreLimits | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
    ) -> None:
        self.path = Path(path)
        self.limits = limits or StoreLimits()
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._schema_lock = threading.Lock()
        self._schema_ready = False

    def create(self, snapshot: str) -> NewLink:
        """Store `snapshot`; LinkRefused if it is too large or the store is full."""
        size = len(snapshot.encode("utf-8"))
        if size > self.limits.max_snapshot_bytes:
            raise LinkRefused(
                f"the conversation is {readable_size(size)}; a conversation link holds at most "
                f"{readable_size(self.limits.max_snapshot_bytes)}"
            )
        now = self._clock()
        expiry = self.limits.expiry_s
        link = NewLink(
            id=secrets.token_urlsafe(ID_BYTES),
            delete_token=secrets.token_urlsafe(TOKEN_BYTES),
            created_at=now,
            expires_at=None if expiry is None else now + expiry,
        )
        with self._writing() as db:
            expired = delete_expired(db, now)
            (used,) = db.execute("SELECT bytes FROM usage").fetchone()
            if used + size > self.limits.max_total_bytes:
                raise LinkRefused(
                    "this app's store of conversation links is full; no link was made "
                    "(its owner can raise --links-max-mb or delete old links)"
                )
            db.execute(
                "INSERT INTO links (id, delete_hash, created_at, expires_at, size, snapshot) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (link.id, token_hash(link.delete_token), now, link.expires_at, size, snapshot),
            )
        if expired:
            self._checkpoint()  # as after a delete: no expired text left in the log
        return link

    def purge_expired(self) -> int:
        """Delete every expired link, its text gone from the files as after a delete; how many.
        Nothing, not even a file, while there is no database yet (see the module docstring)."""
        if not self.path.exists():
            return 0
        with self._writing() as db:
            expired = delete_expired(db, self._clock())
        if expired:
            self._checkpoint()
        return expired

    def get(self, link_id: object) -> StoredLink | None:
        """The link's snapshot, or None: no such link (deleted, expired, or a wrong id)."""
        if not is_link_id(link_id):
            return None
        with self._reading() as db:
            row = db.execute(
                "SELECT snapshot, created_at, expires_at FROM links "
                "WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)",
                (link_id, self._clock()),
            ).fetchone()
        return None if row is None else StoredLink(link_id, *row)

    def delete(self, link_id: object, delete_token: object) -> bool:
        """Delete the link if the token is its own; False (nothing deleted) otherwise."""
        if not is_link_id(link_id) or not isinstance(delete_token, str) or not delete_token:
            return False
        with self._writing() as db:
            row = db.execute("SELECT delete_hash FROM links WHERE id = ?", (link_id,)).fetchone()
            if row is None or not hmac.compare_digest(row[0], token_hash(delete_token.strip())):
                return False
            db.execute("DELETE FROM links WHERE id = ?", (link_id,))
        self._checkpoint()
        return True

    def _checkpoint(self) -> None:
        """Copy the write-ahead log into the database and empty it. secure_delete overwrites a
        deleted snapshot in the database's pages, but its text stays in the -wal file (where the
        insert wrote it) for as long as any connection keeps the log open; a busy checkpoint
        (a reader in the middle of a read) leaves it to the next one."""
        with self._connection() as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()

    def used_bytes(self) -> int:
        """The snapshots' total size, expired ones included until they are purged."""
        with self._reading() as db:
            return db.execute("SELECT bytes FROM usage").fetchone()[0]

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as db:
            yield db

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection with the schema in place; SQLite's failures become StoreUnavailable."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Readable by the app's user only; SQLite gives its -wal and -shm files the same mode.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise self._unavailable(exc) from None
        try:
            # A deleted snapshot's text is overwritten, not left in free pages (some builds' default).
            db.execute("PRAGMA secure_delete = ON")
            self._ensure_schema(db)
            yield db
        except sqlite3.Error as exc:
            self._schema_ready = False  # check again next time: the file may have been replaced
            raise self._unavailable(exc) from None
        finally:
            db.close()

    def _ensure_schema(self, db: sqlite3.Connection) -> None:
        if self._schema_ready:
            return
        with self._schema_lock:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                log.error("%s has schema version %d; this app knows %d", self.path, version, SCHEMA_VERSION)
                raise StoreUnavailable(NEWER_SCHEMA)
            if version < SCHEMA_VERSION:
                self._use_wal(db)
                self._migrate(db)
            self._schema_ready = True

    def _use_wal(self, db: sqlite3.Connection) -> None:
        """Switch the file to WAL (kept in the file, for every connection after). The switch
        reads the file, then upgrades to a write; SQLite refuses that upgrade at once with
        SQLITE_BUSY, without its busy handler, while another connection writes (20 sessions
        sharing first on a fresh file): so wait here, as the handler would, up to its timeout."""
        deadline = time.monotonic() + self._busy_timeout_s
        pause = 0.001
        while True:
            try:
                db.execute("PRAGMA journal_mode = WAL").fetchone()
                return
            except sqlite3.OperationalError as exc:
                busy = (getattr(exc, "sqlite_errorname", "") or "").startswith("SQLITE_BUSY")
                if not busy or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _migrate(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have migrated meanwhile.
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        if version < SCHEMA_VERSION:
            log.info("conversation links: %s at schema version %d", self.path, SCHEMA_VERSION)

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        name = getattr(exc, "sqlite_errorname", "") or ""
        reason = next((text for code, text in UNAVAILABLE.items() if name.startswith(code)), CANNOT_WRITE)
        log.error("conversation links: %s: %s (%s)", self.path, exc, name or type(exc).__name__)
        return StoreUnavailable(reason)


def delete_expired(db: sqlite3.Connection, now: float) -> int:
    return db.execute("DELETE FROM links WHERE expires_at <= ?", (now,)).rowcount


def readable_size(size: int) -> str:
    return f"{size / 1024:,.0f} KB" if size < 1 << 20 else f"{size / (1 << 20):,.1f} MB"
