"""Session-wide settings for the tests.

The native route (pysparse.runtime.native) compiles every step graph it runs with AOTInductor,
tens of seconds a tiny model on 2 cores: it is off for the suite (the graph path runs op by op)
and on in tests/test_native.py, which turns it on where it tests it. Native builds go to a cache
folder of this session, never the user's.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("PYSPARSE_NATIVE", "0")
os.environ.setdefault("PYSPARSE_CACHE_DIR", tempfile.mkdtemp(prefix="pysparse-test-cache-"))
