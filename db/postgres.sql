-- sEMG platform schema, version 1 (baseline). Idempotent: safe to apply any number of times.
-- Later changes go in db/migrations/NNNN_name.sql and are applied in order by `python -m semg.db migrate`,
-- which records each applied version in schema_version. Roles and databases are created elsewhere
-- (semg/embedded.py for the embedded server, docker-entrypoint.sh --create-db for the image).
--
-- Deleting a user deletes all their data: every table below reaches users through ON DELETE CASCADE.
-- Times are timestamptz (server clock); device clocks are kept as unwrapped milliseconds (double precision).

CREATE TABLE IF NOT EXISTS schema_version (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS users (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- the `userid` of packets and NATS subjects
    name        text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    email       text NOT NULL CHECK (email ~ '^[^@\s]+@[^@\s]+$' AND length(email) <= 320),
    notes       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS users_email_lower_key ON users (lower(email));

-- A user's gesture bank. channels_used are 0-based device channel indexes (empty = all channels);
-- channel_purposes maps a channel index (as text) to what that electrode is for, e.g. {"0": "flexors"}.
CREATE TABLE IF NOT EXISTS gestures (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id          bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name             text NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 80 AND upper(name) <> 'REST'),
    description      text NOT NULL DEFAULT '',
    channels_used    smallint[] NOT NULL DEFAULT '{}'
                     CHECK (cardinality(channels_used) <= 16 AND 0 <= ALL (channels_used) AND 15 >= ALL (channels_used)),
    channel_purposes jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(channel_purposes) = 'object'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, name)
);

-- Sensors. 'binary' devices authenticate every packet with HMAC-SHA256 under secret_key;
-- 'legacy' devices send the original text packets and have no key (at most one per user).
CREATE TABLE IF NOT EXISTS devices (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name            text NOT NULL DEFAULT '' CHECK (length(name) <= 80),
    protocol        text NOT NULL DEFAULT 'binary' CHECK (protocol IN ('binary', 'legacy')),
    channel_count   smallint NOT NULL CHECK (channel_count BETWEEN 1 AND 16),
    sample_rate_hz  real NOT NULL CHECK (sample_rate_hz > 0 AND sample_rate_hz <= 10000),
    secret_key      bytea CHECK (secret_key IS NULL OR octet_length(secret_key) BETWEEN 16 AND 64),
    key_rotated_at  timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((protocol = 'legacy') = (secret_key IS NULL))
);
CREATE INDEX IF NOT EXISTS devices_user_idx ON devices (user_id);
CREATE UNIQUE INDEX IF NOT EXISTS devices_one_legacy_per_user ON devices (user_id) WHERE protocol = 'legacy';

-- Sensor samples, stored as one row per accepted packet (a block of n consecutive samples) so ingestion
-- writes thousands of rows per second instead of hundreds of thousands. The view sensor_samples below
-- gives one row per sample. values holds n * channels int16 values, sample-major:
-- sample i, channel c is values[i * channels + c + 1].
-- seq0 is the device's sequence number of the block's first sample (samples are seq0 .. seq0 + n - 1);
-- boot distinguishes device restarts (sequence numbers start again after a reboot).
CREATE TABLE IF NOT EXISTS sample_blocks (
    user_id         bigint NOT NULL,  -- denormalised from devices for the (user, time) queries
    device_id       bigint NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    boot            bigint NOT NULL DEFAULT 0,
    seq0            bigint NOT NULL,
    n               smallint NOT NULL CHECK (n BETWEEN 1 AND 4096),
    channels        smallint NOT NULL CHECK (channels BETWEEN 1 AND 16),
    sample_rate_hz  real NOT NULL CHECK (sample_rate_hz > 0),
    device_millis0  double precision NOT NULL,  -- device clock of the first sample, unwrapped, ms
    device_time0    timestamptz NOT NULL,       -- that instant mapped to the server clock
    server_ts       timestamptz NOT NULL,       -- when the server received the packet
    values          smallint[] NOT NULL,
    CHECK (cardinality(values) = n * channels),
    PRIMARY KEY (device_id, boot, seq0)
);
CREATE INDEX IF NOT EXISTS sample_blocks_user_time_idx ON sample_blocks (user_id, device_time0);
CREATE INDEX IF NOT EXISTS sample_blocks_device_time_idx ON sample_blocks (device_id, device_time0);

