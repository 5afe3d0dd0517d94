-- A read-only key may only read (GET/HEAD): for an app that only follows a user's decisions (a prosthesis or
-- haptic controller, a dashboard), so that a key copied off its device cannot change or delete anything.
-- The platform's own service key is never read-only (the worker posts /predict).
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS read_only boolean NOT NULL DEFAULT false;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'api_keys_service_not_read_only') THEN
        ALTER TABLE api_keys ADD CONSTRAINT api_keys_service_not_read_only CHECK (role <> 'service' OR NOT read_only);
    END IF;
END $$;
