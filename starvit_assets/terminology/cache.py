"""A bounded, persistent cache of terminology answers: SQLite, least recently used evicted.

Terminology answers are keyed by (server, operation, input Parameters) and change only when
the server's content changes, so they are kept between runs (under ``$STARVIT_HOME/state``)
for ``max_age_seconds`` and never more than ``max_entries``. SQLite rather than a JSON file: a
write is one transaction, so a crash or two processes never leave a torn cache. The values are
answers about codes (no patient data), the only thing a terminology call carries.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MAX_AGE_SECONDS = 30 * 86_400


def cache_key(server: str, operation: str, request: Any) -> str:
    canonical = json.dumps([server, operation, request], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class ResponseCache:
    def __init__(
        self,
        path: Path,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1:
            raise ValueError("the terminology cache needs max_entries of at least 1")
        self.path = path
        self.max_entries = max_entries
        self.max_age_seconds = max_age_seconds
        self._clock = clock
        self._use = 0.0
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as connection, connection:
            connection.execute(
                "create table if not exists answers (key text primary key, value text not null, "
                "stored_at real not null, used_at real not null)"
            )
            connection.execute("create index if not exists answers_used on answers (used_at)")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def _tick(self) -> float:
        # Strictly increasing use stamps: two uses in one clock tick keep their order.
        self._use = max(self._clock(), self._use + 1e-6)
        return self._use

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        if not keys:
            return {}
        oldest = self._clock() - self.max_age_seconds
        found: dict[str, Any] = {}
        with closing(self._connect()) as connection, connection:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = connection.execute(
                    f"select key, value from answers where key in ({marks}) and stored_at >= ?",
                    (*chunk, oldest),
                ).fetchall()
                for key, value in rows:
                    found[key] = json.loads(value)
            connection.executemany(
                "update answers set used_at = ? where key = ?",
                [(self._tick(), key) for key in keys if key in found],
            )
        return found

    def get(self, key: str) -> Any | None:
        return self.get_many([key]).get(key)

    def put_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> None:
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        if not pairs:
            return
        now = self._clock()
        with closing(self._connect()) as connection, connection:
            connection.executemany(
                "insert into answers (key, value, stored_at, used_at) values (?, ?, ?, ?) "
                "on conflict (key) do update set value = excluded.value, "
                "stored_at = excluded.stored_at, used_at = excluded.used_at",
                [(key, json.dumps(value), now, self._tick()) for key, value in pairs],
            )
            connection.execute(
                "delete from answers where key in (select key from answers "
                "order by used_at desc limit -1 offset ?)",
                (self.max_entries,),
            )

    def put(self, key: str, value: Any) -> None:
        self.put_many([(key, value)])

    def __len__(self) -> int:
        with closing(self._connect()) as connection:
            row = connection.execute("select count(*) from answers").fetchone()
        return int(row[0])
