"""What an operator sees of a worker: metrics and health (the pipeline's hooks), the HTTP endpoint, the monitor."""
