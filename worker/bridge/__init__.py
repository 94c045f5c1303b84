"""The bridge to a real Rocket.Chat: ``ingest`` puts its messages on the topic, ``apply`` carries commands back."""
