"""The one exception type that means "the user gave us something we cannot use".

The CLI prints its message as a single line and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class HybridFTError(Exception):
    """A problem with the user's input (data, config, model folder, output folder).

    The message names the problem and the fix, in one line.
    """
