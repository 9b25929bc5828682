from promptcot_engine.models.decoder import DecoderForCausalLM
from promptcot_engine.models.loader import Checkpoint, load_model, open_checkpoint
from promptcot_engine.models.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from promptcot_engine.models.tokenizer import Tokenizer

__all__ = ["Checkpoint", "DecoderForCausalLM", "ModelConfig", "SUPPORTED_ARCHITECTURES", "Tokenizer", "load_model", "open_checkpoint"]
