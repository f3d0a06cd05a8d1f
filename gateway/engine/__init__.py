"""Generation: limits per account, the per-prediction pipeline, the upstream client, files."""
