"""Built-in handler plugins, registered through entry points exactly as third-party ones are."""
