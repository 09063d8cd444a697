"""The job database: peewee models, connection and state transitions.

SQLite by default (under the user's data directory, 0600 in a 0700 directory);
HPCMOVE_DB takes any playhouse.db_url URL (e.g. postgresql://host/db).
Array tasks on many nodes write at once: SQLite transactions start IMMEDIATE
under a long busy timeout so concurrent writers queue instead of failing.
"""
import dataclasses
import functools
import operator
import os
import time
from types import SimpleNamespace
from urllib.parse import urlparse

import peewee as pw
from playhouse import db_url
from playhouse.migrate import SchemaMigrator, migrate

from . import states
from .errors import DatabaseError, IllegalTransition
from .paths import data_dir

proxy = pw.DatabaseProxy()
SCHEMA_VERSION = 4
BUSY_TIMEOUT_MS = 120_000
CACHE_KIB = 256 << 10  # at most, as a transaction needs it


class PathField(pw.BlobField):
    """A file system path as raw bytes (any name, UTF-8 or not). Drivers hand blobs back
    as bytes (SQLite) or memoryview (psycopg2); hpcmove always sees bytes."""

    def python_value(self, value):
        return bytes(value) if isinstance(value, memoryview) else value


class BaseModel(pw.Model):
    class Meta:
        database = proxy


class Job(BaseModel):
    token = pw.CharField(unique=True)
    owner = pw.CharField()
    state = pw.CharField(default=states.SUBMITTED, index=True)
    reason = pw.TextField(default="")
    backend = pw.CharField()
    jobdir = PathField()
    array_id = pw.CharField(null=True)
    final_id = pw.CharField(null=True, index=True)
    move = pw.BooleanField(default=False)
    stripe_width = pw.IntegerField()
    slice_size = pw.BigIntegerField()
    n_tasks = pw.IntegerField()
    bytes_total = pw.BigIntegerField()
    created = pw.DoubleField(default=time.time)
    finished = pw.DoubleField(null=True)
    options = pw.TextField(default="{}")

    @property
    def label(self):
        return f"hm-{self.id}"


class File(BaseModel):
    job = pw.ForeignKeyField(Job, backref="files", on_delete="CASCADE")
    index = pw.IntegerField()
    kind = pw.CharField()
    src = PathField()
    dst = PathField()
    spool = PathField()
    size = pw.BigIntegerField(default=0)
    mode = pw.IntegerField(default=0)
    mtime_ns = pw.BigIntegerField(default=0)
    link_target = PathField(null=True)
    link_to = pw.IntegerField(default=-1)
    state = pw.CharField(default=states.SUBMITTED)
    reason = pw.TextField(default="")
    checksum = pw.CharField(default="")

    class Meta:
        indexes = ((("job", "index"), True),)


class Slice(BaseModel):
    job = pw.ForeignKeyField(Job, backref="slices", on_delete="CASCADE")
    file = pw.ForeignKeyField(File, backref="slices", on_delete="CASCADE")
    index = pw.IntegerField()
    offset = pw.BigIntegerField()
    length = pw.BigIntegerField()
    task = pw.IntegerField()
    state = pw.CharField(default=states.SUBMITTED)
    host = pw.CharField(default="")
    attempts = pw.IntegerField(default=0)
    seconds = pw.DoubleField(default=0.0)
    src_digest = pw.CharField(default="")
    dst_digest = pw.CharField(default="")
    reason = pw.TextField(default="")
    skipped = pw.BooleanField(default=False)  # --skip-existing: already at the destination

    class Meta:
        indexes = ((("file", "index"), True), (("job", "task"), False),
                   (("job", "state"), False))  # migration 2


class Event(BaseModel):
    job = pw.ForeignKeyField(Job, backref="events", on_delete="CASCADE")
    time = pw.DoubleField(default=time.time)
    kind = pw.CharField()
    message = pw.TextField(default="")


