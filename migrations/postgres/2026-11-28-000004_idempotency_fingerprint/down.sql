ALTER TABLE idempotency DROP COLUMN fingerprint;
