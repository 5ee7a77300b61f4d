"""Layers, the DuplexLM, configs, checkpoints and the token log used by guided window attention.

`load(name_or_path)` is the one entry point: the duplex models ("default", the trained talking
model; "tiny", "small", "talk" untrained configs; or a DuplexLM safetensors file) and the recall
models ("recall-gwa", "recall-gdr", ...).
"""

from __future__ import annotations

from pathlib import Path

import torch


def load(name_or_path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A shipped model by name, or a checkpoint file; see `available()`."""
    from duplex.model import duplex_lm, recall

    name = str(name_or_path)
    if name in recall.MODELS or name.startswith("recall-"):
        return recall.load_recall(name).to(device)
    return duplex_lm.load(name_or_path, device)


def available() -> list[str]:
    """Every model name `load` accepts: duplex configs and the recall models that ship weights."""
    from duplex.model import duplex_lm, recall

    shipped = [m for m in recall.MODELS if (recall.WEIGHTS_DIR / f"{m}.safetensors").is_file()]
    trained = sorted(
        p.stem.removeprefix("duplex_")
        for p in duplex_lm.WEIGHTS_DIR.glob("duplex_*.safetensors")
        if p.stem.removeprefix("duplex_") not in duplex_lm.CONFIGS
    )
    return [*sorted(duplex_lm.CONFIGS), *trained, *shipped]
