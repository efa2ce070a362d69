"""parallelnet.experiments: load generators and measurement scripts."""
