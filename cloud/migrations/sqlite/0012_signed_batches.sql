-- Authenticity (docs/adr/010-signed-messages.md). Times are INTEGER microseconds since the
-- Unix epoch, UTC.
--
-- catchment: each site's Ed25519 public keys (base64). The current key has no valid_to; a
-- rotation closes it and opens the next, so batches signed before the rotation still verify in
-- the provenance export.
CREATE TABLE site_keys (
    site        TEXT    NOT NULL REFERENCES sites (id),
    public_key  TEXT    NOT NULL,
    valid_from  INTEGER NOT NULL,
    valid_to    INTEGER,
    PRIMARY KEY (site, public_key)
);

CREATE UNIQUE INDEX site_keys_current ON site_keys (site) WHERE valid_to IS NULL;

-- telemetry: the exact signed bytes of every stored signed batch, once per batch, with its
-- signature and key, so an auditor can check where a stored record came from with the public
-- key alone. first_ts/last_ts span the records' times (the export's range).
CREATE TABLE batch_signatures (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    site        TEXT    NOT NULL,
    batch       TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    public_key  TEXT    NOT NULL,
    signature   TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    first_ts    INTEGER NOT NULL,
    last_ts     INTEGER NOT NULL
);

CREATE INDEX batch_signatures_site_ts ON batch_signatures (site, last_ts);
