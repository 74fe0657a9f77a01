"""What every layer may use: the exception for user mistakes, one-line checks of user values, seed specs, and
files written atomically with the umask's permissions.

May import: nothing of amax_lightning outside this package.
"""
