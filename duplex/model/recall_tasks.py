"""Recall tasks: generated from a seed, at any context length, scored item by item.

Everything is generated here from a seed, at any context length, with one vocabulary of 8192 ids:

    0-15     control: PAD BOS SEP QUERY PASSKEY COPY POS HOP2 HOP3 ALIAS
    16-31    digits 0..15
    32-47    digit-place markers P0..P15 (which digit of a position is asked)
    64-4159  key ids (4096)     4160-6207  value ids (2048)     6208-8191  filler ids (1984)

Tasks (each returns the ids and which of them are answers, grouped into items scored exactly):
- mqar: P key-value pairs spread through filler, then queries "key value" (keys of 2 ids when P
  exceeds the 4096 one-id keys); queried pairs half uniform, half at power-law distances.
- passkey: "PASSKEY d d d d d" at a random depth in filler; "QUERY PASSKEY" -> the 5 digits.
- niah: a haystack of (4-id key, 8-id value) pairs; "QUERY key" -> the 8-id value.
- copy: random ids; "COPY" + the first 8 ids of a span of 1000 (N/8 when shorter) that starts at
  least 100K (N/2 when shorter) ids back -> the rest of the span, fed back one id at a time.
- position: 4-id items in filler; "P_j key" -> hex digit j of the absolute index of the item's last
  id, for j = 0..5 (an item is right when all 6 digits are).
- hop2 / hop3: chains of 1-id facts "a b", "b c" (, "c d") stored at independent random places
  (any order); "HOP2 a" -> c ("HOP3 a" -> d). The id after a is b, so the answer is never what
  follows the cue's last occurrence: it needs a second (third) read keyed by what the first found.
- alias: facts "a v" and declarations "ALIAS x a" (x another name of a), any order; "QUERY x"
  -> v. What follows x is a, not the value.
- update: facts "k v" where a key is assigned 2-3 times with different values; queries "k v"
  -> the newest value (the first assignment is a wrong, plausible answer).

The models live in `recall_models`, their training in `recall_train`, the evaluation and
`duplex eval recall` in `recall`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

VOCAB = 8192
PAD, BOS, SEP, QUERY, PASSKEY, COPY, POS = 0, 1, 2, 3, 4, 5, 6
HOP2, HOP3, ALIAS = 7, 8, 9
DIGIT0 = 16
PLACE0 = 32
KEY0, N_KEY = 64, 4096
VAL0, N_VAL = KEY0 + N_KEY, 2048
FILL0 = VAL0 + N_VAL
N_FILL = VOCAB - FILL0
CONTENT0 = KEY0
POS_DIGITS, POS_BASE = 6, 16
# New tasks go at the end: an evaluation's generator seed includes the task's index here.
TASKS = ("mqar", "passkey", "niah", "copy", "position", "hop2", "hop3", "alias", "update")


@dataclass
class Sample:
    """ids [N]; answer index arrays grouped per scored item (each index i: ids[i] is predicted
    from the output at i - 1); `start`: first id of the query section (prefill covers ids before
    it); `offset`: absolute position of ids[0]."""

    ids: np.ndarray
    items: list[np.ndarray]
    start: int
    offset: int = 0


def _filler(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(FILL0, VOCAB, size=n)


def _distinct(rng: np.random.Generator, n: int, space: int) -> np.ndarray:
    """n distinct integers in [0, space)."""
    if n > space:
        raise ValueError(f"cannot draw {n} distinct values from {space}")
    out = np.unique(rng.integers(0, space, size=n))
    while out.size < n:
        out = np.unique(np.concatenate([out, rng.integers(0, space, size=n - out.size)]))
    return rng.permutation(out)[:n]


def _place(rng: np.random.Generator, ctx: np.ndarray, blocks: list[np.ndarray]) -> np.ndarray:
    """Write blocks at random non-overlapping places of ctx, in order; returns their starts."""
    n, total = ctx.size, sum(b.size for b in blocks)
    if total > n:
        raise ValueError(f"{total} ids of items do not fit in a context of {n}")
    gaps = rng.multinomial(n - total, np.ones(len(blocks) + 1) / (len(blocks) + 1))
    starts = np.empty(len(blocks), dtype=np.int64)
    pos = 0
    for i, b in enumerate(blocks):
        pos += gaps[i]
        starts[i] = pos
        ctx[pos : pos + b.size] = b
        pos += b.size
    return starts


def _place_fast(rng: np.random.Generator, ctx: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Like `_place` for P equal-length items [P, L] (vectorised for 64K pairs at 1M)."""
    P, L = items.shape
    free = ctx.size - P * L
    if free < 0:
        raise ValueError(f"{P * L} ids of items do not fit in a context of {ctx.size}")
    cuts = np.sort(rng.integers(0, free + 1, size=P))
    starts = cuts + np.arange(P) * L
    idx = starts[:, None] + np.arange(L)[None]
    ctx[idx] = items
    return starts


