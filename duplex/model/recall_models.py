"""The small recall models: one width, four mixers (GWA, the gated delta rule alone,
sliding-window attention, full attention) at the same depth, GWA with predicted lookups at three
reads (recall-gwa-lookup), and their shipped weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path

from duplex.model.backbone import Backbone, BackboneConfig
from duplex.model.gwa import GWAReadConfig
from duplex.model.recall_tasks import VOCAB

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def model_config(name: str) -> BackboneConfig:
    """The recall models: same width and depth, different mixers."""
    read = GWAReadConfig(orders=(4, 2, 1), per_order=2, max_walk=32, win_before=4, win_after=4)
    layers = {
        "recall-gwa": ("gdn", "mlp", "gwa", "mlp"),
        "recall-gdr": ("gdn", "mlp", "gdn", "mlp"),
        "recall-swa": ("swa", "mlp", "swa", "mlp"),
        "recall-attn": ("attn", "mlp", "attn", "mlp"),
        # Three reads with lookup heads: a chain of n facts needs n reads, each keyed by what
        # the one before found (hop3 = the suffix read, then two predicted lookups).
        "recall-gwa-lookup": ("gdn", "mlp", "gwa", "mlp", "gwa", "mlp", "gwa", "mlp"),
    }
    if name not in layers:
        raise ValueError(f"unknown recall model {name!r}; choose from {sorted(layers)}")
    if name == "recall-gwa-lookup":
        read = dataclasses.replace(read, lookup_keys=2, lookup_per_key=2)
    return BackboneConfig(
        vocab_size=VOCAB,
        d_model=64,
        layers=layers[name],
        gdn_heads=2,
        gdn_head_dim=32,
        gwa_heads=2,
        gwa_head_dim=32,
        attn_heads=2,
        attn_head_dim=32,
        swa_window=64,
        read=read,
    )


MODELS = ("recall-gwa", "recall-gdr", "recall-swa", "recall-attn", "recall-gwa-lookup")


def _config_to_json(cfg: BackboneConfig) -> str:
    return json.dumps(asdict(cfg))


def _config_from_json(text: str) -> BackboneConfig:
    d = json.loads(text)
    d["layers"] = tuple(d["layers"])
    d["read"] = GWAReadConfig(**{**d["read"], "orders": tuple(d["read"]["orders"])})
    return BackboneConfig(**d)


def save_model(model: Backbone, path: str | Path, name: str) -> None:
    """Weights as safetensors, config and name in its metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": _config_to_json(model.cfg), "name": name}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def load_recall(name_or_path: str) -> Backbone:
    """A shipped recall model by name (duplex/model/weights/NAME.safetensors) or a file path."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(name_or_path)
    if not path.is_file():
        path = WEIGHTS_DIR / f"{name_or_path}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"no recall model {name_or_path!r}: not a file and not shipped in {WEIGHTS_DIR} "
            f"(train one: duplex train recall --model {name_or_path})"
        )
    with safe_open(str(path), "pt") as f:
        cfg = _config_from_json(f.metadata()["config"])
    model = Backbone(cfg)
    model.load_state_dict(load_file(str(path)))
    return model.eval()
