-- Event sourcing: the append-only event store, snapshots, projection checkpoints.

CREATE TABLE event_store (
    position       INTEGER PRIMARY KEY AUTOINCREMENT, -- global order
    stream_id      TEXT    NOT NULL,
    stream_version BIGINT  NOT NULL,                  -- 1, 2, 3 ... per stream
    event_id       TEXT    NOT NULL UNIQUE,
    event_name     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    payload        TEXT    NOT NULL,                  -- JSON
    metadata       TEXT    NOT NULL,                  -- JSON: correlation, causation, producer
    recorded_at    BIGINT  NOT NULL,
    UNIQUE (stream_id, stream_version)
);

CREATE TABLE snapshots (
    stream_id        TEXT    PRIMARY KEY NOT NULL,
    stream_version   BIGINT  NOT NULL,  -- the last event folded into it
    snapshot_version INTEGER NOT NULL,  -- the aggregate's state layout
    state            TEXT    NOT NULL,  -- JSON
    taken_at         BIGINT  NOT NULL
);

CREATE TABLE checkpoints (
    projection TEXT   PRIMARY KEY NOT NULL,
    position   BIGINT NOT NULL,         -- last event_store position applied
    updated_at BIGINT NOT NULL
);
