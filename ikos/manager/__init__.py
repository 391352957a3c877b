"""The manager, ikosd: event loop, control socket, configuration loading, state."""
