"""The one exception type whose message is shown to users as is (one sentence, no traceback)."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""
