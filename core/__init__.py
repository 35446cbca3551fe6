"""The bottom layer: what pipeline/ and cloud/ both need, importing nothing of ours.

errors (the error-with-hint base), sparse (where a file's data is), hashing (sha256 and
the fast change digest). Everything may import this package; it imports only the
standard library (and xxhash, lazily). tests/test_imports.py enforces the directions.
"""
