"""promptcot_engine: inference and training engine for the PromptCoT 2.0 EM loop."""
from promptcot_engine.errors import InputError
from promptcot_engine.sampling_params import SamplingParams

__all__ = ["LLM", "InputError", "SamplingParams"]


def __getattr__(name):
    # LLM pulls in the engine (and torch kernels); import it on first use so `import promptcot_engine` stays light
    if name == "LLM":
        from promptcot_engine.engine.llm import LLM

        return LLM
    raise AttributeError(name)
