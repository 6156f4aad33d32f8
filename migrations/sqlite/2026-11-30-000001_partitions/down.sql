ALTER TABLE outbox DROP COLUMN bucket;
DROP TABLE herald_partition_leases;
DROP TABLE herald_instances;
