"""The embedded queue: one SQLite file under the state dir, so accepted requests survive a
restart. Opened on first use (a gateway that never defers creates no file); several processes on
one machine may share the file: a claim is one UPDATE, atomic under SQLite's write lock."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from gateway.deferred.job import Job
from gateway.deferred.queue import DeferredQueue, QueueUnavailable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  client TEXT NOT NULL,
  idem TEXT NOT NULL,
  spec BLOB NOT NULL,
  status TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  due REAL NOT NULL,
  owner TEXT,
  target TEXT,
  result BLOB,
  error BLOB,
  completed REAL,
  callback TEXT,
  expires REAL NOT NULL,
  UNIQUE (client, idem)
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (status, due);
"""
_COLUMNS = "id, spec, status, attempts, target, result, error, completed, callback"


def _job(row: tuple[Any, ...]) -> Job:
    job_id, spec, status, attempts, target, result, error, completed, callback = row
    return Job.from_spec(job_id, spec, status=status, attempts=attempts, target=target,
                         result=orjson.loads(result) if result else None,
                         error=orjson.loads(error) if error else None, completed=completed, callback=callback)


class SqliteQueue(DeferredQueue):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a 202 promises the request is on disk
            db.executescript(_SCHEMA)
            self.path.chmod(0o600)
            self._db = db
        return self._db

    async def _run(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock:
                return fn(self._conn(), *args)

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.Error as exc:
            raise QueueUnavailable(f"deferred queue {self.path}: {type(exc).__name__}") from None

    async def submit(self, job: Job, retention_s: float) -> Job:
        def run(db: sqlite3.Connection) -> Job:
            now = time.time()
            db.execute("DELETE FROM jobs WHERE expires < ?", (now,))
            cur = db.execute(
                "INSERT INTO jobs (id, client, idem, spec, status, due, expires) VALUES (?, ?, ?, ?, 'queued', ?, ?) "
                "ON CONFLICT (client, idem) DO NOTHING",
                (job.id, job.client or "", job.idempotency_key, job.spec(), now, now + retention_s))
            if cur.rowcount == 1:
                return job
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE client = ? AND idem = ?",
                             (job.client or "", job.idempotency_key)).fetchone()
            return _job(row)

        return await self._run(run)

    async def get(self, job_id: str) -> Job | None:
        if self._db is None and not self.path.exists():
            return None

        def run(db: sqlite3.Connection) -> Job | None:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ? AND expires >= ?",
                             (job_id, time.time())).fetchone()
            return _job(row) if row else None

        return await self._run(run)

    async def claim(self, owner: str, lease_s: float) -> Job | None:
        def run(db: sqlite3.Connection) -> Job | None:
            now = time.time()
            row = db.execute(
                f"UPDATE jobs SET status = 'in_progress', owner = ?, due = ? WHERE id = ("
                f" SELECT id FROM jobs WHERE status IN ('queued', 'in_progress') AND due <= ? AND expires >= ?"
                f" ORDER BY due LIMIT 1) RETURNING {_COLUMNS}",
                (owner, now + lease_s, now, now)).fetchone()
            return _job(row) if row else None

        return await self._run(run)

    async def release(self, job: Job, owner: str, delay_s: float, attempted: bool,
                      error: dict[str, Any] | None = None) -> None:
        def run(db: sqlite3.Connection) -> None:
            db.execute("UPDATE jobs SET status = 'queued', owner = NULL, due = ?, attempts = attempts + ?, "
                       "error = ? WHERE id = ? AND owner = ? AND status = 'in_progress'",
                       (time.time() + delay_s, int(attempted), orjson.dumps(error) if error else None, job.id, owner))

        await self._run(run)

    async def finish(self, job: Job, owner: str, retention_s: float) -> bool:
        def run(db: sqlite3.Connection) -> bool:
            now = time.time()
            cur = db.execute(
                "UPDATE jobs SET status = ?, owner = NULL, attempts = ?, target = ?, result = ?, error = ?, "
                "completed = ?, callback = ?, expires = ? WHERE id = ? AND owner = ? AND status = 'in_progress'",
                (job.status, job.attempts, job.target, orjson.dumps(job.result) if job.result is not None else None,
                 orjson.dumps(job.error) if job.error else None, job.completed, job.callback, now + retention_s,
                 job.id, owner))
            return cur.rowcount == 1

        return bool(await self._run(run))

    async def set_callback(self, job_id: str, state: str) -> None:
        await self._run(lambda db: db.execute("UPDATE jobs SET callback = ? WHERE id = ?", (state, job_id)))

    async def pending(self) -> bool:
        if self._db is None and not self.path.exists():
            return False

        def run(db: sqlite3.Connection) -> bool:
            return db.execute("SELECT 1 FROM jobs WHERE status IN ('queued', 'in_progress') AND expires >= ? "
                              "LIMIT 1", (time.time(),)).fetchone() is not None

        return bool(await self._run(run))

    async def aclose(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
