-- The runtime's own tables: outbox (no dual writes), inbox (dedupe),
-- idempotency (safe client retries).

CREATE TABLE outbox (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT    NOT NULL UNIQUE,
    event_name     TEXT    NOT NULL,
    partition_key  TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    producer       TEXT,
    occurred_at    BIGINT  NOT NULL,
    payload        BLOB    NOT NULL,
    status         TEXT    NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'published', 'unrouted')),
    attempts       INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT,
    published_at   BIGINT
);
CREATE INDEX outbox_by_status ON outbox (status, position);

CREATE TABLE inbox (
    consumer    TEXT   NOT NULL,
    dedupe_key  TEXT   NOT NULL,
    event_name  TEXT   NOT NULL,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, dedupe_key)
);
CREATE INDEX inbox_by_age ON inbox (received_at);

CREATE TABLE idempotency (
    scope      TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    status     INTEGER NOT NULL,
    body       TEXT    NOT NULL,
    created_at BIGINT  NOT NULL,
    PRIMARY KEY (scope, key)
);