class ControlSocket(BaseModel):
    """An SSH control master opened by `hpcmove socket open` (migration 4). Only where it
    is and until when: hpcmove never stores a key, passphrase or password."""

    owner = pw.CharField(index=True)
    host = pw.CharField()  # [user@]host as the user wrote it
    node = pw.CharField(default="")  # the node holding the socket ('' = where it was opened)
    path = PathField()
    opened = pw.DoubleField(default=time.time)
    expires = pw.DoubleField()
    closed = pw.BooleanField(default=False)


class SchemaVersion(BaseModel):
    version = pw.IntegerField()


MODELS = (Job, File, Slice, Event, ControlSocket, SchemaVersion)


def sqlite_path(url):
    """The file of an SQLite URL ('' for other databases and in-memory ones)."""
    parsed = urlparse(url)
    if parsed.scheme.startswith("sqlite") and parsed.path not in ("", "/:memory:"):
        return parsed.path
    return ""


def default_url():
    return os.environ.get("HPCMOVE_DB") or "sqlite:///" + os.path.join(data_dir(), "hpcmove.db")


def connect(url=None, manage_schema=True):
    """Open the database named by `url` (default: HPCMOVE_DB, else SQLite in the data dir),
    create or upgrade the schema, and bind the models to it. Returns the url used."""
    url = url or default_url()
    try:
        if urlparse(url).scheme.startswith("sqlite"):
            path = sqlite_path(url)
            if path:
                _private_file(path)
            # cache_size: a job's rows (40,000 for 20,000 files) stay in this connection's
            # cache until its commit; spilled, they would take the exclusive lock early
            # and stop every reader (the job's tasks start while submit inserts them)
            db = db_url.connect(url, lock_type="IMMEDIATE", pragmas={
                "busy_timeout": BUSY_TIMEOUT_MS, "foreign_keys": 1,
                "cache_size": -CACHE_KIB})
        else:
            db = db_url.connect(url)
        proxy.initialize(db)
        db.connect(reuse_if_open=True)
        if manage_schema:
            _migrate(db)
    except pw.DatabaseError as e:
        raise DatabaseError(f"cannot use the job database {_redact(url)}: {e}") from e
    return url


def connect_admin(url=None):
    """Connect without touching the schema: for `hpcmove db` commands that manage it."""
    return connect(url, manage_schema=False)


def close():
    if proxy.obj is not None and not proxy.is_closed():
        proxy.close()


def _redact(url):
    p = urlparse(url)
    return url.replace(p.password, "***") if p.password else url


def _private_file(path):
    """The SQLite file and its directory are the user's alone (0600 in 0700)."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


def _m2_slice_job_state_index(db):
    """2: per-job, per-state slice counts (status, progress) without a table scan."""
    migrate(SchemaMigrator.from_database(db).add_index("slice", ("job_id", "state"), False))


def _m3_slice_skipped(db):
    """3: slices found already at the destination (--skip-existing) are marked."""
    migrate(SchemaMigrator.from_database(db).add_column("slice", "skipped",
                                                        pw.BooleanField(default=False)))


def _m4_control_sockets(db):
    """4: control sockets of `hpcmove socket open`, for remote (SSH) transfers."""
    db.create_tables([ControlSocket], safe=True)


# Numbered migrations: MIGRATIONS[i] upgrades schema version i + 1 to i + 2. Each runs
# in the same transaction as the version row it adds, so an upgrade is all or nothing.
MIGRATIONS = [_m2_slice_job_state_index, _m3_slice_skipped, _m4_control_sockets]


def is_sqlite(db):
    return isinstance(db, pw.SqliteDatabase)


def schema_version(db):
    if not db.table_exists(SchemaVersion._meta.table_name):
        return 0
    row = SchemaVersion.select().order_by(SchemaVersion.version.desc()).first()
    return row.version if row else 0


def create_schema(db):
    db.create_tables(MODELS, safe=True)
    SchemaVersion.create(version=SCHEMA_VERSION)


def upgrade(db):
    """Apply the migrations this database lacks; returns (from, to)."""
    with db.atomic():
        version = schema_version(db)
        start = version
        if version > SCHEMA_VERSION:
            raise DatabaseError(f"database schema {version} is newer than this hpcmove "
                                f"({SCHEMA_VERSION}); upgrade hpcmove")
        for step in MIGRATIONS[version - 1:]:
            step(db)
            version += 1
            SchemaVersion.create(version=version)
    return start, version


def _migrate(db):
    """A user's own SQLite file is created and upgraded on the fly. A shared server
    database belongs to the site: its schema is made and upgraded by the admin
    (`hpcmove db setup-site`, `hpcmove db upgrade`), never by a user's command."""
    version = schema_version(db)
    if version == SCHEMA_VERSION:
        return
    if not is_sqlite(db):
        what = "has no hpcmove schema" if version == 0 else \
            f"has schema {version}, this hpcmove needs {SCHEMA_VERSION}"
        raise DatabaseError(f"the job database {what}; the site admin runs "
                            "`hpcmove db setup-site` (or `hpcmove db upgrade`)")
    if version == 0:
        with db.atomic():
            create_schema(db)
        return
    upgrade(db)


