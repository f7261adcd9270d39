"""`recolor colorize`: photos in, colorized pictures out, in one process (`local`) or on Ray Data (`cluster`).

`pixels` holds the colorizing itself, `files` what is read and written; both paths share them. Films: `video` (PyAV:
decode, colorize, encode with the sound), `temporal` (against flicker, along the optical flow), `chunks` (a film cut at
keyframes and colorized in parallel on Ray). `cli` is `recolor colorize`'s options and its run.
"""
