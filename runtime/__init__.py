"""The cOS runtime: the code that runs ON the booted OS (cos-setup, cos-deploy, ...).

It is shipped into every flavor's image by the toolkit package cos-runtime and runs on
the distro's python3 (>= 3.11) with the distro's PyYAML: nothing from PyPI, and nothing
of the build side (pipeline/, cloud/) is ever imported here (tests/test_imports.py).
Every tool takes the target root as a parameter (System.root), so the tests run it on
the host against a scratch root.
"""
