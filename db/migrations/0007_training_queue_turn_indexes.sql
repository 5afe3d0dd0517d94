-- Whose turn it is in the training queue (ml_model/jobs.py claim_next): per user with a job waiting, the jobs
-- it has in progress and when its last job started. Read from the jobs table, that was every job the user ever
-- had (jobs are kept as long as their user): ~100 ms per claim for 1000 waiting users with 300 finished jobs
-- each, growing with the history. These make it an index lookup per waiting user.
CREATE INDEX IF NOT EXISTS training_jobs_user_started_idx ON training_jobs (user_id, started_at);
CREATE INDEX IF NOT EXISTS training_jobs_running_idx ON training_jobs (user_id) WHERE status = 'in-progress';
CREATE INDEX IF NOT EXISTS training_jobs_waiting_idx ON training_jobs (user_id, created_at, id) WHERE status = 'scheduled';
