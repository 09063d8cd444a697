"""A site's shared PostgreSQL job database: schema, row-level security, grants.

Run once by the site admin as the role that will own the tables (a superuser or the
database owner): `hpcmove db setup-site URL`. Users connect as themselves (peer or
Kerberos authentication: the database role is the OS user name) and see, change and
cancel only their own jobs, whatever they send the server: the rules are enforced by
PostgreSQL row-level security keyed on session_user, not by hpcmove. Members of
hpcmove_admin see and manage every job.
"""
from . import db

USER_ROLE, ADMIN_ROLE = "hpcmove_user", "hpcmove_admin"
OWNED = ("job", "controlsocket")  # tables with an owner column
CHILDREN = ("file", "slice", "event")  # tables whose rows belong to a job


def _visible_to(user_expr):
    return f"(owner = {user_expr} OR pg_has_role({user_expr}, '{ADMIN_ROLE}', 'MEMBER'))"


def statements():
    """The SQL that secures the tables (idempotent: policies are dropped and remade)."""
    sql = []
    for role in (USER_ROLE, ADMIN_ROLE):
        sql.append(f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = "
                   f"'{role}') THEN CREATE ROLE {role} NOLOGIN; END IF; END $$")
    for table in OWNED + CHILDREN:
        sql += [f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
                f"DROP POLICY IF EXISTS hpcmove_owner ON {table}",
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {USER_ROLE}, {ADMIN_ROLE}"]
    for table in OWNED:
        sql.append(f"CREATE POLICY hpcmove_owner ON {table} USING "
                   f"{_visible_to('session_user')} WITH CHECK {_visible_to('session_user')}")
    for table in CHILDREN:
        # the subquery sees only jobs the job policy lets this user see
        sql.append(f"CREATE POLICY hpcmove_owner ON {table} USING (EXISTS (SELECT 1 FROM job "
                   f"WHERE job.id = {table}.job_id))")
    sql += [f"GRANT SELECT ON schemaversion TO {USER_ROLE}, {ADMIN_ROLE}",
            f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {USER_ROLE}, {ADMIN_ROLE}",
            "ALTER TABLE job ALTER COLUMN owner SET DEFAULT session_user"]
    return sql


def setup_site(url):
    """Create (or upgrade) the schema and secure it. Returns the schema version."""
    db.connect_admin(url)
    database = db.proxy.obj
    with database.atomic():
        if db.schema_version(database) == 0:
            db.create_schema(database)
    db.upgrade(database)
    with database.atomic():
        for statement in statements():
            database.execute_sql(statement)
    return db.schema_version(database)
