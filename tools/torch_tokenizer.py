#!/usr/bin/env python3
"""The small CoPilot4D tokenizer's training step in PyTorch (issue 12 part 6).

The PyTorch side of the side-by-side tokenizer benchmark; vqkit's side is
examples/train_tokenizer.cpp (the small preset), and tools/compare_tokenizer.py
runs the two alternately. Written for Debian's python3-torch (1.13, CPU): run it
with /usr/bin/python3. Written from docs/tokenizer.md, docs/layers.md and the
headers' comments (include/vqkit/tokenizer/config.hpp, models/tokenizer*.hpp,
layers/*.hpp, lidar/*.hpp, optim/*.hpp), not translated from vqkit's code.

One step (timed with time.perf_counter exactly where train_tokenizer's clock
runs: from drawing the frames to the end of the optimiser step; the CSV/progress
output after it is not timed in either program):
  frames    2 frames drawn uniformly with replacement from --data (KITTI seq00
            frames 0-5), each rotated by a uniform yaw in [-180, 180] degrees and
            mirrored (y -> -y) with probability 0.5
  voxelise  ROI [-25.6, 25.6) x [-25.6, 25.6) x [-4.5, 4.5) m, 128 x 128 x 16 voxels;
            sparse (unique voxel keys, never a dense volume); per point the offset
            to its voxel centre
  occupancy coarse real occupancy, 4 x 4 voxels in x, y, every z level: (B, 32, 32, 16)
  rays      every point in the ROI farther than 1 m is a ray from the sensor;
            2048 per frame drawn without replacement; 32 depths per ray,
            stratified over the union of the ray's occupied coarse cells
            (uniform in [1, 37] m when the ray crosses none)
  network   (B = 2; N tokens = B*16*16 = 512)
            PointNet  Linear(3,16) -> LN -> ReLU -> Linear(16,16), summed per voxel -> LN
            BEV       + z-embedding(16 levels, N(0,1) * 0.02) -> Linear(16,64) -> ReLU
                      -> Linear(64,64), summed per pillar into the dense (B,128,128,64)
                      map -> LN
            encoder   4x4 space-to-depth -> Linear(1024,128) -> LN, + learned position
                      table (32*32,128); 2 Swin blocks (128, 8 heads, window 8, shift 0/4);
                      Swin patch merging (LN(512) -> Linear(512,256), no bias);
                      6 Swin blocks (256, 8 heads, window 8, shift 0/4/0/4/0/4)
            pre-VQ    LN(256) -> GELU -> Linear(256,64)
            VQ        K = 256, D = 64, EMA (decay 0.8, Laplace eps 1e-5), k-means init
                      over a 512-row memory bank (fills on step 1), 'replace' policy
                      (threshold 0.5 of the mean EMA cluster size, from the bank);
                      straight-through; loss 0.25 ||sg[z]-e||^2 + 1.0 ||z-sg[e]||^2
            post-VQ   Linear(64,256)
            decoder   6 Swin blocks (256) -> Linear(256,512) -> 2x depth-to-space -> LN(128)
                      -> 2 Swin blocks (128)
            grid head LN -> Linear(128, 4*4*16*16) -> 4x depth-to-space: feature grid
                      (B, 128, 128, 16 z, 16 channels)
            skip head LN -> Linear(128,16): occupancy logits (B, 32, 32, 16)
  render    4096 rays x 32 samples: trilinear features (zero padding, cell centres
            at +0.5) -> Linear(16,32) -> ReLU -> Linear(32,1) -> sigmoid = alpha;
            w_i = alpha_i prod_{j<i}(1 - alpha_j), depth = sum w_i h_i
  loss      L1(depth) + mean_rays sum_i 1(|h_i - D| > 0.4) w_i^2
            + BCE-with-logits(skip logits, real occupancy) + VQ loss
  update    global-norm clip 0.1; AdamW (betas 0.9/0.95, eps 1e-8, weight decay 1e-4
            on Linear weights only); lr 3e-4, linear warm-up over min(20, steps)
            steps, then cosine to 3e-5 at --steps (train_tokenizer's schedule)

Where this differs from vqkit (same counts, shapes and kinds of work unless said):
  - Random numbers: numpy / torch generators, not vqkit's Rng, so the frames,
    augmentations, rays, samples and initial weights are other draws (of the
    same distributions; Linear and LayerNorm initialisation are PyTorch's
    defaults, which vqkit copies; truncated normal 0.02 for the position and
    relative-bias tables as vqkit).
  - Ray sampling: vqkit walks each ray through the coarse grid with a 3-D DDA;
    here the occupied intervals come from sorting every ray's crossings of all
    the coarse grid's planes (vectorised over rays; the same intervals up to
    rounding), then the same stratified inverse-CDF draw.
  - Trilinear sampling: --trilinear gather (default) computes the 8 corner
    rows and weights and gathers from the (b, y, x, z)-row feature table,
    autograd's scatter-add back; --trilinear grid_sample uses F.grid_sample
    (5-D, bilinear, zeros, align_corners=False: the same function), which is
    the textbook choice but far slower on CPU in torch 1.13 (its 3-D CPU
    kernel is not vectorised and reads the channels-first grid with large
    strides), so it is not the default; the comparison uses the faster one.
  - Shifted-window attention: the standard Swin formulation (roll by -s,
    partition into windows, relative position bias, additive -inf mask
    between the roll's regions, roll back), the same function vqkit computes;
    qkv is applied per window (vqkit applies it to the whole map first: the
    same rows, the same FLOPs).
  - VQ: the nearest-code search is one addmm + argmin; the k-means init is
    tools/torch_seed_block.py's (k-means++ seeding, sequential, + 10 Lloyd
    iterations, empty clusters split), vqkit's seeds in batches by rejection;
    replaced codes draw their bank row with torch.randint. vqkit also computes
    two monitoring figures per step (lag_fraction, bank_staleness, O(N*D))
    that this script skips; usage, window usage, perplexity and dead codes
    are computed.
  - Optimiser: torch.optim.AdamW (per-parameter loop, torch 1.13's CPU
    default) and torch.nn.utils.clip_grad_norm_; vqkit computes the norm in
    double with blocked sums (bit-identical across thread counts), torch in
    float.
  - Everything is float32 except the ray/interval arithmetic (float64, as
    vqkit's sampling is in double).
  - Memory: by default (--malloc tuned) glibc's mmap and trim thresholds are
    raised with mallopt before torch loads, so large freed tensors are reused
    instead of being unmapped and faulted in again every step (on this VM that
    fault cost was larger than the arithmetic: step ~2x slower without it).
    vqkit reuses its largest buffers instead; --malloc glibc shows plain torch.
  - Under CPU contention (another busy process on the 2 cores) torch's
    OpenMP regions degrade far more than vqkit's (a 20x slower step was seen):
    time both on an idle machine.

Usage:
  /usr/bin/python3 tools/torch_tokenizer.py [--steps 30] [--threads 2] [--data DIR]
      [--seed 0] [--trilinear gather|grid_sample] [--malloc tuned|glibc] [--log-every 5]
The last line of output is
  torch_tokenizer: steps=S threads=T median_step_s=X first_step_s=Y median_all_s=Z
      params=P loss_first=A loss_last=B l1_first=C l1_last=D trilinear=M malloc=A
with median_step_s the median over steps 2..S (after the first, which holds the
k-means init) and median_all_s over every step (train_tokenizer's "median of
this run's steps" is over every step).
"""
import argparse
import math
import os
import statistics
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch intra-op (OpenMP) and OpenBLAS threads; inter-op threads are 1")
    ap.add_argument("--data", default=None,
                    help="folder of KITTI .bin scans (default: ../shared/data/kitti/seq00 from "
                         "the working directory, then from the repository, as train_tokenizer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trilinear", choices=["gather", "grid_sample"], default="gather")
    ap.add_argument("--log-every", type=int, default=5, help="print the losses every N steps")
    ap.add_argument("--malloc", choices=["tuned", "glibc"], default="tuned",
                    help="tuned (default): mallopt keeps large freed blocks for reuse (see "
                         "tune_malloc); glibc: the C library's defaults")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.threads < 1:
        ap.error("--steps and --threads must be >= 1")
    return a


