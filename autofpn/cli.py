"""How the commands report: log lines on stderr, and on a user's mistake: one line on stderr, exit code 2, no traceback.

``run_command(main, argv)`` runs a command's ``main``; the project's input errors (config,
genotype, annotations, results, checkpoints, backbone weights, images, the study's folder)
and missing or unreadable files become ``error: <file or key>: <what is wrong>``. Anything
else is a bug and keeps its traceback. ``AUTOFPN_DEBUG=1`` shows the traceback of every error.
"""
import logging
import os
import sys
from typing import Callable, Optional, Sequence

# (module, class): the modules are not imported here; an error class can only have been raised
# if its module was imported, so the classes are looked up in sys.modules when one is raised.
USER_ERRORS = (
    ("autofpn.config", "ConfigError"),
    ("autofpn.models.genotype", "GenotypeError"),
    ("autofpn.models.backbone", "BackboneWeightsError"),
    ("autofpn.data.base", "AnnotationError"),
    ("autofpn.data.transforms", "ImageLoadError"),
    ("autofpn.eval.coco", "ResultsError"),
    ("autofpn.engine.checkpoint", "CheckpointError"),
    ("autofpn.study", "StudyError"),
    ("autofpn.engine.runs", "FolderInUseError"),
    ("autofpn.search.evolution", "EvolutionError"),
)


def user_error_types() -> tuple:
    found = [getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules]
    return tuple(found) + (FileNotFoundError, IsADirectoryError, PermissionError)


def run_command(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """``main(argv)`` with the project's log lines on stderr (dataset summaries, backends) and
    a user's mistake reported as one line."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return main(argv)
    except Exception as e:  # noqa: BLE001 - sorted below: ours become one line, bugs re-raise
        if os.environ.get("AUTOFPN_DEBUG") or not isinstance(e, user_error_types()):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
