"""Small helpers every layer may use: progress bars (progress), files written atomically and
their checksums (files), the version (version).

May import: nothing outside this folder (the bottom layer).
"""
