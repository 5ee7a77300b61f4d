"""`duplex train duplex`: train the talking model on the conversation corpus with the shared loop.

Batches are crops of the corpus (`duplex.data.batches`): every stream of `seq_len` frames, one
curriculum stage per row, the text streams laid out as the model's config says (its text leading
its audio by `text_lead` frames, the user's transcript lagging by `transcript_delay`). The loop
is `duplex.train.train`: AdamW, warm-up + cosine, clipping, atomic checkpoints (a run killed or
stopped by --max-minutes resumes exactly with the same command), curves in history.json and
loss.png, and torchrun for many processes or GPUs with no change.

The model is written to RUN/model.safetensors at the end (and at every checkpoint's end of
run); `--ship` also writes it where `duplex.model.load("default")` finds it. Ship only weights
that beat the shipped ones on `duplex eval talk`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

HELP = "train the talking DuplexLM on a conversation corpus (resumable, torchrun-ready)"
DESCRIPTION = """Train the talking model on a corpus made by `duplex data conversations`.

Each step draws a global batch of crops (--seq-len frames, 50 per second with the shipped codec)
from the corpus stages by a curriculum (reading aloud and transcription first, conversations and
full-duplex events later, every stage kept above a floor). Losses: the model's text (PAD frames
down-weighted), the user transcript, and the audio codebooks. Checkpoints land in --out every
--ckpt-every steps; the same command resumes a stopped run exactly (keep --out outside the work
tree for long runs). --max-minutes stops a session early; the schedule still spans --steps.

Examples:
  duplex train duplex --corpus ~/corpus --out ~/runs/talk --max-minutes 90
  torchrun --nproc_per_node 8 -m duplex train duplex --corpus /data/corpus --out runs/talk \\
      --batch-size 64 --device cuda --precision bf16
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus",
        type=Path,
        nargs="+",
        required=True,
        help="corpus directory (manifest.json); several pool their shards (e.g. corpora made "
        "with different --seed)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/talk"), help="run directory")
    p.add_argument(
        "--config", default="talk", help="model config name (talk, talk-point, small, tiny, ...)"
    )
    p.add_argument(
        "--init",
        type=Path,
        help="start from these weights (.safetensors of a model whose config differs from "
        "--config only by added modules, e.g. a depth model; those start at their init)",
    )
    p.add_argument(
        "--swa-window",
        type=int,
        help="override the config's sliding-window attention span in frames (e.g. 256: the "
        "model sees the user's words while it answers them; warm starts keep every weight)",
    )
    p.add_argument(
        "--copy-window",
        type=int,
        help="override the copy head's span in text frames (e.g. 1024: values told a minute "
        "before; train on crops that long, --seq-len 3200); the head's weights carry over",
    )
    p.add_argument(
        "--copy-gate-loss",
        type=float,
        help="weight of the copy head's gate loss (e.g. 1.0: the gate is taught to open where "
        "the pointer gives the written byte more probability than the text head, each byte "
        "weighed by the gap between the two; the config's copy_gate_loss)",
    )
    p.add_argument(
        "--copy-gate-pointer",
        action="store_true",
        help="the copy head's gate also sees what the pointer offers: its peak and the share "
        "of it on bytes the user said (a copy of the model's own words can be shut; the "
        "config's copy_gate_pointer; warm starts keep every weight, the new ones start at 0)",
    )
    p.add_argument(
        "--copy-user-only",
        action="store_true",
        help="the copy head offers only bytes the user said (values repeated are the user's; "
        "a copy cannot run on through the model's own words; the config's copy_user_only)",
    )
    p.add_argument(
        "--transcript-noise",
        type=float,
        help="share of the fed-back transcript's bytes replaced by random letters in training "
        "(e.g. 0.1: the listener learns to recover from its own misheard bytes; the config's "
        "transcript_input_noise)",
    )
    p.add_argument(
        "--transcript-sampling",
        type=float,
        help="share of the fed-back transcript's frames that read back the model's own byte "
        "of the frame before (parallel scheduled sampling: a pass without gradients first, "
        "about a third more time per step; the config's transcript_sampling)",
    )
    p.add_argument(
        "--transcript-sampling-passes",
        type=int,
        help="passes of that read-back (1): each further pass writes from the last one's "
        "bytes, so its errors compound as a free-running session's do; one more pass without "
        "gradients each",
    )
    p.add_argument(
        "--train-only",
        nargs="+",
        metavar="PREFIX",
        help="train only the parameters whose names start with one of these (e.g. copy.: a "
        "copy head added to a trained model; the rest stays as it was, so its speech too)",
    )
    p.add_argument("--steps", type=int, default=20_000, help="schedule length (20000)")
    p.add_argument("--batch-size", type=int, default=8, help="global batch, crops (8)")
    p.add_argument("--seq-len", type=int, default=400, help="frames per crop (400 = 8 s)")
    p.add_argument(
        "--from-start",
        type=float,
        default=0.0,
        help="share of crops that begin where a conversation begins (0): with long crops "
        "(--seq-len 3000) every question there can find its fact earlier in the crop",
    )
    p.add_argument(
        "--crosstalk",
        type=float,
        default=0.0,
        help="share of transcription (asr) crops with the model's own voice laid over the "
        "user's for 1-4 s, the model's losses off there (0): the listener practises hearing "
        "a request it talks over",
    )
    p.add_argument(
        "--synthetic-barge",
        type=float,
        default=0.0,
        help="share of transcription (asr) crops made barge-in drills (0): the model reads up "
        "to each user onset and falls silent 40-120 ms after it, the silence taught; with "
        "--crosstalk, the two shares add up to at most 1",
    )
    p.add_argument(
        "--barge-weight",
        type=float,
        default=1.0,
        help="loss weight of the model's streams from each barge-in's onset to just past its "
        "stop, against 1 for every other frame (1): stopping is taught by a few frames only",
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--curriculum-steps", type=int, help="steps to reach the final stage mix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, help="stop this session after so many minutes")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: autocast forward and loss (GPUs; weights and optimiser stay fp32)",
    )
    p.add_argument("--ship", action="store_true", help="also write the weights as `default`")
    p.add_argument(
        "--eval-conversations",
        type=int,
        default=0,
        help="at every checkpoint, run `duplex eval talk` on this many held-out conversations "
        "(8 turns, no fact distances) and append its figures to RUN/evals.json (0: off)",
    )
    p.add_argument("--no-progress", action="store_true")


