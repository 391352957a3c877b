"""The base class users subclass to write an actor.

An actor runs in its own OS process, owns one mailbox and handles one
message at a time: ``receive`` is called for every message, and its return
value answers an ask. ``on_start`` runs before the first message (the actor
counts as ready once it returns) and ``on_stop`` after the last. An
exception escaping ``receive`` or ``on_start`` crashes the actor; its
supervisor decides what happens next. The process runtime that drives these
hooks lives in ``ikos.actors._runtime``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ikos.actors._ref import ActorRef


class Actor:
    """Subclass and define :meth:`receive`.

    Example::

        class Counter(ikos.Actor):
            def on_start(self) -> None:
                self.count = 0

            def receive(self, message):
                if message == "incr":
                    self.count += 1
                return self.count
    """

    #: The actor's name in the tree, set before ``on_start`` runs.
    name: str = ""

    def on_start(self) -> None:
        """Called once in the actor's process before the first message."""

    def receive(self, message: Any) -> Any:
        """Handle one message; the return value is the reply to an ask."""
        raise NotImplementedError(f"{type(self).__name__} must define receive(self, message)")

    def on_stop(self) -> None:
        """Called once when the actor stops in an orderly way."""

    def stop(self) -> None:
        """Stop after the current message, as a normal exit (not restarted if transient)."""
        self._ikos_stop_requested = True

    def actor(self, name: str) -> ActorRef:
        """A reference to another actor of the same instance, by name."""
        from ikos.actors._ref import ActorRef

        return ActorRef(name)

    @property
    def ref(self) -> ActorRef:
        """A reference to this actor, to hand to others."""
        from ikos.actors._ref import ActorRef

        return ActorRef(self.name)
