"""Engines: pipelines, LoRA, the worker, batching, loading weights.

``transformers`` warns at import about image processors falling back from torchvision,
which Laneway never uses: its warnings are silenced unless the operator asks for them
(``TRANSFORMERS_VERBOSITY``), so a worker's start prints Laneway's own lines only.
"""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