def loss_fn(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    _, losses = model({k: v for k, v in batch.items() if k != "stage"})
    metrics = {k: float(v.detach()) for k, v in losses.items() if k != "loss"}
    metrics["tokens"] = float(batch["user_audio"].shape[0] * batch["user_audio"].shape[1])
    return losses["loss"], metrics


def checkpoint_eval(out: Path, conversations: int):
    """An `on_checkpoint` hook: a short `duplex eval talk` of the weights just saved, its
    headline figures appended to out/evals.json (curves of what the listener hears)."""
    from duplex.apps.eval_talk import EvalConfig, evaluate
    from duplex.model import duplex_lm

    def run_eval(model, step: int) -> None:
        path = out / "eval_model.safetensors"
        duplex_lm.save(model, path)
        cfg = EvalConfig(
            model=str(path),
            conversations=conversations,
            turns=8,
            minutes=(),
            state_prompt=False,
            judge_max=8,
        )
        rep = evaluate(cfg, progress=False)
        t = rep["timing"]
        record = {
            "step": step,
            "answers": rep["answers"]["correct"],
            "wer": rep["listening"]["wer"],
            "spoken_ratio": rep["speaking"]["ratio"],
            "latency_p50": t["reply_latency_p50"],
            "replied": t["replied"],
            "barge_in_stopped": t["barge_in_stopped_200ms"],
            "pause_takeovers": t["pause_takeovers"],
        }
        file = out / "evals.json"
        evals = json.loads(file.read_text()) if file.is_file() else []
        evals = [e for e in evals if e["step"] != step] + [record]
        file.write_text(json.dumps(evals, indent=1))
        print(f"[eval] step {step}: " + ", ".join(f"{k} {v}" for k, v in record.items()))

    return run_eval


def run(args: argparse.Namespace) -> int:
    from duplex.data.batches import ConversationBatches, Curriculum
    from duplex.model import duplex_lm
    from duplex.train.loop import TrainConfig, seed_everything, train

    torch.set_num_threads(max(1, args.threads))
    seed_everything(args.seed)
    if args.config not in duplex_lm.CONFIGS:
        print(
            f"duplex train duplex: unknown config {args.config!r}: one of "
            f"{sorted(duplex_lm.CONFIGS)}"
        )
        return 2
    mcfg = duplex_lm.DuplexConfig.from_dict(duplex_lm.CONFIGS[args.config].to_dict())
    if args.swa_window is not None:
        if args.swa_window < 1:
            print(f"duplex train duplex: --swa-window must be >= 1, not {args.swa_window}")
            return 2
        mcfg.backbone.swa_window = args.swa_window
    if args.copy_window is not None:
        if args.copy_window < 0:
            print(f"duplex train duplex: --copy-window must be >= 0, not {args.copy_window}")
            return 2
        mcfg.copy_window = args.copy_window
    if args.copy_gate_loss is not None:
        if args.copy_gate_loss < 0 or not mcfg.copy_window:
            print("duplex train duplex: --copy-gate-loss needs a copy head and a weight >= 0")
            return 2
        mcfg.copy_gate_loss = args.copy_gate_loss
    if args.copy_gate_pointer:
        if not mcfg.copy_window:
            print("duplex train duplex: --copy-gate-pointer needs a copy head (--copy-window)")
            return 2
        mcfg.copy_gate_pointer = True
    if args.copy_user_only:
        if not mcfg.copy_window or (mcfg.shared_text_ids and not mcfg.window_speaker):
            print(
                "duplex train duplex: --copy-user-only needs a copy head (--copy-window) and "
                "merged ids that keep the speaker (window_speaker, or ids not shared)"
            )
            return 2
        mcfg.copy_user_only = True
    shares = {"transcript_noise": "transcript_input_noise", "transcript_sampling": None}
    for flag, name in shares.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if not 0 <= value < 1:
            print(f"duplex train duplex: --{flag.replace('_', '-')} {value}: not in [0, 1)")
            return 2
        setattr(mcfg, name or flag, value)
    if args.transcript_sampling_passes is not None:
        if args.transcript_sampling_passes < 1:
            print("duplex train duplex: --transcript-sampling-passes must be >= 1")
            return 2
        mcfg.transcript_sampling_passes = args.transcript_sampling_passes
    model = duplex_lm.DuplexLM(mcfg)
    if args.init is not None:
        try:
            fresh = duplex_lm.warm_start(model, args.init)
        except (ValueError, FileNotFoundError) as e:
            print(f"duplex train duplex: --init {args.init}: {e}")
            return 2
        print(f"[train] weights from {args.init}; new (initialised) tensors: {fresh or 'none'}")
    if args.train_only:
        names = [n for n, _ in model.named_parameters() if n.startswith(tuple(args.train_only))]
        if not names:
            print(f"duplex train duplex: --train-only {args.train_only} matches no parameter")
            return 2
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        print(f"[train] training only {len(names)} tensors: {', '.join(names[:6])}")
    cfg = model.cfg
    try:
        data = ConversationBatches(
            args.corpus,
            args.seq_len,
            text_lead=cfg.text_lead,
            transcript_delay=cfg.transcript_delay,
            curriculum=Curriculum(steps=args.curriculum_steps or args.steps // 2),
            seed=args.seed,
            from_start=args.from_start,
            crosstalk=args.crosstalk,
            barge_weight=args.barge_weight,
            synthetic_barge=args.synthetic_barge,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"duplex train duplex: {e}")
        return 2
    hours = {k: round(v / 50 / 3600, 2) for k, v in data.frames.items()}
    where = " ".join(map(str, args.corpus))
    params = model.num_params()
    print(f"[train] corpus {where}: hours per stage {hours}; model {params:,} parameters")
    tcfg = TrainConfig(
        out_dir=str(args.out),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=0.05,
        warmup_steps=args.warmup,
        min_lr_ratio=0.1,
        grad_clip=1.0,
        seed=args.seed,
        log_every=20,
        ckpt_every=args.ckpt_every,
        max_minutes=args.max_minutes,
        progress=not args.no_progress,
        device=args.device,
        precision=args.precision,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    hook = checkpoint_eval(args.out, args.eval_conversations) if args.eval_conversations else None
    res = train(model, data.batch, loss_fn, tcfg, on_checkpoint=hook)
    model.cpu().eval()
    path = duplex_lm.save(model, args.out / "model.safetensors")
    if args.ship:
        duplex_lm.save(model, duplex_lm.WEIGHTS_DIR / "duplex_default.safetensors")
    last = res.history[-1] if res.history else {}
    parts = ", ".join(
        f"{k} {last[k]:.3f}" for k in ("loss_text", "loss_user_text", "loss_audio") if k in last
    )
    print(
        f"[train] {res.steps_done} steps ({res.stopped_by}), loss {res.final_loss:.4f} "
        f"({parts}); weights {path}"
    )
    return 0
