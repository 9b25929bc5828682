import os

# Triton kernels run in the interpreter on CPU; this must be set before any kernel module is imported.
# A GPU run sets TRITON_INTERPRET=0 itself to exercise the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_checkpoints import TINY_CONFIGS, smollm2_hf_dir, tiny_checkpoint  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model_dir(request):
    """Every tiny architecture variant in turn (random weights, saved by transformers)."""
    return tiny_checkpoint(request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir():
    return tiny_checkpoint("llama")


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted from the packaged GGUF into an HF directory (cached)."""
    return smollm2_hf_dir()
