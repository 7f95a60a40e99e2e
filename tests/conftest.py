"""Fixtures shared across test modules."""

import atexit
import os
import shutil
import tempfile

from _convert_models import tiny_models  # noqa: F401  (session fixture: one tiny HF model per family)
from _dist_ckpts import dist_ckpts  # noqa: F401  (session fixture: torch_dist checkpoints saved by megatron-core)

# the tests' tokenizer cache (data/tokenizer.py): one per session, never the user's ~/.cache
if "ASCENDFACTORY_TOKENIZER_CACHE" not in os.environ:
    os.environ["ASCENDFACTORY_TOKENIZER_CACHE"] = tempfile.mkdtemp(prefix="ascendfactory-test-tokcache-")
    atexit.register(shutil.rmtree, os.environ["ASCENDFACTORY_TOKENIZER_CACHE"], ignore_errors=True)
