"""Test-session settings shared by every test file."""
import os
import tempfile

# the up-front image check remembers decodable files; keep the tests' datasets out of ~/.cache
os.environ.setdefault("AUTOFPN_CACHE", tempfile.mkdtemp(prefix="autofpn_test_cache_"))
