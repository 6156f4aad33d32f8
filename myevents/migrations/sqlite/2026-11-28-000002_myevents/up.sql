-- MyEvents read models. Each context has its own database file; a context
-- only touches its own tables. Shaped so that event sourcing (a later issue)
-- replaces the write side only.

-- events context
CREATE TABLE locations (
    id         TEXT    PRIMARY KEY NOT NULL,
    name       TEXT    NOT NULL,
    address    TEXT    NOT NULL,
    country    TEXT    NOT NULL,
    open_time  INTEGER NOT NULL,
    close_time INTEGER NOT NULL,
    halls      TEXT    NOT NULL -- JSON array of {name, location?, capacity}
);

CREATE TABLE events (
    id           TEXT    PRIMARY KEY NOT NULL,
    name         TEXT    NOT NULL,
    duration     INTEGER NOT NULL,
    start_date   BIGINT  NOT NULL, -- Unix seconds
    end_date     BIGINT  NOT NULL,
    location_id  TEXT    NOT NULL REFERENCES locations (id),
    hall         TEXT,
    capacity     INTEGER,          -- NULL: unlimited
    seats_booked BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX events_by_name ON events (name);

-- booking context: its own copies of other contexts' facts
CREATE TABLE known_locations (
    id      TEXT NOT NULL PRIMARY KEY,
    name    TEXT NOT NULL,
    address TEXT NOT NULL,
    country TEXT NOT NULL,
    halls   TEXT NOT NULL
);

CREATE TABLE known_events (
    id           TEXT    PRIMARY KEY NOT NULL,
    name         TEXT    NOT NULL,
    location_id  TEXT    NOT NULL, -- as received, never validated
    start_date   TEXT    NOT NULL, -- RFC 3339, as received
    end_date     TEXT    NOT NULL,
    hall         TEXT,
    capacity     BIGINT,           -- NULL: unlimited
    seats_booked BIGINT  NOT NULL DEFAULT 0
);

CREATE TABLE bookings (
    id        TEXT   PRIMARY KEY NOT NULL,
    event_id  TEXT   NOT NULL REFERENCES known_events (id),
    user_id   TEXT   NOT NULL,
    seats     BIGINT NOT NULL CHECK (seats > 0),
    booked_at BIGINT NOT NULL -- Unix seconds
);
CREATE INDEX bookings_by_event ON bookings (event_id, booked_at);