def atomic():
    return proxy.atomic()


# --- state transitions -----------------------------------------------------------

def set_job_state(job, new, reason=None):
    """Move `job` to `new` if the table allows it from its current state in the database.
    Raises IllegalTransition otherwise. Returns the refreshed job."""
    with atomic():
        current = Job.get_by_id(job.id)
        if current.state == new:
            return current
        states.check("job", current.state, new)
        fields = {Job.state: new}
        if reason is not None:
            fields[Job.reason] = reason
        if new in states.JOB_TERMINAL:
            fields[Job.finished] = time.time()
        Job.update(fields).where(Job.id == job.id).execute()
        Event.create(job=job.id, kind="state", message=f"{current.state} -> {new}"
                     + (f": {reason}" if reason else ""))
    return Job.get_by_id(job.id)


def try_job_state(job_id, new):
    """Move the job to `new` only where the table allows it from the current state;
    silently nothing otherwise (for 'first task started' style updates)."""
    return (Job.update(state=new)
            .where(Job.id == job_id, Job.state.in_(states.sources_of("job", new)))
            .execute())


def bulk_state(model, kind, query_filter, new, **fields):
    """Set `new` on every row matching the filter whose state allows it; returns the count."""
    values = {model.state: new}
    values.update({getattr(model, k): v for k, v in fields.items()})
    return (model.update(values)
            .where(query_filter, model.state.in_(states.sources_of(kind, new)))
            .execute())


def event(job_id, kind, message):
    Event.create(job=job_id, kind=kind, message=message)


def bulk_insert(model, fields, rows):
    """INSERT many rows through the driver's executemany with one prepared statement.
    peewee's insert_many builds SQL text for every row, which dominated recording a
    million-file job; rows here are plain tuples in `fields` order."""
    database = proxy.obj
    open_q, close_q = database.quote  # e.g. '""' (SQLite, PostgreSQL) or '``'

    def quoted(name):
        return f"{open_q}{name}{close_q}"

    columns = [quoted(model._meta.fields[f].column_name) for f in fields]
    sql = (f"INSERT INTO {quoted(model._meta.table_name)} ({', '.join(columns)}) "
           f"VALUES ({', '.join([database.param] * len(columns))})")
    cursor = database.cursor()
    for batch in pw.chunked(rows, 10_000):
        cursor.executemany(sql, batch)


# field classes whose values come from the drivers as hpcmove uses them, and the rest
_AS_IS = (pw.IntegerField, pw.FloatField, pw.CharField, pw.TextField, pw.ForeignKeyField,
          pw.AutoField)


SHARED = ("kind", "spool", "state", "host")


