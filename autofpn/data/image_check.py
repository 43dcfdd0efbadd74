"""Up-front check that every image file of a dataset can be decoded, cached between runs.

A truncated JPEG otherwise surfaces when the loader first reaches it: at the final evaluation,
after the whole training. The check per file: it exists and is not empty, PIL reads its header,
and a JPEG ends with its end-of-image marker (a PNG with its IEND chunk); a file failing the
marker test is decoded in full to decide (some writers append bytes after the marker, and such
files decode). Files that passed are remembered by (path, size, mtime) in
``$AUTOFPN_CACHE`` (default ``~/.cache/autofpn``), so later runs stat each file and nothing else.
"""
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

logger = logging.getLogger(__name__)

TAIL_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def cache_dir() -> str:
    return os.environ.get("AUTOFPN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "autofpn")


def image_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be used as an image, or None when it decodes."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
    except FileNotFoundError:
        return "missing"
    try:
        with Image.open(path) as img:
            fmt = img.format
        marker = TAIL_MARKERS.get(fmt)
        if marker is not None:
            with open(path, "rb") as f:
                f.seek(-min(os.path.getsize(path), 64), os.SEEK_END)
                if marker in f.read():
                    return None
        with Image.open(path) as img:  # no marker to test, or not found: decode in full
            img.load()
        return None
    except Exception as e:  # noqa: BLE001 - any failure to decode is the answer
        return f"cannot decode ({type(e).__name__}: {e})"


def _key(path: str) -> Optional[str]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def find_bad_images(paths: Sequence[str], name: str, threads: int = 8) -> List[Tuple[str, str]]:
    """(path, reason) of every file of ``paths`` that cannot be decoded; ``name`` (the dataset)
    names the cache file."""
    cache_path = os.path.join(cache_dir(), f"images_ok_{hashlib.sha1(name.encode()).hexdigest()[:16]}.json")
    try:
        with open(cache_path) as f:
            known_ok = set(json.load(f))
    except (OSError, ValueError):
        known_ok = set()
    keys: Dict[str, Optional[str]] = {p: _key(p) for p in paths}
    todo = [p for p in paths if keys[p] is None or keys[p] not in known_ok]
    if len(todo) > 1000:
        logger.info("%s: checking that %d images decode (remembered for later runs)", name, len(todo))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = list(pool.map(image_problem, todo))
    bad = [(p, why) for p, why in zip(todo, problems) if why is not None]
    newly_ok = {keys[p] for p, why in zip(todo, problems) if why is None and keys[p] is not None}
    if newly_ok:
        try:
            os.makedirs(cache_dir(), exist_ok=True)
            tmp = f"{cache_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(sorted(known_ok | newly_ok), f)
            os.replace(tmp, cache_path)
        except OSError as e:  # a read-only home: check again next time
            logger.info("image check cache not written (%s)", e)
    return bad
