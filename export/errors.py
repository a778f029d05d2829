class ExportError(Exception):
    """An export that cannot go on; the message is one line meant for the user."""
