"""Watching daemons: log capture and rotation, resource sampling, limits, alerts."""
