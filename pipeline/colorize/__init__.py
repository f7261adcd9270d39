"""`recolor colorize`: photos in, colorized pictures out, in one process (`local`) or on Ray Data (`cluster`).

`pixels` holds the colorizing itself, `files` what is read and written; both paths share them.
"""
