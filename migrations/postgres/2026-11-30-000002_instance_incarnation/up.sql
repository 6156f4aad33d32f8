-- Which process last spoke for an instance name: a fresh value per start.
-- A round that finds another process's value where its own was learns that
-- a second process runs under its name (ADR 0009).
ALTER TABLE herald_instances ADD COLUMN incarnation TEXT NOT NULL DEFAULT '';
