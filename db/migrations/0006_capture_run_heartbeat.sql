-- A capture run's heartbeat, so that a run whose UI process died (crash, restart, OOM kill) can be told from a
-- run still live in another UI process, and resumed or stopped from any of them. The window running the capture
-- refreshes heartbeat_at (the database's clock: staleness is judged by now() - heartbeat_at, never by a UI
-- server's clock) and run_seen_at (the UI clock the interval times use: where a take-over cuts the run) about
-- once a second. run_owner names the run writing the session: a take-over is one UPDATE ... WHERE run_owner =
-- the old one, so only one window can win it. run_cursor is what the dead process's memory held: the run's
-- remaining intervals in the order it runs them (a redo or resume inserts some), when the first of them started
-- and whether the run was paused. run_video is its webcam file (path, first frame time). Sessions recorded
-- before this migration have none of these and are closed as before.
ALTER TABLE capture_sessions ADD COLUMN IF NOT EXISTS run_owner text;
ALTER TABLE capture_sessions ADD COLUMN IF NOT EXISTS heartbeat_at timestamptz;
ALTER TABLE capture_sessions ADD COLUMN IF NOT EXISTS run_seen_at timestamptz;
ALTER TABLE capture_sessions ADD COLUMN IF NOT EXISTS run_cursor jsonb;
ALTER TABLE capture_sessions ADD COLUMN IF NOT EXISTS run_video jsonb;
