-- An index on every foreign key column that had none. Deleting a row runs its ON DELETE action on the rows
-- that reference it: without an index that is a full scan of the referencing table per deleted row. Deleting
-- a user with 115 models scanned every stored prediction (3 M rows) 115 times (20 s, so the web UI's delete
-- hit its statement timeout); deleting a job, device, gesture or session scanned its referencing table alike.
CREATE INDEX IF NOT EXISTS predictions_model_idx ON predictions (model_id);
CREATE INDEX IF NOT EXISTS model_artifacts_job_idx ON model_artifacts (job_id);
CREATE INDEX IF NOT EXISTS capture_sessions_device_idx ON capture_sessions (device_id);
CREATE INDEX IF NOT EXISTS session_intervals_gesture_idx ON session_intervals (gesture_id);
CREATE INDEX IF NOT EXISTS videos_session_idx ON videos (session_id);
CREATE INDEX IF NOT EXISTS api_keys_user_idx ON api_keys (user_id);
