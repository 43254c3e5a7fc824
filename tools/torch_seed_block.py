#!/usr/bin/env python3
"""The seed's quantizer block in PyTorch, timed step by step (issue 12 part 5).

The PyTorch side of the side-by-side step benchmark; vqkit's side is
bench/step_compare.cpp (target vqkit_step_compare), and tools/compare_step.py
runs the two alternately. Written for Debian's python3-torch (1.13, CPU).

How it corresponds to the seed (../shared/seed/000_4205217ba11a022f.txt,
"vector_quantizer_fixed.py") and to ../shared/docs/design.md:

  block (design §3 step 5, the seed's VectorQuantizerFixed(dim=256,
  codebook_size=1024, codebook_dim=1024)):
      x (N x 256) -> LayerNorm(256, eps 1e-5) -> GELU (exact, erf)
        -> Linear(256 -> 1024) -> VQ (K = 1024 codes of dim 1024)
        -> Linear(1024 -> 256) -> y (N x 256)
  seed fix 1, loss coefficients as in the paper: codebook term 0.25 *
      ||sg[x] - q||^2, commitment term 1.0 * ||x - sg[q]||^2, each the mean
      over N*D (PyTorch's mse_loss, vqkit's default Reduction::mean);
      straight-through output x + sg[q - x]. Under EMA the codebook term has
      no gradient (design §1): it only adds to the reported loss.
  seed fix 2, EMA codebook update (decay 0.99), with the Laplace smoothing
      of design §2 (eps 1e-5) and the state kept consistent (M_k = N_k e_k at
      every (re)initialisation; the seed started with N_k = 0, M_k = e_k,
      which flings unused codes away, design §1). The per-code sums are a
      scatter-add (index_add_), O(N*D), not the seed's one-hot matmul.
  seed fix 3, periodic dead-code check: a code is dead after 256 steps
      unused; checked every 100 steps from step 200; more than 3% dead
      re-runs k-means over the memory bank (vqkit's defaults; it never fires
      within the benchmark's step counts, but its per-step bookkeeping runs).
  seed fix 4, unit-sphere init: random directions scaled to sqrt(D), with
      N_k = 1, M_k = e_k. It serves until the data-driven init replaces it:
  data-driven init (design §2 "Initialisation", vqkit's VectorQuantizer):
      every training step pushes the pre-VQ rows into a memory bank, a ring
      buffer of 20*K rows (a batch larger than the bank keeps a random subset).
      On the first step where the bank holds >= 2*K rows, k-means over the
      bank (k-means++ seeding, 10 Lloyd iterations; distances by the norm
      trick + argmin, means by scatter-add; a cluster that becomes empty, or
      during the iterations holds fewer than half the mean rows per cluster,
      is re-seeded by splitting the largest one) replaces the codes, with
      N_k = count_k * rows_per_step / bank_rows and M_k = N_k e_k. When the
      bank first becomes full, the same runs once more ("refine").
  seed fix 5, metrics: per-batch usage (codes picked) and perplexity
      exp(-sum p log p), plus dead codes (unused >= 256 steps).

One step: forward + backward of loss = (y * dy).sum() + vq_loss with a fixed
random dy, then zero_grad() (no optimizer), as vqkit_step_compare does. The
input gradient is computed too (x requires grad), as vqkit's backward does.
Inputs (fresh standard normal rows every step) are drawn outside the timed
region.

Usage:
  torch_seed_block.py --batch B --tokens N --threads T --steps S --seed s --json PATH
Writes {"impl":"torch","batch":B,"tokens":N,"threads":T,"step_ms":[...], ...}
plus per-step diagnostics (init steps, VQ loss, usage, perplexity).
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def sq_dists(data, data_sq, centres):
    """||x - c||^2 for every row of data against every centre (n x k), by
    the norm trick ||x||^2 - 2 x.c + ||c||^2 (one GEMM)."""
    c_sq = (centres * centres).sum(1)
    d = torch.addmm(c_sq.unsqueeze(0), data, centres.t(), beta=1.0, alpha=-2.0)
    d += data_sq.unsqueeze(1)
    return d


def split_small_clusters(centres, counts, min_size):
    """Re-seeds every cluster with fewer than min_size rows by splitting the
    currently largest one (its centre c becomes c(1 + delta s) and c(1 - delta s),
    s a +-1 pattern over the dimensions; the count is shared). In place."""
    small = torch.nonzero(counts < min_size).flatten().tolist()
    if not small:
        return 0
    D = centres.shape[1]
    pattern = torch.ones(D, dtype=centres.dtype)
    pattern[1::2] = -1.0
    delta = 1.0 / 1024.0
    for j in small:
        big = int(torch.argmax(counts))
        if counts[big] < 2:  # nothing left to split
            break
        c = centres[big].clone()
        centres[j] = c * (1.0 + delta * pattern)
        centres[big] = c * (1.0 - delta * pattern)
        half = torch.floor(counts[big] / 2)
        counts[j] = half
        counts[big] -= half
    return len(small)


@torch.no_grad()
def kmeans(data, k, iterations, gen, min_cluster_fraction=0.5):
    """k-means++ seeding + Lloyd iterations over data (n x D, n >= k).
    Returns (centroids k x D, counts k, all > 0 after the last assignment)."""
    n, D = data.shape
    data_sq = (data * data).sum(1)
    # k-means++ (Arthur & Vassilvitskii): each next centre is a row drawn
    # with probability proportional to its squared distance to the nearest
    # centre so far. Sequential over the k centres; each pass is one
    # matrix-vector product over the data.
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = torch.randint(n, (1,), generator=gen)
    c = data[chosen[0]]
    mind = (data_sq - 2.0 * torch.mv(data, c) + torch.dot(c, c)).clamp_min_(0.0)
    for j in range(1, k):
        if float(mind.sum()) > 0:
            pick = torch.multinomial(mind, 1, generator=gen)[0]
        else:  # every row sits on a centre: uniform
            pick = torch.randint(n, (1,), generator=gen)[0]
        chosen[j] = pick
        c = data[pick]
        d = (data_sq - 2.0 * torch.mv(data, c) + torch.dot(c, c)).clamp_min_(0.0)
        torch.minimum(mind, d, out=mind)
    centres = data[chosen].clone()

    # Lloyd: assign (norm trick + argmin), move each centre to its rows' mean.
    min_size = max(1.0, math.ceil(min_cluster_fraction * n / k))
    counts = torch.zeros(k, dtype=data.dtype)
    for it in range(iterations):
        assign = torch.argmin(sq_dists(data, data_sq, centres), dim=1)
        counts = torch.bincount(assign, minlength=k).to(data.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, data)
        nonempty = counts > 0
        centres[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1)
        split_small_clusters(centres, counts, min_size if it + 1 < iterations else 1.0)
    if iterations == 0:
        assign = torch.argmin(sq_dists(data, data_sq, centres), dim=1)
        counts = torch.bincount(assign, minlength=k).to(data.dtype)
        split_small_clusters(centres, counts, 1.0)
    return centres, counts.clamp_min(1.0)


class EmaVectorQuantizer(nn.Module):
    """The seed's VectorQuantizerFixed, corrected as design.md §2 asks."""

    def __init__(self, codebook_size=1024, dim=1024, decay=0.99, eps=1e-5,
                 codebook_weight=0.25, commitment_weight=1.0, kmeans_iterations=10,
                 bank_factor=20, init_factor=2, dead_after=256, check_every=100,
                 min_steps=200, max_dead_fraction=0.03, seed=0):
        super().__init__()
        K, D = codebook_size, dim
        self.K, self.D = K, D
        self.decay, self.eps = decay, eps
        self.codebook_weight, self.commitment_weight = codebook_weight, commitment_weight
        self.kmeans_iterations = kmeans_iterations
        self.init_rows = init_factor * K
        self.dead_after, self.check_every = dead_after, check_every
        self.min_steps, self.max_dead_fraction = min_steps, max_dead_fraction
        self.gen = torch.Generator().manual_seed(seed + 1)
        # Unit-sphere init (seed fix 4), consistent EMA state N_k = 1, M_k = e_k.
        embed = F.normalize(torch.randn(K, D, generator=self.gen), dim=1) * math.sqrt(D)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(K))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("bank", torch.zeros(bank_factor * K, D))
        self.register_buffer("steps_since_used", torch.zeros(K, dtype=torch.long))
        self.bank_size = 0
        self.bank_head = 0
        self.bank_overflow = 0
        self.data_initialized = False
        self.init_refined = False
        self.step = 0
        self.reinits = 0

    # ---- memory bank (ring buffer) ----
    @torch.no_grad()
    def push(self, x):
        n, cap = x.shape[0], self.bank.shape[0]
        if n > cap:  # keep a random subset, in batch order; count the rest
            keep = torch.randperm(n, generator=self.gen)[:cap].sort().values
            self.bank.copy_(x[keep])
            self.bank_size, self.bank_head = cap, 0
            self.bank_overflow += n - cap
            return
        first = min(n, cap - self.bank_head)
        self.bank[self.bank_head:self.bank_head + first] = x[:first]
        if first < n:
            self.bank[:n - first] = x[first:]
        self.bank_head = (self.bank_head + n) % cap
        self.bank_size = min(cap, self.bank_size + n)

    @torch.no_grad()
    def reinit_from_bank(self, rows_per_step):
        centres, counts = kmeans(self.bank[:self.bank_size], self.K, self.kmeans_iterations,
                                 self.gen)
        n_k = counts * (rows_per_step / self.bank_size)
        self.embed.copy_(centres)
        self.cluster_size.copy_(n_k)
        self.embed_avg.copy_(centres * n_k.unsqueeze(1))  # consistent: M_k = N_k e_k
        self.steps_since_used.zero_()

    def forward(self, x):
        """x: N x D. Returns (quantized with straight-through gradient,
        indices, vq loss, metrics dict, data_initialized flag)."""
        N = x.shape[0]
        xd = x.detach()
        initialized_now = False
        if self.training:
            self.push(xd)
            cap = self.bank.shape[0]
            first = not self.data_initialized and self.bank_size >= self.init_rows
            refine = self.data_initialized and not self.init_refined and self.bank_size == cap
            if first or refine:
                self.reinit_from_bank(N)
                self.data_initialized = True
                self.init_refined = self.bank_size == cap
                initialized_now = True

        with torch.no_grad():
            e_sq = (self.embed * self.embed).sum(1)
            # argmin_k ||e_k||^2 - 2 x.e_k  (||x||^2 does not change the argmin)
            scores = torch.addmm(e_sq.unsqueeze(0), xd, self.embed.t(), beta=1.0, alpha=-2.0)
            indices = torch.argmin(scores, dim=1)
            q = self.embed.index_select(0, indices)

        # Loss (seed fix 1): the codebook term is a constant under EMA.
        codebook_loss = self.codebook_weight * F.mse_loss(q, xd)
        commitment_loss = self.commitment_weight * F.mse_loss(x, q)
        loss = codebook_loss + commitment_loss
        out = x + (q - x).detach()  # straight-through

        with torch.no_grad():
            counts = torch.bincount(indices, minlength=self.K).to(x.dtype)
            if self.training:
                # EMA update (seed fix 2) with Laplace smoothing; scatter-add sums.
                sums = torch.zeros_like(self.embed).index_add_(0, indices, xd)
                g = self.decay
                self.cluster_size.mul_(g).add_(counts, alpha=1.0 - g)
                self.embed_avg.mul_(g).add_(sums, alpha=1.0 - g)
                total = self.cluster_size.sum()
                smoothed = (self.cluster_size + self.eps) / (total + self.K * self.eps) * total
                torch.div(self.embed_avg, smoothed.unsqueeze(1), out=self.embed)
                # Dead-code bookkeeping (seed fix 3).
                self.steps_since_used += 1
                self.steps_since_used[counts > 0] = 0
                self.step += 1
            p = counts / N
            nz = p[p > 0]
            perplexity = torch.exp(-(nz * nz.log()).sum())
            usage = int((counts > 0).sum())
            dead = int((self.steps_since_used >= self.dead_after).sum())
            if (self.training and self.data_initialized and self.step >= self.min_steps
                    and self.step % self.check_every == 0
                    and dead > self.max_dead_fraction * self.K and self.bank_size >= self.K):
                self.reinit_from_bank(N)
                self.reinits += 1
        metrics = {"perplexity": float(perplexity), "usage": usage, "dead": dead}
        return out, indices, loss, metrics, initialized_now


