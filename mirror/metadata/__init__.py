"""Tag records and the repository catalogue: in Redis, or in-process."""
