-- Outbox rows the broker keeps refusing are parked ('parked') for an operator.

ALTER TABLE outbox DROP CONSTRAINT outbox_status_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_status_check
    CHECK (status IN ('pending', 'published', 'unrouted', 'parked'));

-- From now on a pending row with a last_error is failing and holds back the
-- rows of its partition key: a pending row's older error (left over from an
-- unrouted row republished earlier) is cleared.
UPDATE outbox SET last_error = NULL WHERE status = 'pending';

-- The failing rows per partition key: the relay skips what waits behind them.
CREATE INDEX outbox_failing ON outbox (partition_key, position)
    WHERE status = 'pending' AND last_error IS NOT NULL;
