"""The registry: one SQLite file of experiments, models, results and predictions.

Nothing is ever overwritten: a rerun adds a result row, a new prediction adds a prediction
row. WAL mode + a busy timeout + one IMMEDIATE transaction per write let two processes
register and evaluate at the same time without losing anything. A wait for another process's
lock is never silent: after QUIET_WAIT_S it is said on stderr, after LOCK_WAIT_S it is an error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from scalelab.config import UserError
from scalelab.track.metrics import HIGHER_IS_BETTER, comparison

DEFAULT_PATH = "scalelab-registry.db"
QUIET_WAIT_S = 5  # writers hold the lock for milliseconds; longer means one is stuck
LOCK_WAIT_S = 60
SCHEMA_VERSION = 1
JSON_COLUMNS = {"metrics": dict, "samples": list, "detail": dict}  # the JSON each one holds
SCHEMA = """
CREATE TABLE scalelab_registry (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE experiments (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, task TEXT NOT NULL,
    metric TEXT NOT NULL, threshold REAL NOT NULL, note TEXT NOT NULL DEFAULT '',
    created TEXT NOT NULL);
CREATE TABLE history (
    id INTEGER PRIMARY KEY, experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    time TEXT NOT NULL, event TEXT NOT NULL);
CREATE TABLE models (
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, path TEXT NOT NULL, kind TEXT NOT NULL,
    params INTEGER NOT NULL, non_embedding_params INTEGER NOT NULL,
    tokens INTEGER, flops REAL, val_loss REAL, lineage TEXT NOT NULL DEFAULT 'base',
    parent TEXT, created TEXT NOT NULL);
CREATE TABLE results (
    id INTEGER PRIMARY KEY, experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    model_id INTEGER NOT NULL REFERENCES models(id), metrics TEXT NOT NULL,
    passed INTEGER NOT NULL, samples TEXT NOT NULL, n_items INTEGER NOT NULL,
    seconds REAL NOT NULL, code_version TEXT NOT NULL, time TEXT NOT NULL);
CREATE TABLE predictions (
    id INTEGER PRIMARY KEY, experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    axis TEXT NOT NULL, n_models INTEGER NOT NULL, last_model_id INTEGER NOT NULL,
    largest REAL NOT NULL, metric TEXT NOT NULL, level REAL NOT NULL,
    predicted REAL, low REAL, high REAL, detail TEXT NOT NULL, time TEXT NOT NULL);
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def code_version() -> str:
    """`git describe` of the scalelab checkout, else the installed package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    from importlib.metadata import PackageNotFoundError, version
    try:
        return "scalelab " + version("scalelab")
    except PackageNotFoundError:
        return "unknown"


def insert(db: sqlite3.Connection, table: str, row: dict) -> int:
    """INSERT one row given as {column: value}; returns its id."""
    cur = db.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES "
                     f"({', '.join('?' * len(row))})", list(row.values()))
    return cur.lastrowid


def is_locked(e: sqlite3.OperationalError) -> bool:
    return "locked" in str(e)  # SQLITE_BUSY's message (error codes need Python 3.11)


def registry_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("SCALELAB_REGISTRY") or DEFAULT_PATH)


def check_path(path: Path) -> None:
    """A registry can live (or be made) at `path`; checked without writing anything."""
    if path.is_dir():
        raise UserError(f"{path}: registry path is a folder, expected a file")
    if not path.parent.exists():
        raise UserError(f"{path}: folder {path.parent} does not exist")


class Registry:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_path(self.path)
        self._refuse_emptied()
        try:
            checked = self.path.exists() and self.path.stat().st_size > 0 and \
                self._checked_read_only()
            self.db = sqlite3.connect(self.path, timeout=QUIET_WAIT_S, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self._check_or_create(checked)
        except sqlite3.OperationalError as e:
            if not is_locked(e):
                raise UserError(f"{self.path}: not a scalelab registry ({e})") from None
            raise UserError(
                f"{self.path}: another process held a lock on it for {QUIET_WAIT_S} s while it "
                "was opened. If the file was cut short or replaced while in use, restore it "
                "from a backup; else end that process (an SQLite tool with a transaction "
                "open?) and run this again") from None
        except sqlite3.DatabaseError as e:
            raise UserError(f"{self.path}: not a scalelab registry ({e})") from None

    def _refuse_emptied(self) -> None:
        """An empty registry beside a non-empty -wal was cut short (or replaced) while in use.
        SQLite would take it for a new database and delete the -wal, which holds the latest
        writes, or, while another process still has it open, first wait out the busy timeout.
        The -wal is measured first: in normal use it has frames only once the main file has
        its header, so this cannot misfire on a registry another process is creating."""
        wal = Path(f"{self.path}-wal")
        wal_bytes = wal.stat().st_size if wal.exists() else 0
        if wal_bytes and self.path.exists() and self.path.stat().st_size == 0:
            raise UserError(
                f"{self.path}: the registry file is empty but {wal.name} ({wal_bytes} bytes) "
                "beside it holds its latest writes: it was cut short or replaced while in use. "
                f"Nothing was changed. Restore {self.path.name} from a backup, or to start a "
                f"new registry here rename {wal.name} and {self.path.name}-shm aside")

    def _checked_read_only(self) -> bool:
        """Check an existing file through a read-only connection first: closing a writable
        one on a damaged file would checkpoint the -wal into it and delete the -wal. False
        where read-only cannot tell (a hot journal left by a crash needs a writer)."""
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=QUIET_WAIT_S)) as db:
            try:
                self._check(db)
            except sqlite3.OperationalError as e:
                if is_locked(e):
                    raise
                return False
        return True

    def _check_or_create(self, checked: bool) -> None:
        if self._tables(self.db):
            if not checked:
                self._check(self.db)
            self.db.execute("PRAGMA journal_mode = WAL")
            return
        self.db.execute("PRAGMA journal_mode = WAL")  # waits QUIET_WAIT_S at most
        with self.write():
            if not self._tables(self.db):  # another process may have created it meanwhile
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        self.db.execute(stmt)
                self.db.execute("INSERT INTO scalelab_registry VALUES ('version', ?)",
                                (str(SCHEMA_VERSION),))

    @staticmethod
    def _tables(db: sqlite3.Connection) -> set[str]:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _check(self, db: sqlite3.Connection) -> None:
        """A registry of our schema version whose contents pass _check_contents (or no
        tables at all: a new registry)."""
        tables = self._tables(db)
        if not tables:
            return
        if "scalelab_registry" not in tables:
            raise UserError(f"{self.path}: an SQLite database but not a scalelab registry "
                            f"(tables: {', '.join(sorted(tables)[:5])})")
        row = db.execute("SELECT value FROM scalelab_registry WHERE key = 'version'").fetchone()
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise UserError(f"{self.path}: registry schema version {row and row[0]} is not "
                            f"the supported {SCHEMA_VERSION}")
        self._check_contents(db)

    def _check_contents(self, db: sqlite3.Connection) -> None:
        """Every table and column of SCHEMA is there and every value has its declared type
        (SQLite itself would store 'high' as a threshold) and JSON columns parse: a registry
        edited by hand or by another program is refused on opening, naming the table and row,
        instead of failing halfway through a command."""
        want = sqlite3.connect(":memory:")
        want.executescript(SCHEMA)
        kinds = {"INTEGER": ("integer",), "REAL": ("real", "integer"), "TEXT": ("text",)}
        for (table,) in want.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            cols = want.execute(f"PRAGMA table_info({table})").fetchall()
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            missing = [c[1] for c in cols if c[1] not in have]
            if missing:
                raise UserError(f"{self.path}: not a scalelab registry of schema "
                                f"{SCHEMA_VERSION} (table {table} lacks "
                                f"{', '.join(missing)})")
            for _, col, decl, notnull, _, _ in cols:
                ok = kinds[decl] + (() if notnull else ("null",))
                bad = db.execute(
                    f"SELECT rowid, typeof({col}) FROM {table} WHERE typeof({col}) NOT IN "
                    f"({', '.join('?' * len(ok))}) LIMIT 1", ok).fetchone()
                expect = decl.lower()
                if bad is None and col in JSON_COLUMNS:
                    bad = self._bad_json(db, table, col)
                    expect = "a JSON " + ("object" if JSON_COLUMNS[col] is dict else "array")
                if bad is not None:
                    raise UserError(f"{self.path}: table {table}, row {bad[0]}: column {col} "
                                    f"holds {bad[1]}, expected {expect}")
        want.close()
        for row in db.execute("SELECT id, name, metric, threshold FROM experiments"):
            if row[2] not in HIGHER_IS_BETTER:
                raise UserError(f"{self.path}: table experiments, row {row[0]} ({row[1]}): "
                                f"unknown metric {row[2]!r}")
            if not math.isfinite(row[3]):
                raise UserError(f"{self.path}: table experiments, row {row[0]} ({row[1]}): "
                                f"threshold {row[3]} is not a finite number")
        bad = db.execute("SELECT id, name FROM models WHERE params < 1 OR "
                         "non_embedding_params < 1 LIMIT 1").fetchone()
        if bad is not None:
            raise UserError(f"{self.path}: table models, row {bad[0]} ({bad[1]}): parameter "
                            "counts must be positive")
        sql = ("SELECT r.id, e.metric{} FROM results r JOIN experiments e "
               "ON e.id = r.experiment_id WHERE {} LIMIT 1")
        bad = db.execute(sql.format("", "json_valid(r.metrics) AND IFNULL(json_type("
                                    "r.metrics, '$.' || e.metric), '') NOT IN ('real', "
                                    "'integer')")).fetchone()
        for rid, metric, text in [] if bad else db.execute(sql.format(
                ", r.metrics", "NOT json_valid(r.metrics)").replace(" LIMIT 1", "")):
            value = json.loads(text).get(metric)  # NaN: parsed by _bad_json already
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                bad = rid, metric
                break
        if bad is not None:
            raise UserError(f"{self.path}: table results, row {bad[0]}: column metrics lacks "
                            f"a number for its experiment's metric {bad[1]!r}")

    @staticmethod
    def _bad_json(db: sqlite3.Connection, table: str, col: str) -> tuple[int, str] | None:
        """The first row whose JSON does not parse, or is not of JSON_COLUMNS' type (samples:
        each an object of prompt, output and target strings). SQLite's JSON functions are
        fast but reject NaN and Infinity, which json.dumps writes for a nan or inf metric (an
        lm-eval task with no item it can score): those rows go through Python's parser."""
        kind = "object" if JSON_COLUMNS[col] is dict else "array"
        for rowid, text in db.execute(f"SELECT rowid, {col} FROM {table} "
                                      f"WHERE NOT json_valid({col})"):
            try:
                value = json.loads(text)
            except ValueError:
                return rowid, "invalid JSON"
            if not isinstance(value, JSON_COLUMNS[col]):
                return rowid, "a JSON " + {dict: "object", list: "array"}.get(type(value),
                                                                          "scalar")
        bad = db.execute(f"SELECT rowid, 'a JSON ' || json_type({col}) FROM {table} WHERE "
                         f"json_valid({col}) AND json_type({col}) != ? LIMIT 1",
                         (kind,)).fetchone()
        if bad is None and col == "samples":
            strings = " AND ".join(f"json_type(s.value, '$.{k}') IS 'text'"
                                   for k in ("prompt", "output", "target"))
            bad = db.execute(
                "SELECT r.rowid, 'a sample without prompt, output and target strings' FROM "
                f"results r, json_each(r.samples) s WHERE json_valid(r.samples) AND NOT "
                f"(CASE WHEN s.type = 'object' THEN {strings} ELSE 0 END) LIMIT 1").fetchone()
        return bad

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One transaction; IMMEDIATE takes the write lock up front (no upgrade deadlock)."""
        self._begin_immediate()
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _begin_immediate(self) -> None:
        """Wait QUIET_WAIT_S for the write lock, then say so and wait up to LOCK_WAIT_S."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as e:
            if not is_locked(e):
                raise
        print(f"scalelab: {self.path} is locked by another process; waiting up to "
              f"{LOCK_WAIT_S} s", file=sys.stderr, flush=True)
        self.db.execute(f"PRAGMA busy_timeout = {(LOCK_WAIT_S - QUIET_WAIT_S) * 1000}")
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if not is_locked(e):
                raise
            raise UserError(f"{self.path}: still locked by another process after "
                            f"{LOCK_WAIT_S} s; a scalelab command stopped (Ctrl-Z) or stuck "
                            "while writing? Let it finish or end it, then run this again"
                            ) from None
        finally:
            self.db.execute(f"PRAGMA busy_timeout = {QUIET_WAIT_S * 1000}")

    def close(self) -> None:
        self.db.close()

    # ---- experiments ------------------------------------------------------------------

    def add_experiment(self, name: str, task: str, metric: str, threshold: float,
                       note: str = "", exist_ok: bool = False) -> int | None:
        """The new experiment's id; with exist_ok, None where the name is taken (checked
        inside the write transaction: another process may have added it since we looked)."""
        with self.write() as db:
            if db.execute("SELECT 1 FROM experiments WHERE name = ?", (name,)).fetchone():
                if exist_ok:
                    return None
                raise UserError(f"experiment {name!r} already exists (names are permanent; "
                                "choose another)")
            eid = insert(db, "experiments", dict(name=name, task=task, metric=metric,
                                                 threshold=threshold, note=note, created=now()))
            insert(db, "history", dict(experiment_id=eid, time=now(), event=f"created: {task}, "
                                       f"pass if {metric} {comparison(metric)} {threshold}"))
            return eid

    def add_history(self, experiment_id: int, event: str) -> None:
        with self.write() as db:
            insert(db, "history", dict(experiment_id=experiment_id, time=now(), event=event))

    def experiments(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM experiments ORDER BY id").fetchall()

    def experiment(self, name: str) -> sqlite3.Row:
        row = self.db.execute("SELECT * FROM experiments WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(r["name"] for r in self.experiments()) or "none yet"
            raise UserError(f"no experiment named {name!r} in {self.path} (known: {known})")
        return row

    def history(self, experiment_id: int) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM history WHERE experiment_id = ? ORDER BY id",
                               (experiment_id,)).fetchall()

    # ---- models -----------------------------------------------------------------------

    def add_model(self, info: dict) -> int:
        """The new model's id; the same folder under the same name again gets the row that
        is there (two `model add` of one folder at once: the later finds the earlier's row
        only inside this transaction). A name that another folder holds is refused."""
        with self.write() as db:
            row = db.execute("SELECT id, path FROM models WHERE name = ?",
                             (info["name"],)).fetchone()
            if row is not None and row["path"] == info["path"]:
                return row["id"]
            if row is not None:
                raise UserError(f"model {info['name']!r} is already registered "
                                "(pass --name to register it under another name)")
            keys = ["name", "path", "kind", "params", "non_embedding_params", "tokens",
                    "flops", "val_loss", "parent"]
            # an id is never handed out twice: SQLite reuses a removed newest model's id,
            # which a prediction may hold as its last_model_id (its 'same evidence' check)
            top = db.execute("SELECT MAX(id) FROM (SELECT MAX(id) AS id FROM models UNION "
                             "ALL SELECT MAX(last_model_id) FROM predictions)").fetchone()[0]
            return insert(db, "models", {"id": (top or 0) + 1, **{k: info.get(k) for k in keys},
                                         "lineage": info.get("lineage") or "base",
                                         "created": now()})

    def remove_model(self, name: str) -> int:
        """Unregister a model registered by mistake: its row and its results go (so no fit,
        status or backtest counts it), each experiment's history says so, and the number of
        results removed is returned. Predictions stay (what was predicted then), and so does
        the model's folder. A model that is another's parent is refused."""
        m = self.model(name)
        with self.write() as db:
            child = db.execute("SELECT name FROM models WHERE parent = ?", (name,)).fetchone()
            if child is not None:
                raise UserError(f"model {name!r} is the parent of {child[0]!r}: remove that "
                                "one first")
            exps = [r[0] for r in db.execute("SELECT DISTINCT experiment_id FROM results "
                                             "WHERE model_id = ?", (m["id"],))]
            n = db.execute("DELETE FROM results WHERE model_id = ?", (m["id"],)).rowcount
            db.execute("DELETE FROM models WHERE id = ?", (m["id"],))
            for e in exps:
                insert(db, "history", {"experiment_id": e, "time": now(),
                                       "event": f"model {name} removed with its results"})
        return n

    def models(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM models ORDER BY id").fetchall()

    def model(self, name: str) -> sqlite3.Row:
        row = self.db.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(r["name"] for r in self.models()) or "none yet"
            raise UserError(f"no model named {name!r} in {self.path} (known: {known})")
        return row

    def name_of(self, path: str | Path) -> str | None:
        """The registered model whose folder is `path`, if any."""
        want = str(Path(path).resolve())
        return next((m["name"] for m in self.models() if m["path"] == want), None)

    # ---- results ----------------------------------------------------------------------

    def add_result(self, experiment_id: int, model_id: int, metrics: dict, passed: bool,
                   samples: list, n_items: int, seconds: float, version: str) -> int:
        with self.write() as db:
            return insert(db, "results", dict(
                experiment_id=experiment_id, model_id=model_id, metrics=json.dumps(metrics),
                passed=int(passed), samples=json.dumps(samples), n_items=n_items,
                seconds=seconds, code_version=version, time=now()))

    def results(self, experiment_id: int | None = None) -> list[dict]:
        sql = ("SELECT r.*, e.name AS experiment, m.name AS model FROM results r "
               "JOIN experiments e ON e.id = r.experiment_id JOIN models m ON m.id = r.model_id")
        args: tuple = ()
        if experiment_id is not None:
            sql, args = sql + " WHERE r.experiment_id = ?", (experiment_id,)
        rows = [dict(r) for r in self.db.execute(sql + " ORDER BY r.id", args)]
        for d in rows:
            d["metrics"], d["samples"] = json.loads(d["metrics"]), json.loads(d["samples"])
        return rows

    def latest(self) -> dict[tuple[int, int], dict]:
        """The newest result of every (experiment, model) pair."""
        return {(r["experiment_id"], r["model_id"]): r for r in self.results()}

    # ---- predictions ------------------------------------------------------------------

    def add_prediction(self, p: dict) -> int:
        keys = ["experiment_id", "axis", "n_models", "last_model_id", "largest", "metric",
                "level", "predicted", "low", "high", "detail"]
        with self.write() as db:
            return insert(db, "predictions", {**{k: p[k] for k in keys}, "time": now()})

    def predictions(self, experiment_id: int | None = None) -> list[sqlite3.Row]:
        if experiment_id is None:
            return self.db.execute("SELECT * FROM predictions ORDER BY id").fetchall()
        return self.db.execute("SELECT * FROM predictions WHERE experiment_id = ? ORDER BY id",
                               (experiment_id,)).fetchall()
