-- The model a user chose to serve ("roll back" to an earlier one without retraining), and when. It stays served
-- until a training job queued after that moment stores a model (semg.repo.SERVED_MODELS_SQL is the one rule).
-- Deleting the chosen model clears the choice: the user falls back to the newest model, never to none.
-- The model must be the user's own: semg.repo.choose_served_model checks it (the only writer).
-- DEFERRABLE (checked at once unless deferred): users and model_artifacts now refer to each other, and a backup's
-- data-only restore (semg.backup) loads users before model_artifacts, so it defers this check to after the rows.
ALTER TABLE users ADD COLUMN IF NOT EXISTS served_artifact_id bigint REFERENCES model_artifacts (id) ON DELETE SET NULL
    DEFERRABLE INITIALLY IMMEDIATE;
ALTER TABLE users ADD COLUMN IF NOT EXISTS served_chosen_at timestamptz;
-- deleting a model looks its choosers up (migration 0004: every foreign key is indexed)
CREATE INDEX IF NOT EXISTS users_served_artifact_idx ON users (served_artifact_id) WHERE served_artifact_id IS NOT NULL;