def plain(query):
    """The rows of a select as plain objects with the models' attribute names (a foreign
    key also as <name>_id): for reading many rows, as finalize reads a job's files and
    slices. A model instance costs about 25 us to build, a second for 40,000 rows; peewee's
    per-value conversion half as much again, so the driver's rows are used as they come
    (paths made bytes, booleans bool)."""
    fields = list(query._returning)
    if not all(isinstance(f, pw.Field) for f in fields):
        return [SimpleNamespace(**row) for row in query.dicts()]
    names = [f.name for f in fields]
    fks = [(f.name, f.name + "_id") for f in fields if isinstance(f, pw.ForeignKeyField)]
    sqlite = isinstance(proxy.obj, pw.SqliteDatabase)  # its blobs come as bytes already
    fix = [(f.name, f.python_value) for f in fields
           if not isinstance(f, _AS_IS) and not (sqlite and isinstance(f, PathField))]
    row = _row_class(tuple(names), tuple(fks))
    convert = [(names.index(name), f) for name, f in fix]
    # one object for each value of a column that repeats (a job's spool, states, kinds)
    shared = [(names.index(name), {}) for name in SHARED if name in names]
    cursor = proxy.obj.execute_sql(*query.sql())  # row by row: no list of tuples besides
    if not convert and not shared:
        return [row(*values) for values in cursor]
    out = []
    for values in cursor:
        values = list(values)
        for k, f in convert:
            values[k] = f(values[k])
        for k, seen in shared:
            values[k] = seen.setdefault(values[k], values[k])
        out.append(row(*values))
    return out


@functools.lru_cache(maxsize=None)
def _row_class(names, fks):
    """A class for plain()'s rows: slots, not a dict each (a million files and their
    slices took 1.9 GB as SimpleNamespaces); a foreign key's <name>_id reads <name>."""
    return dataclasses.make_dataclass(
        "Row", names, slots=True, repr=True,
        namespace={alias: property(operator.attrgetter(name)) for name, alias in fks})


def bulk_update(model, fields, rows):
    """UPDATE many rows by id with one prepared statement (executemany); rows are tuples
    of the `fields` values followed by the row's id. For per-row values that peewee would
    otherwise send as one query each (finalize's checksums of 20,000 files)."""
    database = proxy.obj
    open_q, close_q = database.quote
    sets = ", ".join(f"{open_q}{model._meta.fields[f].column_name}{close_q} = {database.param}"
                     for f in fields)
    sql = (f"UPDATE {open_q}{model._meta.table_name}{close_q} SET {sets} "
           f"WHERE {open_q}id{close_q} = {database.param}")
    cursor = database.cursor()
    for batch in pw.chunked(rows, 10_000):
        cursor.executemany(sql, batch)


def id_runs(ids):
    """`ids` as (first, last) runs of consecutive ones, ascending: a job's rows are
    numbered together (reserve_ids), so its 20,000 files are one run or a few."""
    runs = []
    for i in sorted(ids):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return [tuple(r) for r in runs]


def update_runs(model, assignments, params, ids):
    """UPDATE `model` SET `assignments` (SQL with the driver's parameters, `params` their
    values) for the rows of `ids`, one run of consecutive ids at a time (executemany):
    for values the database derives from the row itself, which then cost no binding per
    row (20,000 slices' verified digests: 0.011 s against 0.047 by id)."""
    database = proxy.obj
    open_q, close_q = database.quote
    p = database.param
    sql = (f"UPDATE {open_q}{model._meta.table_name}{close_q} SET {assignments} "
           f"WHERE {open_q}id{close_q} BETWEEN {p} AND {p}")
    cursor = database.cursor()
    for batch in pw.chunked(id_runs(ids), 10_000):
        cursor.executemany(sql, [tuple(params) + run for run in batch])


def verified_at_rest(slice_ids):
    """Slices verified at rest: each one's destination digest is its source digest."""
    database = proxy.obj
    open_q, close_q = database.quote
    update_runs(Slice, f"{open_q}dst_digest{close_q} = substr({open_q}src_digest{close_q}, "
                       f"1, 64)", (), slice_ids)


def done_from_slice(file_ids, prefix):
    """Files of one slice each -> Done, each one's checksum `prefix` and its slice's
    destination digest, as the database has it (see update_runs)."""
    database = proxy.obj
    open_q, close_q = database.quote
    p = database.param
    slices, files = (f"{open_q}{m._meta.table_name}{close_q}" for m in (Slice, File))
    update_runs(File, f"{open_q}state{close_q} = {p}, {open_q}reason{close_q} = '', "
                      f"{open_q}checksum{close_q} = {p} || (SELECT {open_q}dst_digest"
                      f"{close_q} FROM {slices} WHERE {slices}.{open_q}file_id{close_q} = "
                      f"{files}.{open_q}id{close_q})", (states.DONE, prefix), file_ids)


