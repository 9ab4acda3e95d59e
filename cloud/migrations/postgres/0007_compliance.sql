-- compliance: what is reported to the DGA (MEE), per catchment point and slot, and every exchange
-- with the regulator. Times are TIMESTAMPTZ.

-- The Centro de Control's settings: one row.
CREATE TABLE compliance_settings (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    -- Base URL of the MEE API, e.g. https://apimee.mop.gob.cl/api/v1.
    dga_base_url TEXT    NOT NULL,
    -- RUT of the Centro de Control (rutEmpresa), NNNNNNNN-D; NULL until set.
    rut_empresa  TEXT,
    updated_at   TIMESTAMPTZ NOT NULL,
    updated_by   TEXT    NOT NULL
);

-- How each catchment point is reported.
CREATE TABLE compliance_points (
    point_id        BIGINT PRIMARY KEY REFERENCES catchment_points (id),
    endpoint        TEXT    NOT NULL CHECK (endpoint IN ('subterranea', 'superficial_flujometro', 'superficial')),
    -- The informante's MEE password, AES-256-GCM: 12-byte nonce then ciphertext and tag; the
    -- point id is the associated data, so a ciphertext moved to another point does not open.
    password_enc    BYTEA,
    flow_site       TEXT,
    flow_device     TEXT,
    total_site      TEXT,
    total_device    TEXT,
    level_site      TEXT,
    level_device    TEXT,
    mode            TEXT    NOT NULL DEFAULT 'off' CHECK (mode IN ('off', 'shadow', 'on')),
    -- First slot reported (UTC instant of a 00:00 UTC-4); NULL: nothing is built.
    start_at        TIMESTAMPTZ,
    -- Slot grid; NULL: the point's DGA standard decides.
    period          TEXT    CHECK (period IN ('hourly', 'daily', 'monthly', 'semiannual')),
    -- How caudal is taken; NULL: the default for the period.
    flow_method     TEXT    CHECK (flow_method IN ('sample', 'mean')),
    -- |flow| below this (L/s) but not 0 is zero-point noise: the slot is held.
    low_flow_lps    DOUBLE PRECISION    NOT NULL DEFAULT 0.2 CHECK (low_flow_lps >= 0),
    -- Set when the DGA refused the configuration (wrong informante or password): nothing more is
    -- sent for the point until its settings change.
    stopped_reason  TEXT,
    stopped_at      TIMESTAMPTZ,
    updated_at      TIMESTAMPTZ NOT NULL,
    updated_by      TEXT    NOT NULL
);

-- Who changed which setting; a password shows as ****.
CREATE TABLE compliance_audit (
    id        BIGSERIAL PRIMARY KEY,
    point_id  BIGINT,
    at        TIMESTAMPTZ NOT NULL,
    actor     TEXT    NOT NULL,
    change    TEXT    NOT NULL
);

CREATE INDEX compliance_audit_point ON compliance_audit (point_id, id);

-- One row per (point, slot): the values built for it, its checks and its submission state.
CREATE TABLE compliance_slots (
    point_id        BIGINT NOT NULL REFERENCES catchment_points (id),
    slot_at         TIMESTAMPTZ NOT NULL,
    state           TEXT    NOT NULL,
    caudal          TEXT,
    totalizador     TEXT,
    nivel           TEXT,
    altura          TEXT,
    -- Why a slot is held (or failed, or was refused), for a person to read.
    reason          TEXT,
    detail          TEXT    NOT NULL DEFAULT '',
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ,
    receipt         TEXT,
    reviewed_by     TEXT,
    note            TEXT    NOT NULL DEFAULT '',
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (point_id, slot_at)
);

CREATE INDEX compliance_slots_state ON compliance_slots (state, point_id, slot_at);

-- Every request sent to the regulator (password as ****) and what came back.
CREATE TABLE compliance_exchanges (
    id           BIGSERIAL PRIMARY KEY,
    point_id     BIGINT NOT NULL,
    slot_at      TIMESTAMPTZ NOT NULL,
    attempt      BIGINT NOT NULL,
    sent_at      TIMESTAMPTZ NOT NULL,
    request      TEXT    NOT NULL,
    http_status  BIGINT,
    response     TEXT,
    outcome      TEXT,
    answered_at  TIMESTAMPTZ
);

CREATE INDEX compliance_exchanges_slot ON compliance_exchanges (point_id, slot_at, id);
