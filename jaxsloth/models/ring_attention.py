"""Ring attention over the "context" mesh axis (context parallelism): every device holds its share of each
sequence's queries, keys and values; the K/V blocks travel round the ring (``lax.ppermute``) while each device
attends its queries to the block it holds, and the partial results merge by their log-sum-exp (online softmax).

Zigzag order (load balance under the causal mask): the sequence is cut into 2n chunks and device d holds chunks
d and 2n-1-d (``zigzag_order``), so at every ring step each device computes the same amount: at step 0 its two
diagonal (causal) chunk pairs and (2n-1-d, d); at step s > 0, with the keys of device src = d - s, the pair
(2n-1-d, src) and either (d, src) when src < d or (2n-1-d, 2n-1-src) when src > d. The other pairs lie wholly
above the causal diagonal and are never computed; with a sliding window, pairs wholly outside it are skipped too
(``lax.switch`` on the pair's distance, which is static per branch so the kernel keeps its static masks).

Backward: a ``custom_vjp`` over the whole ring rather than autodiff through the ppermutes: autodiff would keep
every step's received K/V block and partial output as residuals (n times the local K/V and output per layer),
where this keeps only the local q, k, v, merged output and log-sum-exp, and sends the K/V blocks round once more
with their dK/dV accumulators travelling alongside (FlashAttention-2's backward per block, against the merged
row's log-sum-exp, is exact). Each block pair runs through the dispatch point (``Ops.attention_block``), on the
Pallas flash kernels or the plain-jnp reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsloth.ops import Ops

AXIS = "context"


def zigzag_order(length: int, n: int) -> np.ndarray:
    """Token indices of a [.., length] axis (length a multiple of 2n) in zigzag order: device d's contiguous
    share is chunks d and 2n-1-d."""
    c = length // (2 * n)
    chunks = np.arange(length).reshape(2 * n, c)
    return np.concatenate([np.concatenate([chunks[d], chunks[2 * n - 1 - d]]) for d in range(n)])


def _merge(acc, part):
    """Online-softmax merge of two partial results (out [B, T, H, hd] f32, lse [B, H, T]; lse -inf: no key)."""
    (o1, l1), (o2, l2) = acc, part
    lse = jnp.logaddexp(l1, l2)
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def weight(l):
        return jnp.exp(l - safe).transpose(0, 2, 1)[..., None]

    return o1 * weight(l1) + o2.astype(jnp.float32) * weight(l2), lse


def _pick(cond, a, b):
    return jax.tree.map(lambda x, y: jnp.where(cond, x, y), a, b)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The static part of one ring-attention call: ops, ring size n, chunk length c and the mask settings."""

    ops: Ops
    n: int
    c: int
    window: int | None
    softcap: float | None
    scale: float | None

    @property
    def kw(self) -> dict:
        return dict(softcap=self.softcap, scale=self.scale)

    def _segs(self, qs, ks):
        return {} if qs is None else dict(q_segment_ids=qs, kv_segment_ids=ks)

    def diagonal(self, grad: bool, *args, qs, ks):
        """A chunk with its own keys: causal, with the window."""
        fn = self.ops.attention_block_grad if grad else self.ops.attention_block
        return fn(*args, causal=True, sliding_window=self.window, **self._segs(qs, ks), **self.kw)

    def _branches(self, grad: bool, qs, ks):
        """Per distance (in chunks, 1 .. 2n-1) between a query chunk and an earlier key chunk: the branch index
        into the returned functions (skip: no pair in the window; whole: every pair in it; else the window's
        mask at that distance)."""
        c, w = self.c, self.window
        fn = self.ops.attention_block_grad if grad else self.ops.attention_block
        segs = self._segs(qs, ks)

        def run(offset, window):
            return lambda *args: fn(*args, q_offset=offset, causal=False, sliding_window=window, **segs, **self.kw)

        def skip(*args):
            q, k, v = args[:3]
            if grad:
                return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
            b, t, h, _ = q.shape
            return jnp.zeros_like(q), jnp.full((b, h, t), -jnp.inf, jnp.float32)

        branches, table = [skip, run(0, None)], [0]
        for dist in range(1, 2 * self.n):
            if w is None or dist * c + c - 1 < w:
                table.append(1)
            elif dist * c - (c - 1) >= w:
                table.append(0)
            else:
                table.append(len(branches))
                branches.append(run(dist * c, w))
        return np.asarray(table, np.int32), branches

    def earlier(self, grad: bool, dist, *args, qs, ks):
        """A query chunk with the key chunk ``dist`` (traced, >= 1) chunks before it."""
        table, branches = self._branches(grad, qs, ks)
        if len(branches) == 2 and table[1:].min() == 1:  # no window to honour: one call, no switch
            return branches[1](*args)
        return jax.lax.switch(jnp.asarray(table)[dist], branches, *args)