def record_results(host, results):
    """Write slice results (worker.Recorder's dicts) with one prepared UPDATE per target
    state through executemany; each row changes only where the transition table allows.
    One peewee query per slice cost ~0.3 ms, most of a 20,000-file task's recording."""
    database = proxy.obj
    open_q, close_q = database.quote
    by_state = {}
    for r in results:
        by_state.setdefault(r["state"], []).append(
            (r["state"], host, r["seconds"], r["attempts"], r["src"], r["dst"], r["reason"],
             r.get("skipped", False), r["slice"]))
    cursor = database.cursor()
    table = f"{open_q}{Slice._meta.table_name}{close_q}"
    for state, rows in by_state.items():
        sources = states.sources_of("slice", state)
        if not sources:
            continue
        p = database.param
        sql = (f"UPDATE {table} SET state = {p}, host = {p}, seconds = {p}, "
               f"attempts = attempts + {p}, src_digest = {p}, dst_digest = {p}, reason = {p}, "
               f"skipped = {p} WHERE id = {p} AND state IN ({', '.join([p] * len(sources))})")
        cursor.executemany(sql, [row + tuple(sources) for row in rows])


def rows(query):
    """A select's rows as the driver's tuples (integers and text need no conversion)."""
    return proxy.obj.execute_sql(*query.sql()).fetchall()


def reserve_ids(model, n):
    """Ids for `n` rows of `model` not yet written, so that a job's manifest can name
    its files and slices before (on SQLite: while) they are inserted. SQLite: the n after
    the largest, safe under the write lock that every transaction here takes at its
    BEGIN (call inside atomic()); a server: n values of the table's own sequence."""
    if n == 0:
        return []
    database = proxy.obj
    if is_sqlite(database):
        (top,), = rows(model.select(pw.fn.MAX(model.id)))
        return range((top or 0) + 1, (top or 0) + 1 + n)
    p = database.param
    cursor = database.execute_sql(f"SELECT nextval(pg_get_serial_sequence({p}, 'id')) "
                                  f"FROM generate_series(1, {p})",
                                  (f'"{model._meta.table_name}"', n))
    return sorted(i for (i,) in cursor)


def reserve_plan(plan):
    """(file ids by entry, slice ids by position in plan.slices) for insert_plan."""
    return reserve_ids(File, len(plan.entries)), reserve_ids(Slice, len(plan.slices))


def insert_plan(job, plan, state=states.SUBMITTED, ids=None):
    """Record every entry and slice of `plan` under `job`, in `state`, in one transaction,
    with the ids of reserve_plan (`ids`, else reserved here). Returns the ids."""
    with atomic():
        file_ids, slice_ids = ids or reserve_plan(plan)
        bulk_insert(File, ("id", "job", "index", "kind", "src", "dst", "spool", "size", "mode",
                           "mtime_ns", "link_target", "link_to", "state", "reason", "checksum"),
                    ((i, job.id, e.index, e.kind, e.src, e.dst, e.spool, e.size, e.mode,
                      e.mtime_ns, e.link_target, e.link_to, state, "", "")
                     for i, e in zip(file_ids, plan.entries)))
        bulk_insert(Slice, ("id", "job", "file", "index", "offset", "length", "task", "state",
                            "host", "attempts", "seconds", "src_digest", "dst_digest",
                            "reason", "skipped"),
                    ((i, job.id, file_ids[s.entry], s.index, s.offset, s.length, s.task,
                      state, "", 0, 0.0, "", "", "", False)
                     for i, s in zip(slice_ids, plan.slices)))
    return file_ids, slice_ids


__all__ = ["Job", "File", "Slice", "Event", "connect", "close", "IllegalTransition"]
