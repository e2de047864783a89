"""The SQL store: the source of truth for jobs, their logs and checkpoints, and every
other object a tenant creates."""
