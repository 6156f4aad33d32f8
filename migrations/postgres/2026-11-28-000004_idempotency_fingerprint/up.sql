-- A repeated Idempotency-Key must come with the same request: remember a
-- fingerprint of the first one.
ALTER TABLE idempotency ADD COLUMN fingerprint TEXT NOT NULL DEFAULT '';
