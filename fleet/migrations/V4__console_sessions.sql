-- Version 4: the web console's sessions and one-time login codes, kept here so that every
-- control-plane server knows them and a browser may be answered by any. Secrets are kept
-- only as their SHA-256; the CSRF token is kept as it is, since the page is given it (it
-- is worth nothing without the session id, of which only the hash is here).

CREATE TABLE console_codes (
    code_sha256 bytea PRIMARY KEY,
    principal   text NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX console_codes_expiry ON console_codes (expires_at);

CREATE TABLE console_sessions (
    id_sha256  bytea PRIMARY KEY,
    principal  text NOT NULL,
    csrf       text NOT NULL,
    tag        text NOT NULL,
    opened_at  timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX console_sessions_last_seen ON console_sessions (last_seen);
