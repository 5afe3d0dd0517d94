"""UDP ingestion of sEMG sensor packets: validation, journaling, storage in PostgreSQL, publishing on NATS."""
