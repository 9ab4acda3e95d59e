-- Authenticity (docs/adr/010-signed-messages.md).
--
-- catchment: each site's Ed25519 public keys (base64). The current key has no valid_to; a
-- rotation closes it and opens the next, so batches signed before the rotation still verify in
-- the provenance export.
CREATE TABLE site_keys (
    site        TEXT        NOT NULL REFERENCES sites (id),
    public_key  TEXT        NOT NULL,
    valid_from  TIMESTAMPTZ NOT NULL,
    valid_to    TIMESTAMPTZ,
    PRIMARY KEY (site, public_key)
);

CREATE UNIQUE INDEX site_keys_current ON site_keys (site) WHERE valid_to IS NULL;

-- telemetry: the exact signed bytes of every stored signed batch, once per batch, with its
-- signature and key, so an auditor can check where a stored record came from with the public
-- key alone. first_ts/last_ts span the records' times (the export's range).
CREATE TABLE batch_signatures (
    id          BIGSERIAL   PRIMARY KEY,
    site        TEXT        NOT NULL,
    batch       TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    public_key  TEXT        NOT NULL,
    signature   TEXT        NOT NULL,
    body        BYTEA       NOT NULL,
    first_ts    TIMESTAMPTZ NOT NULL,
    last_ts     TIMESTAMPTZ NOT NULL
);

CREATE INDEX batch_signatures_site_ts ON batch_signatures (site, last_ts);