class SeedQuantizerBlock(nn.Module):
    """x (N x dim) -> LayerNorm -> GELU -> Linear(dim -> code dim) -> VQ -> Linear(code dim -> dim)."""

    def __init__(self, dim=256, codebook_size=1024, codebook_dim=1024, seed=0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.act = nn.GELU()
        self.proj_in = nn.Linear(dim, codebook_dim)
        self.vq = EmaVectorQuantizer(codebook_size, codebook_dim, seed=seed)
        self.proj_out = nn.Linear(codebook_dim, dim)

    def forward(self, x):
        h = self.proj_in(self.act(self.norm(x)))
        q, indices, vq_loss, metrics, initialized = self.vq(h)
        return self.proj_out(q), indices, vq_loss, metrics, initialized


# ---- THE STEP ---------------------------------------------------------------
# The only code that is timed (as training_step in bench/step_compare.cpp).
def training_step(block, x, dy):
    y, _, vq_loss, metrics, initialized = block(x)
    loss = (y * dy).sum() + vq_loss
    loss.backward()
    block.zero_grad(set_to_none=False)
    return float(vq_loss), metrics, initialized
# ---- end of the step --------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if min(args.batch, args.tokens, args.threads, args.steps) < 1:
        ap.error("--batch, --tokens, --threads and --steps must be >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # Linear / LayerNorm initialisation
    block = SeedQuantizerBlock(seed=args.seed)
    block.train()
    rows = args.batch * args.tokens
    gen = torch.Generator().manual_seed(args.seed + 0x5EED)
    dy = torch.randn(rows, 256, generator=gen)  # fixed for the whole run

    step_ms, init_steps, losses, usage, perp = [], [], [], [], []
    for s in range(args.steps):
        x = torch.randn(rows, 256, generator=gen).requires_grad_(True)  # outside the clock
        t0 = time.perf_counter()
        loss, metrics, initialized = training_step(block, x, dy)
        t1 = time.perf_counter()
        ms = (t1 - t0) * 1e3
        step_ms.append(ms)
        if initialized:
            init_steps.append(s)
        losses.append(loss)
        usage.append(metrics["usage"])
        perp.append(metrics["perplexity"])
        print(f"torch step {s}: {ms:.1f} ms{' [k-means init]' if initialized else ''}"
              f"  vq_loss {loss:.4g}  usage {metrics['usage']}"
              f"  perplexity {metrics['perplexity']:.1f}", file=sys.stderr)

    if args.json:
        out = {"impl": "torch", "batch": args.batch, "tokens": args.tokens,
               "threads": args.threads, "step_ms": step_ms, "init_steps": init_steps,
               "vq_loss": losses, "usage": usage, "perplexity": perp,
               "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
