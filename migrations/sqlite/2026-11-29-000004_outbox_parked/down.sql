-- Back to the outbox without 'parked': parked rows become pending again (the
-- relay retries them), positions and the AUTOINCREMENT counter are kept.

CREATE TABLE outbox_old (
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

INSERT INTO outbox_old (position, event_id, event_name, partition_key, schema_version,
                        correlation_id, causation_id, producer, occurred_at, payload,
                        status, attempts, last_error, published_at)
SELECT position, event_id, event_name, partition_key, schema_version,
       correlation_id, causation_id, producer, occurred_at, payload,
       CASE WHEN status = 'parked' THEN 'pending' ELSE status END, attempts, last_error,
       published_at
FROM outbox;

DELETE FROM sqlite_sequence WHERE name = 'outbox_old';
INSERT INTO sqlite_sequence (name, seq)
SELECT 'outbox_old', max(seq) FROM sqlite_sequence WHERE name = 'outbox' HAVING count(*) > 0;

DROP TABLE outbox;
ALTER TABLE outbox_old RENAME TO outbox;

CREATE INDEX outbox_by_status ON outbox (status, position);
