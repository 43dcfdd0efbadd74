"""Test-session settings shared by every test file."""
import atexit
import os
import shutil
import tempfile

# the up-front image check remembers decodable files; keep the tests' datasets out of ~/.cache,
# in a folder that goes when the session ends (subprocesses inherit the variable, not the folder)
if "AUTOFPN_CACHE" not in os.environ:
    os.environ["AUTOFPN_CACHE"] = tempfile.mkdtemp(prefix="autofpn_test_cache_")
    atexit.register(shutil.rmtree, os.environ["AUTOFPN_CACHE"], ignore_errors=True)
