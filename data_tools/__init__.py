"""Builders that turn real sources into clipkit shards (run as ``python -m data_tools.<name>``)."""
