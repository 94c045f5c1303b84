"""The benchmark of issue 8: raw Kafka, a naive loop and `rc-worker run`, side by side in one table."""
