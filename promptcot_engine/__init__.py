"""promptcot_engine: inference and training engine for the PromptCoT 2.0 EM loop."""
from promptcot_engine.errors import InputError

__all__ = ["InputError"]
