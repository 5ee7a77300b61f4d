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
        own = torch.cat([torch.full_like(wrote[:, :1], PAD), wrote[:, :-1]], dim=1)
        if hit is None:
            hit = torch.rand(prev.shape, device=prev.device) < share
        fed = torch.where(hit, own, prev)
    return fed
