"""jft: JAX fine-tuning for open LLMs (LoRA/QLoRA, GRPO, export to PEFT / safetensors / GGUF)."""

from jft.config import Config, ConfigError
from jft.convert.safetensors_io import CheckpointError
from jft.memory import OutOfMemoryError
import jft.convert as convert  # noqa: F401
import jft.data as data  # noqa: F401
import jft.lora as lora  # noqa: F401
import jft.train as train  # noqa: F401
import jft.sharding as sharding  # noqa: F401
from jft.sharding import mesh
from jft.model import Generation, Model, forward, generate, load

__all__ = ["Config", "ConfigError", "CheckpointError", "Generation", "Model", "OutOfMemoryError", "forward", "generate",
           "load", "mesh"]
__version__ = "0.1.0"
