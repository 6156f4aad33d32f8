-- Outbox rows the broker keeps refusing are parked ('parked') for an operator.
-- SQLite cannot alter a CHECK constraint: the table is rebuilt. Rows keep their
-- positions, and the AUTOINCREMENT counter (sqlite_sequence) is carried over so
-- no position is ever handed out twice, even one whose row was pruned.

CREATE TABLE outbox_new (
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
                   CHECK (status IN ('pending', 'published', 'unrouted', 'parked')),
    attempts       INTEGER NOT NULL DEFAULT 0,
    last_error     TEXT,
    published_at   BIGINT
);

-- From now on a pending row with a last_error is failing and holds back the
-- rows of its partition key: a pending row's older error (left over from an
-- unrouted row republished earlier) is cleared.
INSERT INTO outbox_new (position, event_id, event_name, partition_key, schema_version,
                        correlation_id, causation_id, producer, occurred_at, payload,
                        status, attempts, last_error, published_at)
SELECT position, event_id, event_name, partition_key, schema_version,
       correlation_id, causation_id, producer, occurred_at, payload,
       status, attempts, CASE WHEN status = 'pending' THEN NULL ELSE last_error END,
       published_at
FROM outbox;

DELETE FROM sqlite_sequence WHERE name = 'outbox_new';
INSERT INTO sqlite_sequence (name, seq)
SELECT 'outbox_new', max(seq) FROM sqlite_sequence WHERE name = 'outbox' HAVING count(*) > 0;

DROP TABLE outbox;
ALTER TABLE outbox_new RENAME TO outbox;

CREATE INDEX outbox_by_status ON outbox (status, position);
-- The failing rows per partition key: the relay skips what waits behind them.
CREATE INDEX outbox_failing ON outbox (partition_key, position)
    WHERE status = 'pending' AND last_error IS NOT NULL;
