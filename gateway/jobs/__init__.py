"""Durable jobs: the journal, the job manager and its read side, webhooks."""
