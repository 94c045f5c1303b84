"""Stand-ins for servers the project talks to, built from their documented behaviour."""
