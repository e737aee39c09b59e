"""Shared test configuration: hypothesis profiles.

Profiles (pick one with ``HYPOTHESIS_PROFILE=name``; default ``ci``):

- ``ci``: derandomized (the same examples on every run and machine), no example
  database, no deadline, 40 examples per property: the property suite stays fast and
  reproducible.
- ``dev``: random exploration with the example database, 100 examples.
- ``thorough``: 1000 random examples per property, for a long hunt.

Property tests set no ``max_examples`` of their own, so the profile decides.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, max_examples=40, print_blob=True
)
settings.register_profile("dev", deadline=None, max_examples=100)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
