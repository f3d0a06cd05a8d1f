"""Durable jobs: the journal (SQLite, or PostgreSQL shared by replicas), the job manager and
its heartbeat, the read side of jobs, webhooks."""
