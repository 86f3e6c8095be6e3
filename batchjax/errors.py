"""The one exception type that bad input raises.

Scripts catch it and print its message as a single line (exit status 2), so the
message must name the problem and, where there is one, the fix.
"""


class BatchjaxError(ValueError):
    """Bad input: a clear one-line message, never a traceback for the user."""
