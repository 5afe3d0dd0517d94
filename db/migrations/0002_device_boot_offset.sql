-- A device's stored boot is the boot its packets carry plus boot_offset. "Reset boot counter" (after the
-- device was re-flashed, which restarts its boot counter in NVS) moves the offset past every stored boot, so
-- the device's next boot is newer than what was received, and its samples never collide with stored ones.
ALTER TABLE devices ADD COLUMN IF NOT EXISTS boot_offset bigint NOT NULL DEFAULT 0 CHECK (boot_offset >= 0);
