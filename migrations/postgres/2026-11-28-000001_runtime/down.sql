DROP TABLE idempotency;
DROP TABLE inbox;
DROP TABLE outbox;
