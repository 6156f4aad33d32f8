DROP TABLE checkpoints;
DROP TABLE snapshots;
DROP TABLE event_store;