CREATE OR REPLACE VIEW sensor_samples AS
SELECT b.user_id,
       b.device_id,
       b.boot,
       b.seq0 + i.k                                                        AS seq,
       b.device_millis0 + i.k * 1000.0 / b.sample_rate_hz                  AS device_millis,
       b.device_time0 + make_interval(secs => i.k / b.sample_rate_hz)      AS device_time,
       b.server_ts,
       b.values[i.k * b.channels + 1 : (i.k + 1) * b.channels]             AS values
FROM sample_blocks b
CROSS JOIN LATERAL generate_series(0, b.n - 1) AS i(k);

-- A guided recording. plan is the timing plan as designed (gestures, repetitions, hold/rest seconds);
-- session_intervals holds each interval with its planned offsets and, once recorded, its actual times.
CREATE TABLE IF NOT EXISTS capture_sessions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id       bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_id     bigint REFERENCES devices (id) ON DELETE SET NULL,
    name          text NOT NULL DEFAULT '',
    status        text NOT NULL DEFAULT 'planned'
                  CHECK (status IN ('planned', 'recording', 'completed', 'aborted')),
    plan          jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    ended_at      timestamptz,
    CHECK (ended_at IS NULL OR started_at IS NULL OR ended_at >= started_at)
);
CREATE INDEX IF NOT EXISTS capture_sessions_user_idx ON capture_sessions (user_id, created_at);

CREATE TABLE IF NOT EXISTS session_intervals (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id       bigint NOT NULL REFERENCES capture_sessions (id) ON DELETE CASCADE,
    ordinal          integer NOT NULL CHECK (ordinal >= 0),
    kind             text NOT NULL CHECK (kind IN ('rest', 'gesture')),
    gesture_id       bigint REFERENCES gestures (id) ON DELETE SET NULL,
    label            text NOT NULL,            -- gesture name, or 'REST'
    repetition       integer NOT NULL DEFAULT 0 CHECK (repetition >= 0),
    planned_start_ms integer NOT NULL CHECK (planned_start_ms >= 0),
    planned_end_ms   integer NOT NULL,
    started_at       timestamptz,              -- actual cue time (server clock)
    ended_at         timestamptz,
    discarded        boolean NOT NULL DEFAULT false,  -- redone repetitions are kept but not trained on
    CHECK (planned_end_ms > planned_start_ms),
    CHECK (ended_at IS NULL OR started_at IS NULL OR ended_at > started_at),
    UNIQUE (session_id, ordinal)
);

-- Webcam recordings; the file lives under $SEMG_STATE_DIR/videos (path is relative to it).
CREATE TABLE IF NOT EXISTS videos (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    session_id   bigint REFERENCES capture_sessions (id) ON DELETE CASCADE,
    path         text NOT NULL UNIQUE CHECK (path !~ '(^/|\.\.)'),
    mime_type    text NOT NULL DEFAULT 'video/webm',
    started_at   timestamptz NOT NULL,   -- server time of the first frame
    ended_at     timestamptz,
    frame_count  integer NOT NULL DEFAULT 0 CHECK (frame_count >= 0),
    fps          real,
    width        integer,
    height       integer,
    bytes        bigint NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS videos_user_idx ON videos (user_id, started_at);

CREATE TABLE IF NOT EXISTS training_jobs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id           bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    status            text NOT NULL DEFAULT 'scheduled'
                      CHECK (status IN ('scheduled', 'in-progress', 'completed', 'failed', 'canceled')),
    params            jsonb NOT NULL DEFAULT '{}'::jsonb,   -- epochs, base model, window, seed, ...
    progress          real NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    epoch_metrics     jsonb NOT NULL DEFAULT '[]'::jsonb,   -- [{epoch, train_loss, train_acc, val_loss, val_acc}]
    error             text,
    cancel_requested  boolean NOT NULL DEFAULT false,
    attempts          integer NOT NULL DEFAULT 0,
    worker            text,              -- host:pid of the worker that holds it
    heartbeat_at      timestamptz,       -- a stale heartbeat means the worker died
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz
);
CREATE INDEX IF NOT EXISTS training_jobs_user_idx ON training_jobs (user_id, created_at);
CREATE INDEX IF NOT EXISTS training_jobs_queue_idx ON training_jobs (created_at) WHERE status = 'scheduled';