def _halves(x, axis=1):
    return None if x is None else jnp.split(x, 2, axis=axis)


def _shift(tree, n):
    return jax.lax.ppermute(tree, AXIS, [(i, (i + 1) % n) for i in range(n)])


def _ring_forward(ring: _Ring, q, k, v, segs):
    n = ring.n
    d = jax.lax.axis_index(AXIS)
    qa, qb = _halves(q)
    sa, sb = _halves(segs) or (None, None)
    zero = (jnp.zeros(qa.shape, jnp.float32), jnp.full((q.shape[0], q.shape[2], qa.shape[1]), -jnp.inf))
    acc_a = _merge(zero, ring.diagonal(False, qa, k[:, : ring.c], v[:, : ring.c], qs=sa, ks=sa))
    acc_b = _merge(zero, ring.diagonal(False, qb, k[:, ring.c :], v[:, ring.c :], qs=sb, ks=sb))
    acc_b = _merge(acc_b, ring.earlier(False, 2 * n - 1 - 2 * d, qb, k[:, : ring.c], v[:, : ring.c], qs=sb, ks=sa))
    kv = _shift((k, v, segs), n) if n > 1 else None
    for step in range(1, n):
        # The next block is sent before this one is used, so the transfer overlaps this step's attention.
        nxt = _shift(kv, n) if step < n - 1 else None
        src = (d - step) % n
        (ka, kb), (va, vb), (ska, skb) = _halves(kv[0]), _halves(kv[1]), _halves(kv[2]) or (None, None)
        acc_b = _merge(acc_b, ring.earlier(False, 2 * n - 1 - d - src, qb, ka, va, qs=sb, ks=ska))
        before = src < d
        qy, ky, vy = _pick(before, (qa, ka, va), (qb, kb, vb))
        qsy, ksy = (None, None) if segs is None else _pick(before, (sa, ska), (sb, skb))
        part = ring.earlier(False, jnp.abs(d - src), qy, ky, vy, qs=qsy, ks=ksy)
        acc_a = _pick(before, _merge(acc_a, part), acc_a)
        acc_b = _pick(before, acc_b, _merge(acc_b, part))
        kv = nxt
    out = jnp.concatenate([acc_a[0], acc_b[0]], axis=1).astype(q.dtype)
    return out, jnp.concatenate([acc_a[1], acc_b[1]], axis=2)


