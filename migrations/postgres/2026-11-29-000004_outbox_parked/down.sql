-- Back to the outbox without 'parked': parked rows become pending again (the
-- relay retries them).

DROP INDEX outbox_failing;
UPDATE outbox SET status = 'pending' WHERE status = 'parked';
ALTER TABLE outbox DROP CONSTRAINT outbox_status_check;
ALTER TABLE outbox ADD CONSTRAINT outbox_status_check
    CHECK (status IN ('pending', 'published', 'unrouted'));
