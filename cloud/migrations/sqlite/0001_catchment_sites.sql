-- catchment: sites. A site is one agent: one MQTT identity, one sequence space.
-- Times are INTEGER microseconds since the Unix epoch, UTC.
CREATE TABLE sites (
    id          TEXT    NOT NULL PRIMARY KEY,
    name        TEXT    NOT NULL DEFAULT '',
    active      INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    created_at  INTEGER NOT NULL
);
