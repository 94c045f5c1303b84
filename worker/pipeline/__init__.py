"""The core stages a record goes through after the consumer: dispatch, the lane, the outbox, offsets; the runner drives them."""
