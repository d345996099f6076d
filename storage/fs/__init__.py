"""Blocking filesystem building blocks shared by ``storage`` and ``backends``.

``walk`` (a bounded descriptor walk), ``tree`` (one copy, one remove, one
count), ``crossmove`` (rename across EXDEV), ``usage`` (a tree's usage and its
cache) and ``atomic`` (one durable write-and-rename, ``fsync_dir``).  Nothing
here knows HTTP, a volume or an upload, and nothing here imports from
``backends``: the backends and the upload engine both build on it.
"""
