"""The conversation corpus: dialogues of every curriculum stage, stored once as codec tokens.

`duplex data conversations --out DIR` synthesises dialogues (`duplex.data.dialogue`), encodes the
user's and the model's tracks with a codec of `duplex.codecs`, and writes shards
(`STAGE-SPLIT-NNNNN.npz`, compressed) plus `manifest.json`. Training reads tokens and word
timings only, never audio: nothing is re-synthesised or re-encoded.

A shard holds the user's and the model's codes of all its conversations ([K, frames]: one
codebook's codes side by side compress best; uint8 for codebooks of <= 256 entries), offsets,
every word with its speaker, utterance and frame span, and the events of `dialogue.py` (seconds).
How words become the per-frame text streams the model reads (the model's text leading its audio,
the user's transcript lagging their speech) is decided at training time by `text_stream`, so the
layout can change without regenerating the corpus.

Deterministic: a shard's seed derives from the corpus seed, its stage, split and index, and its
bytes depend on nothing else. A killed run resumes: finished shards (listed in the manifest, or
present on disk) are skipped, a shard is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from duplex.data import dialogue as G
from duplex.data.channel import Channel
from duplex.data.channel import apply as apply_channel
from duplex.data.speech import Voice
from duplex.model.tokenizer import EOT, PAD

VERSION = 1
DEFAULT_HOURS = {"tts": 2.0, "asr": 2.0, "pairs": 1.0, "conversations": 3.0, "duplex": 4.0}


def shard_seed(seed: int, stage: str, split: str, index: int) -> int:
    """A shard's own seed: stable across machines and Python versions."""
    h = hashlib.sha256(f"{seed}/{stage}/{split}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def shard_name(stage: str, split: str, index: int) -> str:
    return f"{stage}-{split}-{index:05d}.npz"


@dataclass
class ShardSpec:
    """What one shard holds: `minutes` of dialogues of one stage and split."""

    stage: str
    split: str
    index: int
    seed: int
    minutes: float
    codec: str
    max_turns: int = 200
    # Probability that a conversation's microphone goes through a random channel (channel.py).
    channel: float = 0.0
    barge_stop: tuple[float, float] = G.BARGE_STOP
    # Each conversation's user voice plays at a speed drawn from [1 - warp, 1 + warp].
    warp: float = 0.0

    @property
    def name(self) -> str:
        return shard_name(self.stage, self.split, self.index)


def plan(
    hours: dict[str, float],
    split: str,
    seed: int,
    codec: str,
    shard_minutes: float = 20.0,
    max_turns: int = 200,
    channel: float = 0.0,
    barge_stop: tuple[float, float] = G.BARGE_STOP,
    warp: float = 0.0,
) -> list[ShardSpec]:
    """The shards that make `hours` of each stage (each rounded up to whole shards)."""
    specs = []
    for stage, h in hours.items():
        if stage not in G.STAGES:
            raise ValueError(f"unknown stage {stage!r}: one of {G.STAGES}")
        n = math.ceil(h * 60 / shard_minutes - 1e-9) if h > 0 else 0
        for i in range(n):
            minutes = min(shard_minutes, h * 60 - i * shard_minutes)
            seed_i = shard_seed(seed, stage, split, i)
            stops = (float(barge_stop[0]), float(barge_stop[1]))
            specs.append(
                ShardSpec(stage, split, i, seed_i, minutes, codec, max_turns, channel, stops, warp)
            )
    return specs


def _codes_dtype(cardinality: int) -> type:
    return np.uint8 if cardinality <= 256 else np.uint16


def encode_tracks(codec, tracks: np.ndarray, chunk_frames: int = 1500) -> np.ndarray:
    """tracks [B, T] float32 at the codec rate -> codes [B, F, K], streamed in chunks so an hour
    of audio never sits in the encoder at once (streamed equals offline for every codec here)."""
    import torch

    B, T = tracks.shape
    fs = codec.frame_size
    F = math.ceil(T / fs)
    x = np.zeros((B, F * fs), np.float32)
    x[:, :T] = tracks
    out = np.zeros((B, F, codec.num_codebooks), _codes_dtype(codec.cardinality))
    with torch.no_grad(), codec.streaming(B):
        for f0 in range(0, F, chunk_frames):
            f1 = min(F, f0 + chunk_frames)
            pcm = torch.from_numpy(x[:, f0 * fs : f1 * fs])[:, None]
            out[:, f0:f1] = codec.encode_step(pcm).permute(0, 2, 1).numpy()
    return out


def dialogue_record(d: G.Dialogue, frame_rate: float) -> dict:
    """The JSON part of a stored conversation: voice, augmentation, words (frames), events."""
    words = [
        [
            0 if w.speaker == "user" else 1,
            w.utt,
            w.text,
            math.floor(w.start * frame_rate),
            math.ceil(w.end * frame_rate),
        ]
        for w in d.words
    ]
    return {
        "stage": d.stage,
        "voice": asdict(d.user_voice),
        "augment": asdict(d.augment),
        "seconds": d.duration,
        "words": words,
        "events": d.events,
    }


def make_shard(spec: ShardSpec, out_dir: Path, codec=None) -> dict:
    """Generate, encode and write one shard; returns its manifest entry."""
    import torch

    from duplex import codecs

    torch.set_num_threads(1)
    codec = codec or codecs.load(spec.codec)
    rng = np.random.default_rng(spec.seed)
    # Channels draw from their own generator: a corpus without them is as it was before.
    channel_rng = np.random.default_rng([spec.seed, 1])
    warp_rng = np.random.default_rng([spec.seed, 2])
    bank = G.WordBank(codec.sample_rate)
    user_parts, model_parts, records, offsets = [], [], [], [0]
    seconds = 0.0
    while seconds < spec.minutes * 60:
        speed = float(warp_rng.uniform(1 - spec.warp, 1 + spec.warp)) if spec.warp else 1.0
        d = G.generate(
            spec.stage,
            rng,
            bank,
            spec.split,
            spec.max_turns,
            barge_stop=spec.barge_stop,
            warp=speed,
        )
        ch = Channel.off()
        if spec.channel > 0 and channel_rng.random() < spec.channel:
            ch = Channel.random(channel_rng)
            d.user = apply_channel(d.user, d.model, codec.sample_rate, ch)
        codes = encode_tracks(codec, np.stack([d.user, d.model]))
        user_parts.append(codes[0])
        model_parts.append(codes[1])
        offsets.append(offsets[-1] + codes.shape[1])
        records.append({**dialogue_record(d, codec.frame_rate), "channel": ch.as_dict()})
        seconds += d.duration
    meta = {
        "version": VERSION,
        "stage": spec.stage,
        "split": spec.split,
        "seed": spec.seed,
        "codec": spec.codec,
        "frame_rate": codec.frame_rate,
        "num_codebooks": codec.num_codebooks,
        "cardinality": codec.cardinality,
        "model_voice": asdict(G.MODEL_VOICE),
        "conversations": records,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / spec.name
    tmp = out_dir / f".{spec.name}.tmp-{os.getpid()}.npz"
    np.savez_compressed(
        tmp,
        user=np.concatenate(user_parts).T,
        model=np.concatenate(model_parts).T,
        offsets=np.array(offsets, np.int64),
        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
    )
    os.replace(tmp, path)
    return _entry(spec, path, meta, offsets[-1])


def _entry(spec: ShardSpec, path: Path, meta: dict, frames: int) -> dict:
    voices = sorted({Voice(**c["voice"]).espeak_name for c in meta["conversations"]})
    return {
        "file": path.name,
        "stage": spec.stage,
        "split": spec.split,
        "index": spec.index,
        "seed": spec.seed,
        "conversations": len(meta["conversations"]),
        "frames": int(frames),
        "hours": frames / meta["frame_rate"] / 3600,
        "bytes": path.stat().st_size,
        "voices": voices,
    }


class Shard:
    """A stored shard: conversation i's codes, words and events."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with np.load(self.path) as z:
                self.user = z["user"]
                self.model = z["model"]
                self.offsets = z["offsets"]
                self.meta = json.loads(z["meta"].tobytes().decode())
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{self.path}: not a readable conversation shard ({e})") from None
        if self.meta.get("version") != VERSION:
            raise ValueError(
                f"{self.path}: shard version {self.meta.get('version')}, this code reads {VERSION}"
            )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def codes(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(user [F, K], model [F, K]) codes of conversation i."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.user[:, a:b].T, self.model[:, a:b].T

    def record(self, i: int) -> dict:
        return self.meta["conversations"][i]

    def text_streams(
        self, i: int, text_lead: int = 0, transcript_delay: int = 3
    ) -> tuple[np.ndarray, np.ndarray]:
        """(model_text [F], user_text [F]) per-frame byte streams of conversation i."""
        F = int(self.offsets[i + 1] - self.offsets[i])
        words = self.record(i)["words"]
        return (
            text_stream(words, 1, F, -text_lead),
            text_stream(words, 0, F, transcript_delay),
        )


def text_stream(words: list, speaker: int, frames: int, shift: int) -> np.ndarray:
    """One speaker's words as one byte per frame: a word's bytes (a space after all but the last
    word of an utterance) start at its first frame + `shift` (negative: the text leads the
    audio), or right after the previous word's bytes when those run late; EOT follows the last
    word of each utterance; PAD elsewhere. -> int16 [frames]."""
    out = np.full(frames, PAD, np.int16)
    mine = [w for w in words if w[0] == speaker]
    pos = 0
    for j, (_, utt, text, f0, _) in enumerate(mine):
        last = j + 1 == len(mine) or mine[j + 1][1] != utt
        data = list(text.encode("utf-8")) + ([EOT] if last else [ord(" ")])
        s = max(f0 + shift, pos, 0)
        n = max(0, min(len(data), frames - s))
        out[s : s + n] = data[:n]
        pos = s + len(data)
    return out


def read_manifest(out_dir: Path) -> dict:
    p = out_dir / "manifest.json"
    if not p.exists():
        return {"version": VERSION, "shards": []}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}): move it away to rebuild it") from None


def write_manifest(out_dir: Path, manifest: dict) -> None:
    tmp = out_dir / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out_dir / "manifest.json")


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _make(args: tuple[ShardSpec, str]) -> dict:
    spec, out = args
    return make_shard(spec, Path(out))


def build(
    out_dir: str | Path,
    hours: dict[str, float],
    split: str = "train",
    seed: int = 0,
    codec: str = "default",
    workers: int = 1,
    shard_minutes: float = 20.0,
    max_turns: int = 200,
    progress: bool = True,
    channel: float = 0.0,
    barge_stop: tuple[float, float] = G.BARGE_STOP,
    warp: float = 0.0,
) -> dict:
    """Make (or finish) a corpus in `out_dir`; returns the manifest."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    want = {"seed": seed, "codec": codec, "channel": channel, "barge_stop": list(barge_stop)}
    want["warp"] = warp
    had = {k: manifest.get(k, v) for k, v in want.items()}
    if manifest.get("shards"):
        # Corpora made before these settings existed.
        had = {
            "channel": 0.0,
            "barge_stop": [0.08, 0.18],
            "warp": 0.0,
            **{k: manifest[k] for k in manifest if k in want},
        }
    for k, v in want.items():
        if had[k] != v:
            raise ValueError(
                f"{out} holds a corpus made with {k}={had[k]!r}, not {v!r}: "
                "use another --out or the same settings"
            )
    manifest.update({"version": VERSION, "seed": seed, "codec": codec})
    manifest.update({"channel": channel} if channel > 0 else {})
    manifest.update(barge_stop=list(barge_stop), warp=warp)
    for p in out.glob(".*.tmp-*"):
        p.unlink()
    specs = plan(hours, split, seed, codec, shard_minutes, max_turns, channel, barge_stop, warp)
    done = {e["file"] for e in manifest["shards"]}
    todo = []
    for s in specs:
        if s.name in done:
            continue
        if (out / s.name).exists():
            # Written but not yet listed when the last run stopped.
            sh = Shard(out / s.name)
            manifest["shards"].append(_entry(s, out / s.name, sh.meta, int(sh.offsets[-1])))
            continue
        todo.append(s)
    write_manifest(out, manifest)
    t0 = time.time()
    bar = tqdm(total=len(todo), unit="shard", disable=not progress, desc="conversations")
    if workers <= 1:
        results = (make_shard(s, out) for s in todo)
    else:
        pool = ProcessPoolExecutor(workers, initializer=_worker_init)
        results = pool.map(_make, [(s, str(out)) for s in todo])
    hours_made = 0.0
    for entry in results:
        manifest["shards"].append(entry)
        manifest["shards"].sort(key=lambda e: e["file"])
        write_manifest(out, manifest)
        hours_made += entry["hours"]
        bar.update(1)
        bar.set_postfix(hours=f"{hours_made:.2f}")
    bar.close()
    if workers > 1:
        pool.shutdown()
    elapsed = time.time() - t0
    if todo:
        manifest["last_run"] = {
            "shards": len(todo),
            "hours": hours_made,
            "seconds": elapsed,
            "workers": workers,
            "hours_per_cpu_hour": hours_made / max(elapsed * max(1, workers), 1e-9) * 3600,
        }
        write_manifest(out, manifest)
    return manifest
