import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from jft.data.testing import make_tiny_tokenizer  # noqa: E402
from jft.demo import build_tiny_model  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny Llama checkpoint with a chat-template tokenizer, on disk, for tests that load by path."""
    path = tmp_path_factory.mktemp("base")
    build_tiny_model(str(path), make_tiny_tokenizer(vocab_size=600, chat_template="chatml"), hidden=64, layers=2,
                     intermediate=128)
    return str(path)
