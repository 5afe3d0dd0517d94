-- The channels that looked failed (electrode off, stuck or railing) when the live worker decided, as
-- [{"channel", "fault", "seconds"}] (semg.messages.ChannelFault); NULL when every channel looked fine.
ALTER TABLE predictions ADD COLUMN IF NOT EXISTS channel_faults jsonb;
