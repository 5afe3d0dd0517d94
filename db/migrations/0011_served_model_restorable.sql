-- users.served_artifact_id (0010) points at model_artifacts, which point back at users: a backup's data-only
-- restore (semg.backup) loads users before model_artifacts, so a user's chosen model was "not present" yet and the
-- whole restore failed. The restore defers this one check until all its rows are in (SET CONSTRAINTS); everything
-- else still checks it at once. Conditional: run again (a restore of an older backup does), it changes nothing.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'users_served_artifact_id_fkey'
               AND conrelid = 'users'::regclass AND NOT condeferrable) THEN
        ALTER TABLE users ALTER CONSTRAINT users_served_artifact_id_fkey DEFERRABLE INITIALLY IMMEDIATE;
    END IF;
END $$;
