"""Input noise against exposure bias.

In training every fed-back stream is the corpus's (teacher forcing); in a session it is the
model's own: its audio codes drawn at a temperature, its transcript of the user written byte by
byte. A model that never saw a wrong input in training trusts its inputs completely, so one
misheard letter derails the rest of the word ("my name is rosa" -> "right water in remembered")
although the audio said otherwise. Replacing a share of the fed-back tokens by random ones in
training teaches it to continue from inputs that are not the corpus's and to check them against
what it hears.
"""

from __future__ import annotations

import torch

# Bytes a misheard transcript holds: lowercase letters, the space, the apostrophe.
TRANSCRIPT_BYTES = torch.tensor([*range(ord("a"), ord("z") + 1), ord(" "), ord("'")])


def delayed(x: torch.Tensor, steps: int, fill: int | bool) -> torch.Tensor:
    """x [B, T, ...] seen `steps` frames later: out[:, t] = x[:, t - steps], `fill` before the
    crop. Teacher forcing feeds each stream back one frame late; the checks of what was written
    early look further back."""
    if steps == 0:
        return x
    return torch.cat([torch.full_like(x[:, :steps], fill), x[:, :-steps]], dim=1)


def corrupt(x: torch.Tensor, share: float, choices: int | torch.Tensor, keep: int) -> torch.Tensor:
    """x (any shape, long) with about `share` of its entries replaced by random ones: codes in
    [0, choices) when `choices` is an int, else entries of the tensor `choices`. Entries equal
    to `keep` (padding: nothing was said there) are never touched."""
    if share <= 0:
        return x
    if isinstance(choices, int):
        noise = torch.randint_like(x, choices)
    else:
        choices = choices.to(x.device)
        noise = choices[torch.randint(len(choices), x.shape, device=x.device)]
    hit = torch.rand(x.shape, device=x.device) < share
    return torch.where(hit & (x != keep), noise, x)


def read_back_own(
    model, user_audio: torch.Tensor, inputs: dict, share: float, passes: int = 1
) -> torch.Tensor:
    """The fed-back transcript `inputs["prev_user_text"]` [B, T] with about `share` of its
    frames replaced by what `model` itself wrote at the frame before (parallel scheduled
    sampling: teacher-forced passes without gradients, the argmax byte or PAD per frame, as a
    session decides it). Random letters (`corrupt`) teach it to doubt a wrong byte; its own
    bytes are the wrong bytes, the doubled ones and the ones written a frame early or late that
    it meets when running free, which is where its transcript loses half its words.

    One pass writes each frame from the true past, so its errors never compound. Each further
    pass writes from the last pass's read-back, one more frame of its own errors deep: with
    `share` 1, after `passes` passes the first `passes` frames are exactly a free-running
    session's."""
    from duplex.model.tokenizer import PAD

    prev = inputs["prev_user_text"]
    if share <= 0:
        return prev
    hit = None
    fed = prev
    for _ in range(max(1, passes)):
        with torch.no_grad():
            wrote = model.transcript_logits(
                user_audio, inputs["prev_audio"], inputs["prev_text"], fed
            ).argmax(-1)
        own = delayed(wrote, 1, PAD)
        if hit is None:
            hit = torch.rand(prev.shape, device=prev.device) < share
        fed = torch.where(hit, own, prev)
    return fed


def written_early(target: torch.Tensor, fed: torch.Tensor, reach: int = 4) -> torch.Tensor:
    """[B, T] bool: frames where the corpus writes a byte that the fed-back transcript shows
    already written, at most `reach` frames before, with nothing written in between by either.

    A free-running transcript writes a word's first letter a frame or two early as often as on
    time; it then reads its own letter back, and the corpus (timed by the words' onsets) still
    writes that letter at its own frame. Kept as the target, that lesson is "write it again":
    "nnick", "ttell", "ffood", half the misheard requests of talk12's held-out suites. The
    read-back frame already holds the byte, so the consistent target there is PAD.

    target: the corpus's transcript [B, T] (byte written at t); fed: the transcript read back at
    each frame [B, T] (fed[t]: the byte written at t - 1), as `read_back_own` returns it."""
    from duplex.model.tokenizer import PAD

    written = target != PAD
    quiet_t = ~written
    quiet_f = fed == PAD
    early = torch.zeros_like(written)
    target_quiet = torch.ones_like(written)
    fed_quiet = torch.ones_like(written)
    for k in range(1, reach + 1):
        # The corpus wrote nothing at t - k .. t - 1; the read-back wrote nothing at t - k + 1
        # .. t - 1 (fed[t - k + 2 .. t]), and wrote this frame's byte at t - k (fed[t - k + 1]).
        target_quiet = target_quiet & delayed(quiet_t, k, False)
        if k >= 2:
            fed_quiet = fed_quiet & delayed(quiet_f, k - 2, True)
        early |= written & target_quiet & fed_quiet & (delayed(fed, k - 1, PAD) == target)
    return early
