"""Where a sweep's trials live: the Optuna storage (``sqlite:///...`` or ``postgresql://...``), the
seeded sampler, and creating or resuming a study (refusing a resume that would mix incomparable trials).

SQLite suits one machine (WAL journaling so K worker processes block each other less); PostgreSQL
shares one study between machines. Heartbeats mark the trials of a killed worker as failed, so a
resumed study never waits on them.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from stage1._core.errors import ConfigError, DataError, EnvironmentProblem
from stage1.workflows.space import SearchSpace

from .data import SweepData
from .objective import DIRECTIONS, constraint_values

#: seconds between a running trial's heartbeats, and without one before it counts as failed.
HEARTBEAT_S = 10
GRACE_S = 60


#: query parameters of a storage URL whose values are secrets (redacted like a password).
SECRET_QUERY_KEYS = ("password", "passwd", "pwd", "secret", "token", "sslpassword", "api_key", "apikey")
REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` safe to show or save: the password of ``user:password@host`` and secret query values
    (``?password=...``) become ``***``. Everything the sweep prints or writes (stdout, summary.json)
    goes through this, so a PostgreSQL storage URL never leaks its password."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL at all: show nothing that could be a secret
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{userinfo}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_QUERY_KEYS for k, _ in pairs):
            query = urlencode([(k, REDACTED if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing secret (urlunsplit would also turn sqlite:///x into sqlite:/x)
    head = f"{parts.scheme}://{netloc}" if parts.scheme else f"//{netloc}"
    return head + urlunsplit(("", "", parts.path, query, parts.fragment))


class StorageError(ConfigError):
    """A ``--storage`` URL that cannot name a database (a usage error: fix the option)."""


class StorageUnavailable(EnvironmentProblem):
    """A well-formed ``--storage`` whose database cannot be reached or opened (or whose driver is missing)."""


#: PostgreSQL drivers SQLAlchemy knows, in the order a bare ``postgresql://`` tries them when its
#: SQLAlchemy version's default is not installed (2.0 defaults to psycopg2, 2.1 to psycopg 3).
POSTGRES_DRIVERS = ("psycopg2", "psycopg")


def with_installed_driver(url: str) -> str:
    """``url`` with an explicit installed driver when it is a bare ``postgresql://`` whose default driver
    (per SQLAlchemy version) is missing: psycopg2-binary then serves SQLAlchemy 2.1 too. Else ``url``."""
    import importlib.util

    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        parsed.get_dialect().import_dbapi()
        return url
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - not a usable URL: check_storage_url says why
        return url
    if parsed.drivername not in ("postgresql", "postgres"):
        return url
    for driver in POSTGRES_DRIVERS:
        if importlib.util.find_spec(driver) is not None:
            return parsed.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
    return url


def check_storage_url(url: str) -> None:
    """ConfigError (one line, password redacted) unless ``url`` is a database URL SQLAlchemy knows and
    whose driver is installed: ``sqlite:///PATH`` or ``postgresql://user:password@host/db``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = redact_url(url)
    examples = "e.g. sqlite:///studies.db or postgresql://user:password@host/db"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError):
        raise StorageError(f"--storage {shown!r}: not a database URL; {examples}") from None
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise StorageError(f"--storage {shown}: unknown database kind {parsed.drivername!r}; {examples}") from None
    if parsed.drivername.startswith("sqlite"):
        if not parsed.database:
            raise StorageError(f"--storage {shown}: names no database file; {examples}")
        return
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise StorageUnavailable(f"--storage {shown}: the {parsed.drivername} driver is not installed ({exc}); "
                                 "install its Python driver (for PostgreSQL: psycopg2-binary) or use sqlite:///FILE") from None


def _detail(exc: BaseException, url: str) -> str:
    """The first line of a database error, with the URL's password never in it."""
    from sqlalchemy.engine import make_url

    text = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
    try:
        password = make_url(url).password
    except Exception:  # noqa: BLE001 - the URL was checked already; nothing to hide otherwise
        password = None
    return text.replace(str(password), REDACTED) if password else text


def make_storage(url: str) -> Any:
    """An RDB storage for ``sqlite:///...`` or ``postgresql://...`` with heartbeats (stale trials fail).

    A URL that is not a database's, a missing driver, or a database that cannot be opened or reached
    is one line naming ``--storage`` (its password redacted), never a traceback.
    """
    import sqlite3

    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    shown = redact_url(url)
    url = with_installed_driver(url)
    check_storage_url(url)
    engine_kwargs: dict[str, Any] = {}
    sqlite = url.startswith("sqlite")
    try:
        if sqlite:
            engine_kwargs = {"connect_args": {"timeout": 120}}
            db = url.split("///", 1)[-1]
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
                _sqlite_wal(db)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                 heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except (SQLAlchemyError, optuna.exceptions.StorageInternalError, OSError, sqlite3.Error) as exc:
        fix = ("check the database file's path (its folder must be writable, the file a SQLite database), or "
               "pick another --storage" if sqlite else
               "check the host, port, user and password, and that the database server runs")
        raise StorageUnavailable(f"--storage {shown}: cannot open the database ({_detail(exc, url)}); {fix}") from None
    if sqlite:
        from sqlalchemy import event

        event.listen(storage.engine, "connect", _sqlite_pragmas)
        storage.engine.dispose()  # connections opened from now on get the pragmas
    return storage


def _sqlite_wal(db: str) -> None:
    """Switch the database file to WAL journaling (persistent): readers and K writers block less."""
    import sqlite3

    con = sqlite3.connect(db, timeout=120)
    try:
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """synchronous=NORMAL: with WAL, a commit no longer waits for an fsync (safe from corruption;
    a power cut may lose the last trials, never the file). Cut per-trial storage time ~10x here."""
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def make_sampler(seed: int) -> Any:
    """Seeded multivariate TPE (grouped for the conditional head x policy space), constant liar on,
    constraint-aware through ``constraints_func`` (the one constraint mechanism every optuna >= 3.0
    has; optuna 5 marks it deprecated in favour of ``Trial.set_constraint``, which 4.x lacks)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True,
                                          constraints_func=constraint_values)


def open_study(storage: Any, name: str, seed: int) -> Any:
    """Create or resume the multi-objective study ``name``."""
    import optuna

    return optuna.create_study(storage=storage, study_name=name, directions=list(DIRECTIONS),
                               sampler=make_sampler(seed), load_if_exists=True)


def check_resume(study: Any, space: SearchSpace, data: SweepData) -> None:
    """Refuse to add trials scored differently (other store / splits or other risk target)."""
    attrs = study.user_attrs
    facts = {"objective": space.objective, "store_fingerprint": data.fingerprint}
    if not attrs.get("store_fingerprint"):
        for k, v in {**facts, "store": data.store_path}.items():
            study.set_user_attr(k, v)
        return
    if attrs["store_fingerprint"] != data.fingerprint:
        raise DataError(
            f"study {study.study_name!r} was run on other features or splits (store {attrs.get('store')}); "
            "resume it on the same store, or use a new --study name"
        )
    if attrs.get("objective") != space.objective:
        raise DataError(
            f"study {study.study_name!r} used objective {attrs.get('objective')}, this space has "
            f"{space.objective}; trials would not be comparable: use a new --study name"
        )