def tune_malloc():
    """Keeps freed large blocks in glibc's heap instead of returning them to
    the kernel: without it every step's large tensors (the 33 MB feature grid,
    its gradient, the gathered corner features...) are fresh mmaps, faulted in
    page by page, which here costs more than the arithmetic on them (e.g. a
    33 MB torch.zeros: ~100 ms vs ~8 ms). PyTorch's CPU tuning guides get the
    same from jemalloc / tcmalloc via LD_PRELOAD; vqkit gets it by reusing its
    largest buffers across steps (docs/tokenizer.md, "No malloc tuning")."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    return "tuned" if ok else "glibc (mallopt failed)"


ARGS = parse_args()
# Thread counts must be fixed before torch (and its OpenMP / OpenBLAS) loads.
os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)
os.environ["OPENBLAS_NUM_THREADS"] = str(ARGS.threads)
MALLOC = tune_malloc() if ARGS.malloc == "tuned" else "glibc"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
from torch_seed_block import kmeans  # noqa: E402  (k-means++ + Lloyd, as the seed block's)

# ---- the small config (include/vqkit/tokenizer/config.hpp, TokenizerConfig::small) ----
CFG = dict(
    roi=((-25.6, 25.6), (-25.6, 25.6), (-4.5, 4.5)),
    voxels=(128, 128, 16),  # x, y, z
    pointnet_dim=16, bev_dim=64, patch_size=4, embed_dim=128, window=8, heads=8,
    stage1_depth=2, stage2_depth=6, merged_dim=256,
    codebook_size=256, code_dim=64, codebook_weight=0.25, commitment_weight=1.0,
    ema_decay=0.8, ema_eps=1e-5, replace_threshold=0.5, memory_bank_size=512,
    dead_code_after=256, usage_window=10, kmeans_iterations=10,
    feature_grid_xy=128, feature_grid_z=16, feature_channels=16, render_mlp_dim=32,
    occupancy_pool=4, rays_per_frame=2048, samples_per_ray=32, ray_near=1.0, ray_far=37.0,
    depth_eps=0.4, depth_weight=1.0, sharpness_weight=1.0, occupancy_weight=1.0,
    lr=3e-4, beta1=0.9, beta2=0.95, weight_decay=1e-4, warmup_steps=20, grad_clip=0.1,
    batch_size=2, augment_yaw_deg=180.0, augment_flip=0.5,
)


# ==== data ==================================================================================

def find_data(path):
    cands = [path] if path else ["../shared/data/kitti/seq00",
                                 os.path.join(REPO, "../shared/data/kitti/seq00")]
    for c in cands:
        if os.path.isdir(c) and any(f.endswith(".bin") for f in os.listdir(c)):
            return c
    raise SystemExit(f"no folder of KITTI .bin scans among {cands} (pass --data)")


def load_frames(folder):
    names = [f for f in os.listdir(folder) if f.endswith(".bin")]
    names.sort(key=lambda n: (0, int(n[:-4]), "") if n[:-4].isdigit() else (1, 0, n))
    return [np.fromfile(os.path.join(folder, n), dtype="<f4").reshape(-1, 4) for n in names]


def augment(points, rng, yaw_deg, flip_prob):
    """A copy rotated about z by a uniform yaw in [-yaw_deg, yaw_deg], then
    mirrored in y with probability flip_prob (two uniforms, as vqkit draws)."""
    u1, u2 = rng.random(), rng.random()
    yaw = (2.0 * u1 - 1.0) * math.radians(yaw_deg)
    c, s = math.cos(yaw), math.sin(yaw)
    xyz = points[:, :3].astype(np.float64)
    out = np.empty_like(xyz)
    out[:, 0] = c * xyz[:, 0] - s * xyz[:, 1]
    out[:, 1] = s * xyz[:, 0] + c * xyz[:, 1]
    out[:, 2] = xyz[:, 2]
    if u2 < flip_prob:
        out[:, 1] = -out[:, 1]
    return out


class Batch:
    pass


def make_batch(frames, rng, gen):
    """Voxels, real coarse occupancy, rays and their depth samples (vqkit's
    Tokenizer::make_batch). frames: list of (P_b, 3) float64 arrays."""
    (x0, x1), (y0, y1), (z0, z1) = CFG["roi"]
    nx, ny, nz = CFG["voxels"]
    lo = np.array([x0, y0, z0])
    hi = np.array([x1, y1, z1])
    size = (hi - lo) / np.array([nx, ny, nz])
    B = len(frames)
    pts, bidx = [], []
    for b, f in enumerate(frames):
        inside = np.all((f >= lo) & (f < hi), axis=1)
        pts.append(f[inside])
        bidx.append(np.full(int(inside.sum()), b, dtype=np.int64))
    p = np.concatenate(pts)  # (Pk, 3) float64, frame by frame, row order kept
    pb = np.concatenate(bidx)
    cell = np.minimum(np.floor((p - lo) / size).astype(np.int64), np.array([nx, ny, nz]) - 1)
    key = ((pb * nz + cell[:, 2]) * ny + cell[:, 1]) * nx + cell[:, 0]
    keys, point_voxel = np.unique(key, return_inverse=True)  # sorted by (b, z, y, x)
    vx = keys % nx
    vy = (keys // nx) % ny
    vz = (keys // (nx * ny)) % nz
    vb = keys // (nx * ny * nz)
    bt = Batch()
    bt.B = B
    bt.point_offset = torch.from_numpy((p - (lo + (cell + 0.5) * size)).astype(np.float32))
    bt.point_voxel = torch.from_numpy(point_voxel.reshape(-1))
    bt.voxels = len(keys)
    bt.voxel_z = torch.from_numpy(vz)
    bt.voxel_bev_row = torch.from_numpy((vb * ny + vy) * nx + vx)
    # Coarse occupancy (b, y, x, z): the skip head's target and the sampler's mask.
    pool = CFG["occupancy_pool"]
    cy, cx = ny // pool, nx // pool
    occ = np.zeros((B, cy, cx, nz), dtype=np.float32)
    occ[vb, vy // pool, vx // pool, vz] = 1.0
    bt.occupancy = torch.from_numpy(occ)

    # Rays: every kept point farther than ray_near, from the sensor at 0.
    near, far, S = CFG["ray_near"], CFG["ray_far"], CFG["samples_per_ray"]
    dist = np.linalg.norm(p, axis=1)
    ok = dist > near
    sel = []
    for b in range(B):
        rows = np.flatnonzero(ok & (pb == b))
        if len(rows) > CFG["rays_per_frame"]:
            rows = np.sort(rng.choice(rows, CFG["rays_per_frame"], replace=False))
        sel.append(rows)
    sel = np.concatenate(sel)
    depth_gt = dist[sel]
    direction = p[sel] / depth_gt[:, None]
    ray_b = pb[sel]
    h = sample_depths(torch.from_numpy(direction), torch.from_numpy(ray_b), bt.occupancy,
                      lo, size * np.array([pool, pool, 1]), S, near, far, gen)
    bt.ray_dir = torch.from_numpy(direction.astype(np.float32))
    bt.ray_batch = torch.from_numpy(ray_b)
    bt.ray_depth = torch.from_numpy(depth_gt.astype(np.float32))
    bt.samples = h.float()  # (R, S)
    return bt


def sample_depths(d, rb, occ, lo, cell, S, near, far, gen):
    """Stratified depths along rays from the origin, inside the occupied coarse
    cells (occ (B, cy, cx, nz), cell sizes `cell` (x, y, z) from `lo`).

    Every ray is cut at every plane of the coarse grid (sorted crossings), each
    piece lies in one cell, and the occupied pieces form the ray's intervals;
    S stratified uniforms over their total length L are mapped through the
    cumulative lengths. Rays with L = 0 sample [near, far] uniformly."""
    d = d.double()
    R = d.shape[0]
    B, cy, cx, nz = occ.shape
    n = (cx, cy, nz)
    lo_t = torch.tensor(lo, dtype=torch.float64)
    cs_t = torch.tensor(cell, dtype=torch.float64)
    hi_t = lo_t + cs_t * torch.tensor(n, dtype=torch.float64)
    # Slab test against the grid box, from the origin (0, 0, 0).
    inv = 1.0 / d  # +-inf along an axis the ray does not move on
    ta, tb = lo_t * inv, hi_t * inv
    t0 = torch.clamp(torch.minimum(ta, tb).max(1).values, min=near)
    t1 = torch.clamp(torch.maximum(ta, tb).min(1).values, max=far)
    cuts = [t0[:, None], t1[:, None]]
    for k in range(3):
        planes = lo_t[k] + cs_t[k] * torch.arange(n[k] + 1, dtype=torch.float64)
        cuts.append(planes[None, :] * inv[:, k:k + 1])
    t = torch.cat(cuts, 1).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    t = torch.minimum(torch.maximum(t, t0[:, None]), t1[:, None]).sort(1).values  # (R, M+1)
    a, e = t[:, :-1], t[:, 1:]
    mid = (0.5 * (a + e)).unsqueeze(2) * d.unsqueeze(1)  # (R, M, 3)
    c = torch.floor((mid - lo_t) / cs_t).long()
    for k in range(3):
        c[..., k].clamp_(0, n[k] - 1)
    hit = occ[rb[:, None], c[..., 1], c[..., 0], c[..., 2]] > 0
    length = torch.where(hit & (t1 > t0)[:, None], e - a, torch.zeros_like(a))
    cum = length.cumsum(1)
    L = cum[:, -1]
    u = (torch.arange(S, dtype=torch.float64) + torch.rand(R, S, generator=gen, dtype=torch.float64)) / S
    target = u * L[:, None]
    j = torch.searchsorted(cum, target, right=True).clamp_(max=length.shape[1] - 1)
    start = a.gather(1, j)
    before = cum.gather(1, j) - length.gather(1, j)
    h = torch.minimum(torch.maximum(start + (target - before), start), e.gather(1, j))
    fallback = near + u * (far - near)
    return torch.where((L > 0)[:, None], h, fallback)


# ==== network ===============================================================================

def space_to_depth(x, p):
    """(B, H, W, C) -> (B, H/p, W/p, p*p*C), sub-pixel (dy, dx) row-major."""
    B, H, W, C = x.shape
    return x.reshape(B, H // p, p, W // p, p, C).permute(0, 1, 3, 2, 4, 5).reshape(
        B, H // p, W // p, p * p * C)


def depth_to_space(x, p):
    """(B, H, W, p*p*C) -> (B, H*p, W*p, C), the inverse of space_to_depth."""
    B, H, W, PC = x.shape
    C = PC // (p * p)
    return x.reshape(B, H, W, p, p, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H * p, W * p, C)


class WindowAttention(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02, a=-0.04, b=0.04)
        yy, xx = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        coords = torch.stack([yy.flatten(), xx.flatten()])  # (2, n)
        rel = coords[:, :, None] - coords[:, None, :] + window - 1
        self.register_buffer("rel_index", rel[0] * (2 * window - 1) + rel[1], persistent=False)

    def forward(self, x, mask):
        """x (windows, n, C); mask (windows per map, n, n) of 0 / -inf, or None."""
        Bw, n, C = x.shape
        h = self.heads
        q, k, v = self.qkv(x).reshape(Bw, n, 3, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (Bw, h, n, n)
        bias = self.relative_position_bias_table[self.rel_index].permute(2, 0, 1)  # (h, n, n)
        attn = attn + bias
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(Bw // nw, nw, h, n, n) + mask[None, :, None]).view(Bw, h, n, n)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(Bw, n, C)
        return self.proj(out)


class Mlp(nn.Sequential):
    def __init__(self, cin, hidden, cout, act):
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, cout)


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, window, shift):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, dim, nn.GELU)
        self._masks = {}

    def mask(self, H, W, s, device):
        """The shifted-window mask: tokens of the rolled map that came from
        different regions (the last `window` rows/columns split at -s) do not
        attend to each other."""
        key = (H, W, s)
        if key not in self._masks:
            w = self.window
            region = torch.zeros(H, W, dtype=torch.long)
            cut = lambda size: (slice(0, size - w), slice(size - w, size - s), slice(size - s, size))
            label = 0
            for ys in cut(H):
                for xs in cut(W):
                    region[ys, xs] = label
                    label += 1
            r = region.view(H // w, w, W // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
            m = torch.zeros(r.shape[0], w * w, w * w, device=device)
            m.masked_fill_(r[:, :, None] != r[:, None, :], float("-inf"))
            self._masks[key] = m
        return self._masks[key]

    def forward(self, x):
        B, H, W, C = x.shape
        w = self.window
        s = self.shift if min(H, W) > w else 0  # a map of one window does not shift
        h = self.norm1(x)
        if s:
            h = torch.roll(h, (-s, -s), (1, 2))
        win = h.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
        o = self.attn(win, self.mask(H, W, s, x.device) if s else None)
        o = o.view(B, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        if s:
            o = torch.roll(o, (s, s), (1, 2))
        x = x + o
        return x + self.mlp(self.norm2(x))


def swin_stage(dim, depth, heads, window):
    return nn.Sequential(*[SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2)
                           for i in range(depth)])


class PatchMerging(nn.Module):
    """Swin's 2x2 merge: (B, H, W, C) -> LN(4C) -> Linear(4C -> 2C, no bias)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class PatchUpsample(nn.Module):
    """Linear(C -> 4C') -> 2x depth-to-space -> LN(C')."""

    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Linear(cin, 4 * cout)
        self.norm = nn.LayerNorm(cout)

    def forward(self, x):
        return self.norm(depth_to_space(self.proj(x), 2))


