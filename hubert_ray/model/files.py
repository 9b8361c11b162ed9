"""The model directory's files, checked before any Ray work: its ``config.json`` and weights."""

from __future__ import annotations

import json
import logging
import os

from hubert_ray.core.errors import ConfigError
from hubert_ray.io import storage
from hubert_ray.model import families as models

log = logging.getLogger("hubert_ray")


# -- checks that run before any Ray work -------------------------------------------------------
def read_model_config(
    model_uri: str, storage_options: dict | None = None, allow_pickle: bool = False
) -> dict:
    """The model directory's ``config.json``, checking the weights are safetensors (or, with
    ``allow_pickle``, pickle ``.bin`` weights: loading those can run arbitrary code), that it
    names a supported model family and that the weights fit it."""
    fs, path = storage.filesystem(model_uri, storage_options)
    cfg_path = f"{path.rstrip('/')}/config.json"
    if not fs.exists(cfg_path):
        raise ConfigError(
            f"model={model_uri!r} has no config.json; expected a directory written "
            "by save_pretrained (config.json + model.safetensors)",
            field="model",
        )
    names = [os.path.basename(p) for p in fs.ls(path, detail=False)]
    weights = (".safetensors", ".bin") if allow_pickle else (".safetensors",)
    if not any(n.endswith(weights) for n in names):
        raise ConfigError(
            f"model={model_uri!r} has no *.safetensors weights (found: "
            f"{sorted(names)}); pickle-based weights are not loaded unless "
            "--allow-pickle-weights is given (they can run code when loaded)",
            field="model",
        )
    with fs.open(cfg_path, "r") as f:
        cfg = json.load(f)
    # A supported model family whose weights fit its config (hubert_ray.model.families).
    models.check_model_files(fs, path, cfg, model_uri)
    return cfg


def fp32_weight_bytes(model_uri: str, storage_options: dict | None = None) -> int:
    """Bytes of the model's parameters in float32, from the safetensors headers only."""
    fs, path = storage.filesystem(model_uri, storage_options)
    numel = 0
    for name in fs.ls(path, detail=False):
        if not name.endswith(".safetensors"):
            continue
        with fs.open(name, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                numel += n
    return 4 * numel


def model_fingerprint(model_uri: str, storage_options: dict | None = None) -> str:
    """Hash of the model directory's weights and configs: content for local directories (the
    same value as the feature rows' ``model_revision``), name + size + ETag on object storage."""
    import hashlib

    fs, path = storage.filesystem(model_uri, storage_options)
    digest = hashlib.sha256()
    remote = storage.is_remote(model_uri)
    for name in sorted(fs.ls(path, detail=False), key=os.path.basename):
        base = os.path.basename(name)
        if not base.endswith((".safetensors", ".json", ".bin")):
            continue
        digest.update(base.encode())
        if remote:
            info = fs.info(name)
            digest.update(f"{info.get('size')}:{info.get('ETag', '')}".encode())
        else:
            with fs.open(name, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]
