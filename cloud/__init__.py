"""One uploader per cloud behind one interface (see cloud/base.py)."""