def _ring_backward(ring: _Ring, q, k, v, segs, out, lse, do):
    n, c = ring.n, ring.c
    d = jax.lax.axis_index(AXIS)
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    qa, qb = _halves(q)
    doa, dob = _halves(do)
    la, lb = _halves(lse, 2)
    da, db = _halves(delta, 2)
    sa, sb = _halves(segs) or (None, None)
    f32 = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    dqa, dqb = f32(qa), f32(qb)
    dk, dv = f32(k), f32(v)

    def add(acc, part, where=None):
        part = part.astype(jnp.float32)
        return acc + (part if where is None else jnp.where(where, part, jnp.zeros_like(part)))

    g = ring.diagonal(True, qa, k[:, :c], v[:, :c], doa, la, da, qs=sa, ks=sa)
    dqa, dk, dv = add(dqa, g[0]), dk.at[:, :c].add(g[1]), dv.at[:, :c].add(g[2])
    g = ring.diagonal(True, qb, k[:, c:], v[:, c:], dob, lb, db, qs=sb, ks=sb)
    dqb, dk, dv = add(dqb, g[0]), dk.at[:, c:].add(g[1]), dv.at[:, c:].add(g[2])
    g = ring.earlier(True, 2 * n - 1 - 2 * d, qb, k[:, :c], v[:, :c], dob, lb, db, qs=sb, ks=sa)
    dqb, dk, dv = add(dqb, g[0]), dk.at[:, :c].add(g[1]), dv.at[:, :c].add(g[2])
    kv = _shift((k, v, segs), n) if n > 1 else None
    for step in range(1, n):
        nxt = _shift(kv, n) if step < n - 1 else None  # sent ahead, as in the forward
        dk, dv = _shift((dk, dv), n)  # the K/V block's gradient travels with it
        src = (d - step) % n
        (ka, kb), (va, vb), (ska, skb) = _halves(kv[0]), _halves(kv[1]), _halves(kv[2]) or (None, None)
        g = ring.earlier(True, 2 * n - 1 - d - src, qb, ka, va, dob, lb, db, qs=sb, ks=ska)
        dqb, dk, dv = add(dqb, g[0]), dk.at[:, :c].add(g[1]), dv.at[:, :c].add(g[2])
        before = src < d
        qy, ky, vy, doy, ly, dy = _pick(before, (qa, ka, va, doa, la, da), (qb, kb, vb, dob, lb, db))
        qsy, ksy = (None, None) if segs is None else _pick(before, (sa, ska), (sb, skb))
        g = ring.earlier(True, jnp.abs(d - src), qy, ky, vy, doy, ly, dy, qs=qsy, ks=ksy)
        dqa, dqb = add(dqa, g[0], before), add(dqb, g[0], ~before)
        dk = jnp.concatenate([add(dk[:, :c], g[1], before), add(dk[:, c:], g[1], ~before)], axis=1)
        dv = jnp.concatenate([add(dv[:, :c], g[2], before), add(dv[:, c:], g[2], ~before)], axis=1)
        kv = nxt
    if n > 1:  # home: after n - 1 steps device d holds device d + 1's accumulators
        dk, dv = _shift((dk, dv), n)
    dq = jnp.concatenate([dqa, dqb], axis=1)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: _Ring, q, k, v, segs):
    return _ring_forward(ring, q, k, v, segs)[0]


def _ring_fwd(ring: _Ring, q, k, v, segs):
    out, lse = _ring_forward(ring, q, k, v, segs)
    return out, (q, k, v, segs, out, lse)


def _ring_bwd(ring: _Ring, res, do):
    q, k, v, segs, out, lse = res
    dq, dk, dv = _ring_backward(ring, q, k, v, segs, out, lse, do)
    return dq, dk, dv, jax.tree.map(lambda _: None, segs)


_ring_attention.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    ops: Ops,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis_size: int,
    segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Causal attention of this device's zigzag share; call inside ``shard_map`` over the "context" axis.

    q: [B, 2c, Hq, hd], k, v: [B, 2c, Hk, hd], segment_ids: [B, 2c] or None: device d's chunks d and 2n-1-d
    (``zigzag_order``) of each sequence. Returns [B, 2c, Hq, hd], equal to full-sequence attention's rows."""
    if q.shape[1] % 2:
        raise ValueError(f"ring attention needs two chunks per device; got {q.shape[1]} tokens")
    ring = _Ring(ops, axis_size, q.shape[1] // 2, sliding_window, softcap, scale)
    return _ring_attention(ring, q, k, v, segment_ids)
