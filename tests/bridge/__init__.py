"""Rocket.Chat in and out: ingest, webhooks, the REST client, apply, end to end."""
