-- Web UI sign-ins remembered across page loads and tabs: the browser keeps a random token in a cookie, the
-- database only its SHA-256 (a copy of this table signs nobody in). password_tag is HMAC-SHA256 keyed by the
-- token over the UI password in force at sign-in: a changed UI password ends every session, and the table holds
-- nothing that tests a guess of the password without a token. Not user data: never in a backup.
CREATE TABLE IF NOT EXISTS ui_sessions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash    text NOT NULL UNIQUE,
    password_tag  text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS ui_sessions_expires_idx ON ui_sessions (expires_at);
