-- Several instances of one context (ADR 0009): who is alive, and which
-- instance holds which partition until when. Times are milliseconds since
-- the Unix epoch on the database's clock, so instances on machines whose
-- clocks differ still agree on when a lease ran out.
CREATE TABLE herald_instances (
    context  TEXT   NOT NULL,
    instance TEXT   NOT NULL,
    seen_at  BIGINT NOT NULL,
    PRIMARY KEY (context, instance)
);

CREATE TABLE herald_partition_leases (
    context      TEXT    NOT NULL,
    partition_no INTEGER NOT NULL,
    owner        TEXT    NOT NULL,
    expires_at   BIGINT  NOT NULL,
    PRIMARY KEY (context, partition_no)
);

-- The outbox relay of a partitioned context publishes the rows of the
-- partitions its instance holds: bucket % partitions. The bucket is a hash
-- of the row's partition key, fixed when the row is written; rows written
-- before this migration are all in bucket 0.
ALTER TABLE outbox ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0;
