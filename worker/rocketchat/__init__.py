"""Rocket.Chat's REST API, as ``rc-worker apply`` (and readers of the server) call it."""
