-- catchment: sites. A site is one agent: one MQTT identity, one sequence space.
CREATE TABLE sites (
    id          TEXT        NOT NULL PRIMARY KEY,
    name        TEXT        NOT NULL DEFAULT '',
    active      BOOLEAN     NOT NULL DEFAULT TRUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
