ALTER TABLE herald_instances DROP COLUMN incarnation;
