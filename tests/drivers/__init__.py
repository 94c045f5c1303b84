"""Scripts the multi-process tests run as separate OS processes, and measurement scripts run by hand."""