class EmaVectorQuantizer(nn.Module):
    """EMA vector quantizer with a memory bank, k-means init and the 'replace'
    dead-code policy (vqkit's VectorQuantizer under the small config)."""

    def __init__(self, K, D, decay, eps, codebook_weight, commitment_weight, bank_rows,
                 init_rows, replace_threshold, usage_window, dead_after, kmeans_iterations, seed):
        super().__init__()
        self.K, self.D = K, D
        self.decay, self.eps = decay, eps
        self.codebook_weight, self.commitment_weight = codebook_weight, commitment_weight
        self.init_rows, self.replace_threshold = init_rows, replace_threshold
        self.usage_window, self.dead_after = usage_window, dead_after
        self.kmeans_iterations = kmeans_iterations
        self.gen = torch.Generator().manual_seed(seed + 7)
        embed = F.normalize(torch.randn(K, D, generator=self.gen), dim=1) * math.sqrt(D)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(K))
        self.register_buffer("embed_sum", embed.clone())  # consistent: M_k = N_k e_k
        self.register_buffer("bank", torch.zeros(bank_rows, D))
        self.register_buffer("since_used", torch.zeros(K, dtype=torch.long))
        self.register_buffer("used", torch.zeros(K, dtype=torch.bool))
        self.bank_size = self.bank_head = 0
        self.initialized = False
        self.replaced_total = 0

    @torch.no_grad()
    def _push(self, x):
        n, cap = x.shape[0], self.bank.shape[0]
        if n >= cap:  # (the small config: one step fills the bank exactly)
            keep = torch.randperm(n, generator=self.gen)[:cap].sort().values if n > cap else None
            self.bank.copy_(x if keep is None else x[keep])
            self.bank_size, self.bank_head = cap, 0
            return
        idx = (self.bank_head + torch.arange(n)) % cap
        self.bank[idx] = x
        self.bank_head = (self.bank_head + n) % cap
        self.bank_size = min(cap, self.bank_size + n)

    @torch.no_grad()
    def _kmeans_init(self, rows_per_step):
        centres, counts = kmeans(self.bank[:self.bank_size], self.K, self.kmeans_iterations, self.gen)
        n_k = counts * (rows_per_step / self.bank_size)
        self.embed.copy_(centres)
        self.cluster_size.copy_(n_k)
        self.embed_sum.copy_(centres * n_k[:, None])
        self.since_used.zero_()
        self.used.zero_()

    def forward(self, z):
        """z (N, D) -> (quantized with straight-through gradient, loss, info)."""
        N = z.shape[0]
        zd = z.detach()
        info = {"init": False}
        if self.training:
            self._push(zd)
            if not self.initialized and self.bank_size >= self.init_rows:
                self._kmeans_init(N)
                self.initialized = info["init"] = True
        with torch.no_grad():
            e2 = (self.embed * self.embed).sum(1)
            idx = torch.addmm(e2[None, :], zd, self.embed.t(), beta=1.0, alpha=-2.0).argmin(1)
            q = self.embed[idx]
        distortion = F.mse_loss(zd, q)  # under EMA the codebook term has no gradient
        loss = self.codebook_weight * distortion + self.commitment_weight * F.mse_loss(z, q)
        out = z + (q - z).detach()
        with torch.no_grad():
            counts = torch.bincount(idx, minlength=self.K).to(z.dtype)
            if self.training:
                g = self.decay
                self.cluster_size.mul_(g).add_(counts, alpha=1 - g)
                sums = torch.zeros_like(self.embed).index_add_(0, idx, zd)
                self.embed_sum.mul_(g).add_(sums, alpha=1 - g)
                tot = self.cluster_size.sum()
                smoothed = (self.cluster_size + self.eps) / (tot + self.K * self.eps) * tot
                torch.div(self.embed_sum, smoothed[:, None], out=self.embed)
                hit = counts > 0
                self.since_used.add_(1).masked_fill_(hit, 0)
                self.used |= hit
            p = counts / N
            nz = p[p > 0]
            info["perplexity"] = float(torch.exp(-(nz * nz.log()).sum()))
            info["usage"] = int((counts > 0).sum())
            info["window_usage"] = int(((self.since_used < self.usage_window) & self.used).sum())
            info["dead"] = int((self.since_used >= self.dead_after).sum())
            info["replaced"] = 0
            if self.training and self.initialized:  # 'replace': small EMA clusters re-seeded
                mean = self.cluster_size.mean()
                small = torch.nonzero(self.cluster_size < self.replace_threshold * mean).flatten()
                if small.numel():
                    rows = self.bank[torch.randint(self.bank_size, (small.numel(),), generator=self.gen)]
                    self.embed[small] = rows
                    self.cluster_size[small] = mean
                    self.embed_sum[small] = rows * mean
                    self.since_used[small] = 0
                    self.used[small] = False
                    info["replaced"] = small.numel()
                    self.replaced_total += small.numel()
        return out, loss, info