CREATE TABLE IF NOT EXISTS training_job_sessions (
    job_id      bigint NOT NULL REFERENCES training_jobs (id) ON DELETE CASCADE,
    session_id  bigint NOT NULL REFERENCES capture_sessions (id) ON DELETE CASCADE,
    PRIMARY KEY (job_id, session_id)
);
CREATE INDEX IF NOT EXISTS training_job_sessions_session_idx ON training_job_sessions (session_id);

CREATE TABLE IF NOT EXISTS job_logs (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id   bigint NOT NULL REFERENCES training_jobs (id) ON DELETE CASCADE,
    ts       timestamptz NOT NULL DEFAULT now(),
    level    text NOT NULL DEFAULT 'INFO',
    message  text NOT NULL
);
CREATE INDEX IF NOT EXISTS job_logs_job_idx ON job_logs (job_id, id);

-- Trained models. weights are safetensors bytes (never pickle); the rest is JSON metadata.
CREATE TABLE IF NOT EXISTS model_artifacts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         bigint REFERENCES users (id) ON DELETE CASCADE,  -- NULL for shared pretrained bases
    job_id          bigint REFERENCES training_jobs (id) ON DELETE SET NULL,
    weights_format  text NOT NULL DEFAULT 'safetensors' CHECK (weights_format IN ('safetensors')),
    weights         bytea NOT NULL,
    sha256          text NOT NULL,
    size_bytes      integer NOT NULL CHECK (size_bytes > 0),
    classes         jsonb NOT NULL,            -- class names in model output order
    channels        smallint[] NOT NULL,       -- device channels the model reads
    sample_rate_hz  real NOT NULL,
    window_ms       real NOT NULL,
    step_ms         real NOT NULL,
    scaler          jsonb NOT NULL,            -- per-channel mean/std fitted on training data
    metrics         jsonb NOT NULL DEFAULT '{}'::jsonb,  -- held-out accuracy, per-class, confusion
    metadata        jsonb NOT NULL,            -- everything needed to rebuild the model
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS model_artifacts_user_idx ON model_artifacts (user_id, created_at DESC);

CREATE TABLE IF NOT EXISTS predictions (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id          bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    model_id         bigint REFERENCES model_artifacts (id) ON DELETE SET NULL,
    gesture          text NOT NULL,
    confidence       real NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    device_id        bigint,
    device_millis    double precision,    -- device clock of the window's last sample
    sample_received  timestamptz,         -- server receive time of that sample
    decided_at       timestamptz NOT NULL DEFAULT now(),
    latency_ms       real
);
CREATE INDEX IF NOT EXISTS predictions_user_time_idx ON predictions (user_id, decided_at);

-- API keys: only the SHA-256 of the key is stored. role 'service' keys belong to no user.
CREATE TABLE IF NOT EXISTS api_keys (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id       bigint REFERENCES users (id) ON DELETE CASCADE,
    name          text NOT NULL DEFAULT '',
    role          text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin', 'service')),
    key_prefix    text NOT NULL,            -- first characters, to recognise a key in lists
    key_hash      text NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    CHECK (role <> 'user' OR user_id IS NOT NULL)
);

INSERT INTO schema_version (version, name) VALUES (1, 'baseline') ON CONFLICT (version) DO NOTHING;
