"""Operator commands, one module each: replay, dump/load, dlq, offsets, state, topics, check-config, new-handler."""
