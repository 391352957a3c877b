"""Actor classes that the configuration tests name by import path (``config_actors:Echo``)."""

from __future__ import annotations

from typing import Any

from ikos.actors._actor import Actor


class Echo(Actor):
    """Answers every message with itself."""

    def receive(self, message: Any) -> Any:
        return message


class Db(Actor):
    """Stands for a dependency other actors require."""

    def receive(self, message: Any) -> Any:
        return None


class NotAnActor:
    """A class that is not an :class:`ikos.Actor`, to be refused."""