def mqar(
    N: int,
    rng: np.random.Generator,
    pairs: int | None = None,
    queries: int | None = None,
    key_len: int | None = None,
    key_pool: int | None = None,
    vocab: int | None = None,
) -> Sample:
    """Multi-query associative recall (see module docstring). `key_pool` (training only) draws
    each id of a 2-id key from a small pool so that keys share ids and only the pair identifies.
    `vocab` (training only, 1-id keys) draws keys from the first `vocab` key ids and values from
    the first `vocab` value ids: the small-vocabulary start of a curriculum (Zoology's MQAR
    trains at small vocabularies), where every id is seen often enough for a fixed-state model
    to find the retrieval before it must learn 2048 value embeddings."""
    P = pairs if pairs is not None else max(4, min(65536, N // 16))
    kl = key_len if key_len is not None else (1 if P <= N_KEY else 2)
    Q = min(P, queries if queries is not None else 1024)
    C = N - Q * (kl + 1)
    n_val = min(N_VAL, vocab) if vocab else N_VAL
    if kl == 1:
        keys = KEY0 + _distinct(rng, P, min(N_KEY, vocab) if vocab else N_KEY)[:, None]
    else:
        pool = key_pool or N_KEY
        a = rng.choice(N_KEY, size=pool, replace=False) if pool < N_KEY else np.arange(N_KEY)
        b = rng.choice(N_KEY, size=pool, replace=False) if pool < N_KEY else np.arange(N_KEY)
        flat = _distinct(rng, P, pool * pool)
        keys = KEY0 + np.stack([a[flat // pool], b[flat % pool]], axis=1)
    vals = VAL0 + rng.integers(0, n_val, size=(P, 1))
    ctx = _filler(rng, C)
    _place_fast(rng, ctx, np.concatenate([keys, vals], axis=1))
    # Queries: half uniform over pairs, half at power-law distance (rank from the newest pair).
    n_pow = Q // 2
    rank = np.floor(np.exp(rng.uniform(0, math.log(P), size=n_pow))).astype(np.int64)
    chosen = np.unique(np.concatenate([P - np.clip(rank, 1, P), rng.integers(0, P, size=Q)]))
    chosen = rng.permutation(chosen)[:Q]
    if chosen.size < Q:
        rest = np.setdiff1d(np.arange(P), chosen)
        chosen = np.concatenate([chosen, rng.permutation(rest)[: Q - chosen.size]])
    chosen = rng.permutation(chosen)
    qs = np.concatenate([keys[chosen], vals[chosen]], axis=1).reshape(-1)
    ids = np.concatenate([ctx, qs])
    ans = C + np.arange(Q) * (kl + 1) + kl
    return Sample(ids, [np.array([a]) for a in ans], C)


def passkey(N: int, rng: np.random.Generator) -> Sample:
    """A 5-digit number at a random depth in filler, asked at the end."""
    key = DIGIT0 + rng.integers(0, 10, size=5)
    C = N - 7
    ctx = _filler(rng, C)
    _place(rng, ctx, [np.concatenate([[PASSKEY], key])])
    ids = np.concatenate([ctx, [QUERY, PASSKEY], key])
    return Sample(ids, [C + 2 + np.arange(5)], C)


def niah(N: int, rng: np.random.Generator, asked: int = 1) -> Sample:
    """Haystack of (4-id key, 8-id value) pairs; `asked` of them queried at the end."""
    per = 12
    C = N - asked * (1 + per)
    P = C // per
    keys = KEY0 + rng.integers(0, N_KEY, size=(P, 4))
    vals = VAL0 + rng.integers(0, N_VAL, size=(P, 8))
    ctx = _filler(rng, C)
    _place_fast(rng, ctx, np.concatenate([keys, vals], axis=1))
    which = rng.choice(P, size=asked, replace=False)
    parts, items = [ctx], []
    pos = C
    for w in which:
        parts.append(np.concatenate([[QUERY], keys[w], vals[w]]))
        items.append(pos + 5 + np.arange(8))
        pos += 1 + per
    return Sample(np.concatenate(parts), items, C)


def copy_task(
    N: int, rng: np.random.Generator, span: int | None = None, min_back: int | None = None
) -> Sample:
    """Reproduce a span of random ids first seen far back, given its first 8 ids."""
    L = span if span is not None else min(1000, N // 8)
    back = min_back if min_back is not None else min(100_000, N // 2)
    prompt = 8
    C = N - 1 - L
    ctx = rng.integers(CONTENT0, VOCAB, size=C)
    latest = C - back
    if latest < 0:
        raise ValueError(f"context {N} too short for a copy from {back} back")
    s = int(rng.integers(0, latest + 1))
    src = ctx[s : s + L].copy()
    ids = np.concatenate([ctx, [COPY], src])
    return Sample(ids, [C + 1 + np.arange(prompt, L)], C)


def position(
    N: int, rng: np.random.Generator, asked: int = 1, offset: int = 0, items: int | None = None
) -> Sample:
    """4-id items in filler; each asked item gets 6 queries "P_j k1 k2 k3 k4 d_j"."""
    per_q = 6
    C = N - asked * POS_DIGITS * per_q
    n_items = items if items is not None else max(asked, C // 64)
    keys = KEY0 + rng.integers(0, N_KEY, size=(n_items, 4))
    ctx = _filler(rng, C)
    starts = _place_fast(rng, ctx, keys)
    which = rng.choice(n_items, size=asked, replace=False)
    parts, out = [ctx], []
    pos = C
    for w in which:
        where = offset + int(starts[w]) + 3
        digits = [(where // POS_BASE**j) % POS_BASE for j in range(POS_DIGITS)]
        idx = []
        for j in rng.permutation(POS_DIGITS):
            parts.append(np.concatenate([[PLACE0 + j], keys[w], [DIGIT0 + digits[j]]]))
            idx.append(pos + 5)
            pos += per_q
        out.append(np.array(idx))
    return Sample(np.concatenate(parts), out, C, offset)


def _query_order(rng: np.random.Generator, P: int, Q: int) -> np.ndarray:
    """Q distinct item indices of P: half uniform, half at power-law rank from the last index
    (a distance from the newest item where items are placed in index order, as in `update`)."""
    rank = np.floor(np.exp(rng.uniform(0, math.log(max(P, 2)), size=Q // 2))).astype(np.int64)
    chosen = np.unique(np.concatenate([P - np.clip(rank, 1, P), rng.integers(0, P, size=Q)]))
    chosen = rng.permutation(chosen)[:Q]
    if chosen.size < Q:
        rest = np.setdiff1d(np.arange(P), chosen)
        chosen = np.concatenate([chosen, rng.permutation(rest)[: Q - chosen.size]])
    return rng.permutation(chosen)


def _scatter(rng: np.random.Generator, C: int, facts: list[np.ndarray]) -> np.ndarray:
    """Filler of length C with the facts (1-D id arrays) written at random places, in a random
    order (so a chain's later link can come first). Each fact is followed by a filler id, so two
    facts never touch: "a b" next to "d e" would read as a third fact "b d"."""
    ctx = _filler(rng, C)
    order = rng.permutation(len(facts))
    ends = _filler(rng, len(facts))
    _place_any(rng, ctx, [np.append(facts[i], ends[j]) for j, i in enumerate(order)])
    return ctx


def _place_any(rng: np.random.Generator, ctx: np.ndarray, blocks: list[np.ndarray]) -> None:
    """`_place_fast` for blocks of mixed lengths (grouped by length would bias their order)."""
    lens = np.array([b.size for b in blocks], dtype=np.int64)
    free = ctx.size - int(lens.sum())
    if free < 0:
        raise ValueError(f"{lens.sum()} ids of items do not fit in a context of {ctx.size}")
    cuts = np.sort(rng.integers(0, free + 1, size=len(blocks)))
    starts = cuts + np.concatenate([[0], np.cumsum(lens)[:-1]])
    flat = np.concatenate(blocks)
    ctx[np.repeat(starts, lens) + _ramp(lens)] = flat


def _ramp(lens: np.ndarray) -> np.ndarray:
    """0..len-1 for each length, concatenated."""
    ends = np.cumsum(lens)
    return np.arange(int(ends[-1])) - np.repeat(ends - lens, lens)


def hops(
    N: int,
    rng: np.random.Generator,
    n_hops: int = 2,
    chains: int | None = None,
    queries: int | None = None,
) -> Sample:
    """Multi-hop recall: chains x_0 -> x_1 -> ... -> x_n stored as facts "x_i x_{i+1}".

    x_0 .. x_{n-1} are distinct 1-id keys, x_n a value. Each fact sits at its own random place
    (the links of one chain in any order); a query "HOP<n> x_0 x_n" asks for the chain's end.
    """
    marker = {2: HOP2, 3: HOP3}[n_hops]
    P = chains if chains is not None else max(4, min(N // 64, N_KEY // n_hops))
    Q = min(P, queries if queries is not None else 256)
    C = N - 3 * Q
    # keys: [P, n_hops] distinct across all chains; ends: [P] values
    keys = KEY0 + _distinct(rng, P * n_hops, N_KEY).reshape(P, n_hops)
    ends = VAL0 + rng.integers(0, N_VAL, size=P)
    chain = np.concatenate([keys, ends[:, None]], axis=1)
    facts = [chain[p, i : i + 2] for p in range(P) for i in range(n_hops)]
    ctx = _scatter(rng, C, facts)
    chosen = _query_order(rng, P, Q)
    qs = np.stack([np.full(Q, marker), keys[chosen, 0], ends[chosen]], axis=1).reshape(-1)
    ids = np.concatenate([ctx, qs])
    return Sample(ids, [np.array([C + 3 * i + 2]) for i in range(Q)], C)


def alias(
    N: int, rng: np.random.Generator, pairs: int | None = None, queries: int | None = None
) -> Sample:
    """Facts "a v" and declarations "ALIAS x a"; queries "QUERY x v" ask by the second name."""
    P = pairs if pairs is not None else max(4, min(N // 64, N_KEY // 2))
    Q = min(P, queries if queries is not None else 256)
    C = N - 3 * Q
    names = KEY0 + _distinct(rng, 2 * P, N_KEY).reshape(P, 2)
    vals = VAL0 + rng.integers(0, N_VAL, size=P)
    facts = [np.array([names[p, 0], vals[p]]) for p in range(P)]
    facts += [np.array([ALIAS, names[p, 1], names[p, 0]]) for p in range(P)]
    ctx = _scatter(rng, C, facts)
    chosen = _query_order(rng, P, Q)
    qs = np.stack([np.full(Q, QUERY), names[chosen, 1], vals[chosen]], axis=1).reshape(-1)
    ids = np.concatenate([ctx, qs])
    return Sample(ids, [np.array([C + 3 * i + 2]) for i in range(Q)], C)


def update(
    N: int, rng: np.random.Generator, pairs: int | None = None, queries: int | None = None
) -> Sample:
    """Keys assigned 2 or 3 times ("k v" facts, distinct values, in order of assignment);
    queries "k v" ask for the newest value."""
    P = pairs if pairs is not None else max(4, min(N // 48, N_KEY))
    Q = min(P, queries if queries is not None else 1024)
    C = N - 2 * Q
    keys = KEY0 + _distinct(rng, P, N_KEY)
    times = rng.integers(2, 4, size=P)
    # vals: [P, 3] distinct per key (a re-assignment always changes the value): steps of
    # 1 .. N_VAL/3 - 1 from a random base never wrap onto an earlier value.
    steps = rng.integers(1, N_VAL // 3, size=(P, 2))
    vals = (
        VAL0
        + (
            rng.integers(0, N_VAL, size=(P, 1))
            + np.cumsum(np.concatenate([np.zeros((P, 1), np.int64), steps], axis=1), axis=1)
        )
        % N_VAL
    )
    # Assignments go into the context in a random interleaving that keeps each key's order:
    # nth[i] is how many earlier entries of the interleaving belong to the same key.
    owner = rng.permutation(np.repeat(np.arange(P), times))
    by_key = np.argsort(owner, kind="stable")
    nth = np.empty(owner.size, dtype=np.int64)
    nth[by_key] = _ramp(np.bincount(owner, minlength=P))
    items = np.stack([keys[owner], vals[owner, nth]], axis=1)
    ctx = _filler(rng, C)
    _place_fast(rng, ctx, items)
    chosen = _query_order(rng, P, Q)
    newest = vals[chosen, times[chosen] - 1]
    qs = np.stack([keys[chosen], newest], axis=1).reshape(-1)
    ids = np.concatenate([ctx, qs])
    return Sample(ids, [np.array([C + 2 * i + 1]) for i in range(Q)], C)


def make_task(
    task: str, N: int, rng: np.random.Generator, offset: int = 0, asked: int = 1
) -> Sample:
    """The evaluation form of each task at context length N."""
    if task == "mqar":
        return mqar(N, rng)
    if task == "passkey":
        return passkey(N, rng)
    if task == "niah":
        return niah(N, rng, asked=asked)
    if task == "copy":
        return copy_task(N, rng)
    if task == "position":
        return position(N, rng, asked=asked, offset=offset)
    if task in ("hop2", "hop3"):
        return hops(N, rng, n_hops=int(task[-1]))
    if task == "alias":
        return alias(N, rng)
    if task == "update":
        return update(N, rng)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


MIXES = ("v1", "suite", "mqar-curriculum", "mqar-small", "chains")


def training_sample(
    T: int, rng: np.random.Generator, mix: str = "v1", progress: float = 0.0
) -> Sample:
    """One short training sequence from the mixture `mix`; `progress` in [0, 1] is how far
    training is (only the curriculum uses it).

    - v1: mqar, passkey, niah, copy, position (what the shipped recall-gwa was trained on).
    - suite: every task, with misleading short matches (niah values from a 12-id pool, copy over
      a 48-id alphabet: what fixed niah and copy at length in the fine-tune experiment), plus
      hop2, hop3, alias and update at small sizes.
    - mqar-curriculum: mqar only, 1-id keys, the vocabulary of keys and values growing from 16
      to the full 2048 and the pairs from 4 to 32 over the first 60% of training, then half the
      sequences with 2-id keys. For the fixed-state baselines, which never leave the loss of
      the unconditional answer distribution (7.09) on v1 in 2000 steps.
    - mqar-small: the curriculum's first stage held fixed (4 pairs, keys and values from 16
      ids each; T/8 pairs at most): a sanity check that a fixed-state model learns recall at
      all, in minutes on a CPU.
    - chains: hop2, hop3 and alias only, sized to T (from 64 ids): a short fine-tune of the
      lookup reads after a warm start.
    """
    if mix == "v1":
        return _sample_v1(T, rng)
    if mix == "suite":
        return _sample_suite(T, rng)
    if mix == "mqar-curriculum":
        return _sample_curriculum(T, rng, progress)
    if mix == "chains":
        return _sample_chains(T, rng)
    if mix == "mqar-small":
        P = max(1, min(4, T // 8))
        return mqar(T, rng, pairs=P, queries=P, key_len=1, vocab=16)
    raise ValueError(f"unknown mixture {mix!r}; choose from {MIXES}")


def _sample_v1(T: int, rng: np.random.Generator) -> Sample:
    """Keys sharing ids (mqar `key_pool`) teach the read to trust the longest match, and random
    absolute offsets teach every digit of the position features, so 1M-token positions are not
    new to the model."""
    offset = int(rng.integers(0, POS_BASE**POS_DIGITS - T))
    u = rng.random()
    if u < 0.3:
        kl = int(rng.integers(1, 3))
        P = int(rng.integers(8, 49))
        pool = int(rng.integers(math.isqrt(P) + 2, 16)) if kl == 2 else None
        s = mqar(T, rng, pairs=P, queries=min(P, 32), key_len=kl, key_pool=pool)
    elif u < 0.35:
        s = passkey(T, rng)
    elif u < 0.5:
        s = niah(T, rng, asked=2)
    elif u < 0.7:
        s = copy_task(T, rng, span=48, min_back=T // 4)
    else:
        s = position(T, rng, asked=2, offset=offset, items=int(rng.integers(4, 24)))
    s.offset = offset
    return s


def _sample_suite(T: int, rng: np.random.Generator) -> Sample:
    u = rng.random()
    if u < 0.4:
        return _sample_v1(T, rng)
    if u < 0.47:
        return _pooled(niah(T, rng, asked=2), VAL0, FILL0, 12, rng)
    if u < 0.55:
        return _pooled(copy_task(T, rng, span=48, min_back=T // 4), CONTENT0, VOCAB, 48, rng)
    if u < 0.67:
        return update(T, rng, pairs=int(rng.integers(4, 25)), queries=16)
    if u < 0.79:
        return hops(T, rng, n_hops=2, chains=int(rng.integers(4, 17)), queries=12)
    if u < 0.9:
        return hops(T, rng, n_hops=3, chains=int(rng.integers(4, 13)), queries=10)
    return alias(T, rng, pairs=int(rng.integers(4, 17)), queries=12)


def _sample_chains(T: int, rng: np.random.Generator) -> Sample:
    u = rng.random()
    n = max(2, T // 32)
    if u < 0.4:
        return hops(T, rng, n_hops=2, chains=int(rng.integers(2, n + 1)), queries=n)
    if u < 0.7:
        return hops(T, rng, n_hops=3, chains=int(rng.integers(2, n + 1)), queries=n)
    return alias(T, rng, pairs=int(rng.integers(2, n + 1)), queries=n)


def _pooled(s: Sample, lo: int, hi: int, n: int, rng: np.random.Generator) -> Sample:
    """Map the ids in [lo, hi) of a sample onto a random n-id pool (equal ids stay equal), so
    short matches of them occur all over the sequence and mislead."""
    pool = lo + rng.choice(hi - lo, size=n, replace=False)
    ids = s.ids.copy()
    inside = (ids >= lo) & (ids < hi)
    ids[inside] = pool[(ids[inside] - lo) % n]
    s.ids = ids
    return s


def _sample_curriculum(T: int, rng: np.random.Generator, progress: float) -> Sample:
    grow = min(1.0, progress / 0.6)
    vocab = round(16 * (N_VAL / 16) ** grow)
    top = min(T // 8, 4 + round(28 * grow))
    P = int(rng.integers(4, max(top, 4) + 1))
    if progress > 0.6 and rng.random() < 0.5:
        pool = int(rng.integers(math.isqrt(P) + 2, 16))
        return mqar(T, rng, pairs=P, queries=P, key_len=2, key_pool=pool)
    return mqar(T, rng, pairs=P, queries=P, key_len=1, vocab=vocab)
