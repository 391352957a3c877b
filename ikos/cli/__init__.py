"""Command-line front ends of ikos: ``ikosctl``, the control client.

The commands are thin: they parse arguments, talk to ikosd through
:class:`ikos.platform._control.ControlClient` and render the answers
(:mod:`ikos.cli._render`); everything they show comes from the protocol
documented in ``docs/protocol.md``. Nothing is imported here, so that
``python -m ikos.cli._ikosctl`` runs its module exactly once.
"""
