class ExportError(Exception):
    """An export that cannot go on; the message is one line meant for the user."""


class AdapterError(ExportError):
    """An adapter that cannot be added to a model directory; the message is one line meant for the user."""
