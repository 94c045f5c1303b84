"""Rocket.Chat's REST API, as the worker calls it."""
