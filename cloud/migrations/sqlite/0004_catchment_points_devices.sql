-- catchment: points (the regulator's "obras"), devices, and what sites gain for alerts and MQTT
-- credentials. Times are INTEGER microseconds since the Unix epoch, UTC.

-- Seconds without news from a site's agent after which it counts as offline (alerts).
ALTER TABLE sites ADD COLUMN offline_after_s INTEGER NOT NULL DEFAULT 900 CHECK (offline_after_s > 0);
-- The agent's MQTT password as a Mosquitto `$7$` PBKDF2-SHA512 string; NULL until one is issued.
-- The password itself is shown once and never stored.
ALTER TABLE sites ADD COLUMN mqtt_password_hash TEXT;
ALTER TABLE sites ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;
UPDATE sites SET updated_at = created_at;

CREATE TABLE catchment_points (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    name                 TEXT    NOT NULL,
    -- DGA código de obra (OB|OR-RRPP-n), unique when set; NULL until the DGA assigns one.
    obra_code            TEXT    UNIQUE,
    kind                 TEXT    NOT NULL CHECK (kind IN ('groundwater', 'surface_flow', 'surface_level')),
    latitude             REAL    CHECK (latitude BETWEEN -90 AND 90),
    longitude            REAL    CHECK (longitude BETWEEN -180 AND 180),
    authorized_flow_lps  REAL    CHECK (authorized_flow_lps > 0),
    annual_volume_m3     REAL    CHECK (annual_volume_m3 > 0),
    dga_standard         TEXT    CHECK (dga_standard IN ('mayor', 'medio', 'menor', 'caudales_muy_pequenos')),
    -- RUT of the informante the DGA registered for this obra (rutUsuario), NNNNNNNN-D.
    informant_rut        TEXT,
    -- Depth of the level sensor below the well's reference point, m: set when the level device
    -- reports the water column above the sensor, so depth to water = this - column.
    level_sensor_depth_m REAL    CHECK (level_sensor_depth_m > 0),
    active               INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    CHECK ((latitude IS NULL) = (longitude IS NULL))
);

-- A device as its agent names it in readings (`device`), within its site.
CREATE TABLE devices (
    site        TEXT    NOT NULL REFERENCES sites (id),
    id          TEXT    NOT NULL,
    name        TEXT    NOT NULL DEFAULT '',
    -- Meter profile name (config/profiles), '' when unknown.
    profile     TEXT    NOT NULL DEFAULT '',
    -- JSON array of what it measures: "flow", "totalizer", "level".
    quantities  TEXT    NOT NULL DEFAULT '[]',
    -- JSON array of extra channel names, as in readings' `extra`.
    extras      TEXT    NOT NULL DEFAULT '[]',
    point_id    INTEGER REFERENCES catchment_points (id),
    active      INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (site, id)
);

CREATE INDEX devices_point ON devices (point_id);