class TokenizerNet(nn.Module):
    def __init__(self, c, seed):
        super().__init__()
        nx, ny, nz = c["voxels"]
        self.c = c
        P, E, M = c["pointnet_dim"], c["embed_dim"], c["merged_dim"]
        self.pointnet = nn.Sequential(nn.Linear(3, P), nn.LayerNorm(P), nn.ReLU(), nn.Linear(P, P))
        self.pointnet_norm = nn.LayerNorm(P)
        self.z_embed = nn.Embedding(nz, P)
        with torch.no_grad():
            self.z_embed.weight.mul_(0.02)  # small next to the PointNet features
        self.bev_mlp = Mlp(P, c["bev_dim"], c["bev_dim"], nn.ReLU)
        self.bev_norm = nn.LayerNorm(c["bev_dim"])
        p = c["patch_size"]
        self.patch_proj = nn.Linear(p * p * c["bev_dim"], E)
        self.patch_norm = nn.LayerNorm(E)
        self.pos_embed = nn.Parameter(torch.empty(1, ny // p, nx // p, E))
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        w, h = c["window"], c["heads"]
        self.enc1 = swin_stage(E, c["stage1_depth"], h, w)
        self.merge = PatchMerging(E)
        self.enc2 = swin_stage(M, c["stage2_depth"], h, w)
        self.pre_vq = nn.Sequential(nn.LayerNorm(M), nn.GELU(), nn.Linear(M, c["code_dim"]))
        self.vq = EmaVectorQuantizer(
            c["codebook_size"], c["code_dim"], c["ema_decay"], c["ema_eps"], c["codebook_weight"],
            c["commitment_weight"], c["memory_bank_size"],
            min(c["memory_bank_size"], 2 * c["codebook_size"]), c["replace_threshold"],
            c["usage_window"], c["dead_code_after"], c["kmeans_iterations"], seed)
        self.post_vq = nn.Linear(c["code_dim"], M)
        self.dec2 = swin_stage(M, c["stage2_depth"], h, w)
        self.up = PatchUpsample(M, E)
        self.dec1 = swin_stage(E, c["stage1_depth"], h, w)
        self.upsample = c["feature_grid_xy"] // (nx // p)
        self.grid_head = nn.Sequential(
            nn.LayerNorm(E),
            nn.Linear(E, self.upsample ** 2 * c["feature_grid_z"] * c["feature_channels"]))
        assert c["occupancy_pool"] == p  # one coarse cell per decoder token (small config)
        self.skip_head = nn.Sequential(nn.LayerNorm(E), nn.Linear(E, nz))

    def forward(self, bt):
        nx, ny, nz = self.c["voxels"]
        B = bt.B
        h = self.pointnet(bt.point_offset)
        v = torch.zeros(bt.voxels, h.shape[1]).index_add(0, bt.point_voxel, h)
        v = self.pointnet_norm(v) + self.z_embed(bt.voxel_z)
        v = self.bev_mlp(v)
        bev = torch.zeros(B * ny * nx, v.shape[1]).index_add(0, bt.voxel_bev_row, v)
        bev = self.bev_norm(bev).view(B, ny, nx, -1)
        x = self.patch_norm(self.patch_proj(space_to_depth(bev, self.c["patch_size"]))) + self.pos_embed
        x = self.enc2(self.merge(self.enc1(x)))
        tokens = self.pre_vq(x)
        tb, th, tw, D = tokens.shape
        q, vq_loss, info = self.vq(tokens.reshape(-1, D))
        x = self.post_vq(q).view(tb, th, tw, -1)
        x = self.dec1(self.up(self.dec2(x)))
        grid = depth_to_space(self.grid_head(x), self.upsample)  # (B, 128, 128, nz*C), cols (z, c)
        logits = self.skip_head(x)  # (B, 32, 32, nz)
        return grid, logits, vq_loss, info


class Tokenizer(nn.Module):
    def __init__(self, c, seed, trilinear):
        super().__init__()
        self.c = c
        self.net = TokenizerNet(c, seed)
        self.alpha_mlp = Mlp(c["feature_channels"], c["render_mlp_dim"], 1, nn.ReLU)
        self.trilinear = trilinear
        (x0, x1), (y0, y1), (z0, z1) = c["roi"]
        self.lo = torch.tensor([x0, y0, z0])
        self.hi = torch.tensor([x1, y1, z1])

    def sample_features(self, grid, pts, rb):
        """Trilinear features (P, C) of the grid (B, NY, NX, NZ*C) at world points
        pts (P, 3) of frames rb (P); zero outside, cell centres at +0.5."""
        B, NY, NX, ZC = grid.shape
        NZ = self.c["feature_grid_z"]
        C = ZC // NZ
        if self.trilinear == "grid_sample":
            g = grid.view(B, NY, NX, NZ, C).permute(0, 4, 3, 1, 2)  # (B, C, NZ, NY, NX)
            norm = (pts - self.lo) / (self.hi - self.lo) * 2 - 1  # (x, y, z) in [-1, 1]
            out = []
            for b in range(B):  # rays come frame by frame
                m = rb == b
                s = F.grid_sample(g[b:b + 1], norm[m].view(1, 1, 1, -1, 3), mode="bilinear",
                                  padding_mode="zeros", align_corners=False)
                out.append(s.view(C, -1).t())
            return torch.cat(out)
        with torch.no_grad():
            n = torch.tensor([NX, NY, NZ])
            u = (pts - self.lo) / (self.hi - self.lo) * n - 0.5
            i0 = u.floor()
            f = u - i0
            i0 = i0.long()
            rows, weights = [], []
            for dz in (0, 1):
                for dy in (0, 1):
                    for dx in (0, 1):
                        off = torch.tensor([dx, dy, dz])
                        i = i0 + off
                        ok = ((i >= 0) & (i < n)).all(1)
                        wgt = torch.where(off.bool(), f, 1 - f).prod(1) * ok
                        i = torch.minimum(torch.clamp(i, min=0), n - 1)
                        rows.append(((rb * NY + i[:, 1]) * NX + i[:, 0]) * NZ + i[:, 2])
                        weights.append(wgt)
            rows = torch.stack(rows, 1)  # (P, 8)
            weights = torch.stack(weights, 1)
        table = grid.reshape(B * NY * NX * NZ, C)  # rows (b, y, x, z)
        corners = table.index_select(0, rows.view(-1)).view(-1, 8, C)  # backward: index_add
        return (corners * weights.unsqueeze(2)).sum(1)

    def forward(self, bt):
        c = self.c
        grid, logits, vq_loss, info = self.net(bt)
        R, S = bt.samples.shape
        pts = (bt.samples.unsqueeze(2) * bt.ray_dir.unsqueeze(1)).reshape(R * S, 3)
        feats = self.sample_features(grid, pts, bt.ray_batch.repeat_interleave(S))
        alpha = torch.sigmoid(self.alpha_mlp(feats)).view(R, S)
        trans = torch.cumprod(torch.cat([torch.ones(R, 1), 1 - alpha[:, :-1]], 1), 1)
        w = alpha * trans
        depth = (w * bt.samples).sum(1)
        l1 = F.l1_loss(depth, bt.ray_depth)
        far_from_surface = ((bt.samples - bt.ray_depth[:, None]).abs() > c["depth_eps"]).float()
        surface = (far_from_surface * w * w).sum(1).mean()
        occ = F.binary_cross_entropy_with_logits(logits, bt.occupancy)
        total = (c["depth_weight"] * l1 + c["sharpness_weight"] * surface
                 + c["occupancy_weight"] * occ + vq_loss)
        return total, {"l1": l1, "surface": surface, "occ": occ, "vq": vq_loss}, info


def warmup_cosine(peak, warmup, total, floor):
    def lr(s):
        if s < warmup:
            return peak * (s + 1) / warmup
        if s >= total:
            return floor
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
    return lr


def main():
    a = ARGS
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(a.seed)
    c = CFG
    folder = find_data(a.data)
    data = load_frames(folder)
    model = Tokenizer(c, a.seed, a.trilinear)
    model.train()
    decay = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    decay_ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in decay_ids]
    params = decay + rest
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=1e-8)
    sched = warmup_cosine(c["lr"], min(c["warmup_steps"], a.steps), a.steps, 0.1 * c["lr"])
    rng = np.random.default_rng(a.seed + 1)
    gen = torch.Generator().manual_seed(a.seed + 2)
    print(f"data:    {folder} ({len(data)} frames)")
    print(f"model:   {n_params} parameters; K={c['codebook_size']} D={c['code_dim']}, batch "
          f"{c['batch_size']}, {c['rays_per_frame']} rays/frame x {c['samples_per_ray']} samples; "
          f"torch {torch.__version__}, {a.threads} thread(s), trilinear={a.trilinear}, "
          f"malloc {MALLOC}", flush=True)

    times, totals, l1s = [], [], []
    skipped = 0
    for s in range(a.steps):
        t0 = time.perf_counter()
        frames = []
        for _ in range(c["batch_size"]):
            k = int(rng.integers(len(data)))
            frames.append(augment(data[k], rng, c["augment_yaw_deg"], c["augment_flip"]))
        bt = make_batch(frames, rng, gen)
        opt.zero_grad(set_to_none=True)
        total, parts, info = model(bt)
        total.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, c["grad_clip"]))
        for g in opt.param_groups:
            g["lr"] = sched(s)
        if math.isfinite(gnorm):
            opt.step()
        else:
            skipped += 1
        vals = {k: float(v) for k, v in parts.items()}
        tot = float(total)
        dt = time.perf_counter() - t0
        times.append(dt)
        totals.append(tot)
        l1s.append(vals["l1"])
        if s == 0 or (s + 1) % a.log_every == 0 or s + 1 == a.steps:
            print(f"step {s + 1:4d}  {dt:6.3f} s  loss {tot:8.4f}  L1 {vals['l1']:7.4f}  "
                  f"surf {vals['surface']:.4f}  occ {vals['occ']:.4f}  vq {vals['vq']:.4f}  "
                  f"|g| {gnorm:8.3f}  lr {sched(s):.2e}  ppl {info['perplexity']:6.1f}  "
                  f"use {info['usage']:3d}  win {info['window_usage']:3d}  "
                  f"repl {info['replaced']:3d}{'  [k-means init]' if info['init'] else ''}",
                  flush=True)
    if skipped:
        print(f"updates skipped (non-finite gradient norm): {skipped}")
    rest_t = times[1:]
    med = statistics.median(rest_t) if rest_t else float("nan")
    print(f"torch_tokenizer: steps={a.steps} threads={a.threads} median_step_s={med:.4f} "
          f"first_step_s={times[0]:.4f} median_all_s={statistics.median(times):.4f} "
          f"params={n_params} loss_first={totals[0]:.4f} loss_last={totals[-1]:.4f} "
          f"l1_first={l1s[0]:.4f} l1_last={l1s[-1]:.4f} trilinear={a.trilinear} "
          f"malloc={a.malloc}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
