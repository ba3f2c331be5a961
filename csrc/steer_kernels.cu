/*
 * CUDA fallback of the fused steering op  y = x + s · softmax(x Wᵀ + b) V  and of its backward; the forward
 * optionally takes a residual r and steers x ← r + x (rounded to x's dtype, as a separate add would), read from
 * both inputs as it streams them: the sum is never stored (3·N·D·elem in all, 2·N·D·elem fewer than a separate add
 * writing the sum and the step reading it back; the backward, which recomputes x from y, is the same).
 *
 * Shapes: x, y, dy, dx (N, D) rows of T ∈ {fp32, bf16, fp16}; W, V (E, D) and b (E,) in fp32 (converted at
 * the op boundary); s (1,) fp32 read on the device (no host sync); gating g (N, E) fp32. All arithmetic and
 * every accumulation is fp32.
 *
 * Cost per call: benchmarks/roofline.py is the cost model (the op's FLOPs; minimum bytes; `python -m
 * benchmarks.roofline`). Beyond that minimum the backward moves its workspace (P · (2·E·D + 16) · 4 bytes, written
 * then summed; P = backward blocks, at most 8 per SM, 2 at D = 1280, E ≤ 16) and dlogits (N·E·4 bytes).
 * At E = 8 in bf16 the op is memory-bound against HBM, but these kernels use CUDA cores (fp32
 * FMA, no tensor cores), whose issue rate on an H100 is only ~1.3× what the copy bandwidth needs at E = 8.
 * So every FMA operand lives in registers, each W/V load is reused across several rows, and lanes exchange
 * partial sums once per row.
 *
 * Forward (steer_fwd_kernel): 4 warps per block, each warp owns R consecutive rows (R = 4, 2, 1 for E ≤ 8, 16,
 * 64, halved for fp32 x: R·E logits per lane). Pass 1 streams the rows once (16-byte vectors, lane-strided,
 * coalesced), keeps the raw rows (with a residual, r + x) in shared memory when 4·R·D·elem ≤ 48 KB (otherwise
 * pass 2 re-reads x from L1/L2, or with a residual the sum pass 1 wrote into the lane's own elements of y),
 * and accumulates per-lane partial logits. One xor-butterfly reduction gives every lane all R·E
 * logits (bitwise identical in every lane), the softmax runs in registers and lane e stores g[:, e]. Pass 2
 * writes y = x + s·(g V).
 *
 * Backward (steer_bwd_kernel): a persistent grid of P blocks; block p takes row tiles p, p + P, ... of
 * tile_rows rows, so the row → block assignment depends only on N, D, E, the dtype and the SM count.
 *   phase 1, a warp per RB rows: u = dy·Vᵀ (lane partials + warp reduction), dg = s·u (+ the gradient of the
 *     returned gating, when a loss uses it), dl = g ⊙ (dg − Σ_e g·dg), stored (N, E); ds = Σ g·u accumulates in
 *     registers; g and dl go to shared memory; the lanes prefetch the tile's y into L2.
 *   phase 2, a thread per C2 columns over all rows of the tile: dx = dy + Σ_e dl_e·W_e (stored), and register
 *     partials Σ dlᵀ·y, Σ gᵀ·dy (for E > 16 the latter in a second sweep over the tile, to stay in registers),
 *     added to the block's private row of the (P, 2·E·D + 16) workspace (stored on the block's first tile).
 *     x is neither saved nor recomputed: the one reduction the Triton backward uses too
 *     (steermoe/workspace.py, the layout's one source) sums the rows in a fixed order and turns Σ dlᵀ·y into
 *     dW with an E×E correction (x = y − s·g·V). No float atomics: the weight gradients are bitwise
 *     reproducible on a given device.
 *
 * Vector accesses (16 bytes per lane in the row-streaming loops) are used when D is a multiple of 16/elem and
 * every pointer is 16-byte aligned; otherwise the same arithmetic runs on lane-strided scalars.
 */
#include "steer.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace steermoe {
namespace {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kFwdWarps = 4;
constexpr int kBwdMaxWarps = 8;
constexpr int kMinTileRows = 32;  // backward row tiles: fewer rows make the workspace traffic dominate
constexpr int kMaxTileRows = 64;
constexpr size_t kStashLimit = 48 * 1024;  // dynamic shared memory available without an opt-in

// ------------------------------------------------------------------------------------------ element access
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements per memory access: N, split into accesses of at most 16 bytes.
template <typename T, int N>
constexpr int chunk_elems() { return N * sizeof(T) <= 16 ? N : static_cast<int>(16 / sizeof(T)); }

// Loads N elements of T at p (aligned to min(N·sizeof(T), 16) bytes) as floats; keeps a raw copy at `copy`
// when it is not null.
template <int N, typename T>
__device__ __forceinline__ void load(const T* p, float (&out)[N], T* copy = nullptr) {
  constexpr int C = chunk_elems<T, N>();
#pragma unroll
  for (int i = 0; i < N; i += C) {
    const Pack<T, C> pk = *reinterpret_cast<const Pack<T, C>*>(p + i);
    if (copy != nullptr) *reinterpret_cast<Pack<T, C>*>(copy + i) = pk;
#pragma unroll
    for (int k = 0; k < C; ++k) out[i + k] = to_float(pk.v[k]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store(T* p, const float (&in)[N]);

// load<N>(p), plus the N elements at q when q is not null: their sum rounded to T (what the add r + x in T
// gives), a raw copy of which is kept at `copy` when that is not null.
template <int N, typename T>
__device__ __forceinline__ void load_sum(const T* p, const T* q, float (&out)[N], T* copy = nullptr) {
  if (q == nullptr) return load<N>(p, out, copy);
  float addend[N];
  load<N>(q, addend);
  load<N>(p, out);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(from_float<T>(addend[k] + out[k]));
  if (copy != nullptr) store<N>(copy, out);
}

template <int N, typename T>
__device__ __forceinline__ void store(T* p, const float (&in)[N]) {
  constexpr int C = chunk_elems<T, N>();
#pragma unroll
  for (int i = 0; i < N; i += C) {
    Pack<T, C> pk;
#pragma unroll
    for (int k = 0; k < C; ++k) pk.v[k] = from_float<T>(in[i + k]);
    *reinterpret_cast<Pack<T, C>*>(p + i) = pk;
  }
}

template <int N>
__device__ __forceinline__ void fill(float (&a)[N], float value) {
#pragma unroll
  for (int k = 0; k < N; ++k) a[k] = value;
}

__device__ __forceinline__ float component(const float4& q, int i) {
  return i == 0 ? q.x : i == 1 ? q.y : i == 2 ? q.z : q.w;
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Sums a[r][j] (j < e) over the 32 lanes; every lane ends with the same bits (each step adds the same two
// operands in every lane of a pair, and float addition is commutative).
template <int R, int E_MAX>
__device__ __forceinline__ void warp_allreduce(float (&a)[R][E_MAX], int e) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int j = 0; j < E_MAX; ++j) {
        if (j < e) a[r][j] += __shfl_xor_sync(kFullMask, a[r][j], offset);
      }
    }
  }
}

// acc[r][j] += Σ_k a[r·d + col + k] · m[j·d + col + k] for the warp's rows r < rows, experts j < e and N
// columns from col, with a ← a + addend (load_sum) when addend is not null: the partial logits x·Wᵀ (keeping a raw
// copy of x at `kept`) or u = dy·Vᵀ (prefetching the rows of y at `next` into L2, one 16-byte vector in 8, i.e.
// once per 128-byte line).
template <int N, int R, int E_MAX, typename T>
__device__ __forceinline__ void dot_step(const T* __restrict__ a, const T* __restrict__ addend,
                                         const float* __restrict__ m, int d, int e, int rows, int col,
                                         float (&acc)[R][E_MAX], T* kept, const T* next) {
  float av[R][N];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t off = static_cast<int64_t>(r) * d + col;
    if (r < rows) {
      load_sum<N>(a + off, addend != nullptr ? addend + off : nullptr, av[r], kept != nullptr ? kept + off : nullptr);
      if (next != nullptr && N * sizeof(T) == 16 && (col / N) % 8 == 0) prefetch_l2(next + off);
    } else {
      fill(av[r], 0.f);
    }
  }
#pragma unroll
  for (int j = 0; j < E_MAX; ++j) {
    if (j < e) {
      float mv[N];
      load<N>(m + static_cast<int64_t>(j) * d + col, mv);
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int k = 0; k < N; ++k) acc[r][j] = fmaf(av[r][k], mv[k], acc[r][j]);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------ forward
template <typename T, int E_MAX>
struct FwdShape {
  // rows per warp: R·E_MAX logits and R·16 bytes of x per lane in registers
  static constexpr int R = std::max(1, (E_MAX <= 8 ? 4 : E_MAX <= 16 ? 2 : 1) / (sizeof(T) == 4 ? 2 : 1));
  static constexpr int MIN_BLOCKS = E_MAX <= 16 ? 4 : 0;  // __launch_bounds__ hint (0: none); ptxas spills nothing
};

// y = x + s·(g V) for the warp's rows over N columns starting at col. `xr` is generic: shared or global, and
// may be yr itself (each element is read before it is overwritten, by the same lane).
template <int N, int R, int E_MAX, typename T>
__device__ __forceinline__ void fwd_output_step(const T* xr, T* yr,
                                                const float* __restrict__ v, int d, int e, int rows, int col,
                                                const float (&g)[R][E_MAX], float s) {
  float mix[R][N];
#pragma unroll
  for (int r = 0; r < R; ++r) fill(mix[r], 0.f);
#pragma unroll
  for (int j = 0; j < E_MAX; ++j) {
    if (j < e) {
      float vv[N];
      load<N>(v + static_cast<int64_t>(j) * d + col, vv);
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int k = 0; k < N; ++k) mix[r][k] = fmaf(g[r][j], vv[k], mix[r][k]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < rows) {
      const int64_t off = static_cast<int64_t>(r) * d + col;
      float out[N];
      load<N>(xr + off, out);
#pragma unroll
      for (int k = 0; k < N; ++k) out[k] = fmaf(s, mix[r][k], out[k]);
      store<N>(yr + off, out);
    }
  }
}

// Logits (+ bias) → softmax over the e real experts, in place; the padding experts get 0.
template <int R, int E_MAX>
__device__ __forceinline__ void softmax_rows(float (&a)[R][E_MAX], const float* __restrict__ bias, int e) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float top = -INFINITY;
#pragma unroll
    for (int j = 0; j < E_MAX; ++j) {
      if (j < e) {
        if (bias != nullptr) a[r][j] += bias[j];
        top = fmaxf(top, a[r][j]);
      }
    }
    float total = 0.f;
#pragma unroll
    for (int j = 0; j < E_MAX; ++j) {
      a[r][j] = j < e ? expf(a[r][j] - top) : 0.f;
      total += a[r][j];
    }
    const float inv = 1.f / total;
#pragma unroll
    for (int j = 0; j < E_MAX; ++j) a[r][j] *= inv;
  }
}

// RESIDUAL: a separate instantiation, so the plain step's code and registers do not depend on the fused add.
template <typename T, int E_MAX, bool RESIDUAL>
__global__ void __launch_bounds__(kFwdWarps * kWarp, FwdShape<T, E_MAX>::MIN_BLOCKS)
    steer_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual, const float* __restrict__ w,
                     const float* __restrict__ bias,
                     const float* __restrict__ v, const float* __restrict__ scale, T* __restrict__ y,
                     float* __restrict__ gating, int64_t n, int d, int e, bool vectorized, bool stash) {
  constexpr int R = FwdShape<T, E_MAX>::R;
  constexpr int VEC = 16 / sizeof(T);
  extern __shared__ float4 smem[];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kFwdWarps + warp) * R;
  if (row0 >= n) return;  // whole warps only; the forward has no block-wide barrier
  const int rows = static_cast<int>(min(static_cast<int64_t>(R), n - row0));
  const T* xr = x + row0 * d;
  const T* rr = RESIDUAL ? residual + row0 * d : nullptr;
  T* yr = y + row0 * d;
  // Pass 1 keeps its rows (with the residual added) for pass 2: in shared memory, or, for a residual without
  // room there, in the lane's own elements of y (pass 2 then reads one row instead of two, and ptxas need
  // not hold two inputs' loads in flight: reading x and r again there spilled at E_MAX = 64 in 16-bit types).
  T* kept = stash ? reinterpret_cast<T*>(smem) + static_cast<int64_t>(warp) * R * d : RESIDUAL ? yr : nullptr;
  const int nvec = vectorized ? d / VEC : 0;

  float acc[R][E_MAX];
#pragma unroll
  for (int r = 0; r < R; ++r) fill(acc[r], 0.f);
  const T* no_prefetch = nullptr;
  for (int c = lane; c < nvec; c += kWarp) dot_step<VEC>(xr, rr, w, d, e, rows, c * VEC, acc, kept, no_prefetch);
  for (int col = nvec * VEC + lane; col < d; col += kWarp) {
    dot_step<1>(xr, rr, w, d, e, rows, col, acc, kept, no_prefetch);
  }
  warp_allreduce(acc, e);
  softmax_rows(acc, bias, e);

  if (gating != nullptr) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int j = 0; j < E_MAX; ++j) {
        if (r < rows && j < e && j % kWarp == lane) gating[(row0 + r) * e + j] = acc[r][j];
      }
    }
  }

  const float s = *scale;
  const T* src = kept != nullptr ? kept : xr;  // each lane re-reads exactly the elements it kept
  for (int c = lane; c < nvec; c += kWarp) {
    fwd_output_step<VEC>(src, yr, v, d, e, rows, c * VEC, acc, s);
  }
  for (int col = nvec * VEC + lane; col < d; col += kWarp) {
    fwd_output_step<1>(src, yr, v, d, e, rows, col, acc, s);
  }
}

// ------------------------------------------------------------------------------------------ backward
template <int E_MAX>
struct BwdShape {
  static constexpr int RB = E_MAX <= 8 ? 4 : E_MAX <= 16 ? 2 : 1;  // phase-1 rows per warp step
  static constexpr int C2 = E_MAX <= 8 ? 4 : E_MAX <= 16 ? 2 : 1;  // phase-2 columns per thread
  static constexpr int RG = 2;                                       // phase-2 rows per step
  static constexpr bool SPLIT_DV = E_MAX > 16;                      // dV in its own pass (registers)
  static constexpr int MIN_BLOCKS = E_MAX <= 16 ? 2 : 1;           // resident blocks of 8 warps per SM
};

template <typename T>
struct BwdArgs {
  const T* dy;
  const T* y;
  const float* gating;
  const float* grad_gating;  // (N, E) or null
  const float* w;
  const float* v;
  const float* scale;
  T* dx;
  float* dlogits;       // (N, E)
  float* part;          // (P, part_stride): [Σ dl·y (E·D) | Σ g·dy (E·D) | Σ g·u | pad] per block
  int64_t part_stride;  // floats per row (steermoe/workspace.py); a multiple of 4 when vectorized
  int64_t n;
  int d;
  int e;
  int tile_rows;
  bool vectorized;
};

// Calls f(j, c) for each expert j < e, with c[r] = table[r0 + r][j] from the tile's (tile_rows, E_MAX) shared
// table (g or dl), 0 past tile_len. The table is read 4 experts at a time.
template <int RG, int E_MAX, typename F>
__device__ __forceinline__ void for_each_expert(const float* table, int r0, int tile_len, int e, F&& f) {
#pragma unroll
  for (int j0 = 0; j0 < E_MAX; j0 += 4) {
    if (j0 < e) {
      float4 quad[RG];
#pragma unroll
      for (int r = 0; r < RG; ++r) {
        quad[r] = r0 + r < tile_len ? reinterpret_cast<const float4*>(table + (r0 + r) * E_MAX)[j0 / 4]
                                    : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (j0 + q < e) {
          float c[RG];
#pragma unroll
          for (int r = 0; r < RG; ++r) c[r] = component(quad[r], q);
          f(j0 + q, c);
        }
      }
    }
  }
}

// Adds acc[j] (j < e) to the workspace rows p + j·d at col; stores instead on the block's first tile.
template <int N, int E_MAX>
__device__ __forceinline__ void flush_partials(float* p, float (&acc)[E_MAX][N], int d, int e, int col, bool first) {
#pragma unroll
  for (int j = 0; j < E_MAX; ++j) {
    if (j < e) {
      float* pj = p + static_cast<int64_t>(j) * d + col;
      if (!first) {
        float old[N];
        load<N>(pj, old);
#pragma unroll
        for (int k = 0; k < N; ++k) acc[j][k] += old[k];
      }
      store<N>(pj, acc[j]);
    }
  }
}

// Phase 2 for N columns starting at col over the tile's rows: dx, and the tile's partials Σ dl·y (and, WITH_DV,
// Σ g·dy) added to the block's workspace slices pw (and pv). y stands in for x: the E×E correction of the
// reduction makes Σ dl·y the dW of x = y − s·g·V, so x is never recomputed and V is not read here.
template <int N, int RG, int E_MAX, bool WITH_DV, typename T>
__device__ __forceinline__ void bwd_dx_step(const BwdArgs<T>& a, int64_t t0, int tile_len, int col,
                                            const float* s_g, const float* s_dl, float* pw, float* pv,
                                            bool first) {
  const int d = a.d;
  const int e = a.e;
  float aw[E_MAX][N];
  float av[WITH_DV ? E_MAX : 1][N];
#pragma unroll
  for (int j = 0; j < E_MAX; ++j) fill(aw[j], 0.f);
#pragma unroll
  for (int j = 0; j < (WITH_DV ? E_MAX : 1); ++j) fill(av[j], 0.f);
  for (int r0 = 0; r0 < tile_len; r0 += RG) {
    float yv[RG][N];
    float dyv[RG][N];  // dy, then dx
#pragma unroll
    for (int r = 0; r < RG; ++r) {
      if (r0 + r < tile_len) {
        const int64_t off = (t0 + r0 + r) * d + col;
        load<N>(a.y + off, yv[r]);
        load<N>(a.dy + off, dyv[r]);
      } else {
        fill(yv[r], 0.f);
        fill(dyv[r], 0.f);
      }
    }
    if constexpr (WITH_DV) {  // Σ g_e dy
      for_each_expert<RG, E_MAX>(s_g, r0, tile_len, e, [&](int j, const float (&c)[RG]) {
#pragma unroll
        for (int r = 0; r < RG; ++r) {
#pragma unroll
          for (int k = 0; k < N; ++k) av[j][k] = fmaf(c[r], dyv[r][k], av[j][k]);
        }
      });
    }
    // dx = dy + Σ_e dl_e W_e;  Σ dl_e y
    for_each_expert<RG, E_MAX>(s_dl, r0, tile_len, e, [&](int j, const float (&c)[RG]) {
      float wv[N];
      load<N>(a.w + static_cast<int64_t>(j) * d + col, wv);
#pragma unroll
      for (int r = 0; r < RG; ++r) {
#pragma unroll
        for (int k = 0; k < N; ++k) {
          dyv[r][k] = fmaf(c[r], wv[k], dyv[r][k]);
          aw[j][k] = fmaf(c[r], yv[r][k], aw[j][k]);
        }
      }
    });
#pragma unroll
    for (int r = 0; r < RG; ++r) {
      if (r0 + r < tile_len) store<N>(a.dx + (t0 + r0 + r) * d + col, dyv[r]);
    }
  }
  flush_partials(pw, aw, d, e, col, first);
  if constexpr (WITH_DV) flush_partials(pv, av, d, e, col, first);
}

// Phase 2, separate pass for many experts: the tile's partial Σ_rows g dy added to pv.
template <int N, int RG, int E_MAX, typename T>
__device__ __forceinline__ void bwd_dv_step(const BwdArgs<T>& a, int64_t t0, int tile_len, int col,
                                            const float* s_g, float* pv, bool first) {
  const int d = a.d;
  const int e = a.e;
  float av[E_MAX][N];
#pragma unroll
  for (int j = 0; j < E_MAX; ++j) fill(av[j], 0.f);
  for (int r0 = 0; r0 < tile_len; r0 += RG) {
    float dyv[RG][N];
#pragma unroll
    for (int r = 0; r < RG; ++r) {
      if (r0 + r < tile_len) {
        load<N>(a.dy + (t0 + r0 + r) * d + col, dyv[r]);
      } else {
        fill(dyv[r], 0.f);
      }
    }
    for_each_expert<RG, E_MAX>(s_g, r0, tile_len, e, [&](int j, const float (&c)[RG]) {
#pragma unroll
      for (int r = 0; r < RG; ++r) {
#pragma unroll
        for (int k = 0; k < N; ++k) av[j][k] = fmaf(c[r], dyv[r][k], av[j][k]);
      }
    });
  }
  flush_partials(pv, av, d, e, col, first);
}

// Phase 2 for the columns [col, col + N) of one tile.
template <int N, int E_MAX, typename T>
__device__ __forceinline__ void bwd_column_step(const BwdArgs<T>& a, int64_t t0, int tile_len, int col,
                                                const float* s_g, const float* s_dl, float* pw, float* pv,
                                                bool first) {
  using S = BwdShape<E_MAX>;
  bwd_dx_step<N, S::RG, E_MAX, !S::SPLIT_DV>(a, t0, tile_len, col, s_g, s_dl, pw, pv, first);
  if constexpr (S::SPLIT_DV) bwd_dv_step<N, S::RG, E_MAX>(a, t0, tile_len, col, s_g, pv, first);
}

template <typename T, int E_MAX>
__global__ void __launch_bounds__(kBwdMaxWarps * kWarp, BwdShape<E_MAX>::MIN_BLOCKS)
    steer_bwd_kernel(const BwdArgs<T> a) {
  using S = BwdShape<E_MAX>;
  constexpr int VEC = 16 / sizeof(T);
  extern __shared__ float4 smem[];
  float* s_g = reinterpret_cast<float*>(smem);  // (tile_rows, E_MAX): g
  float* s_dl = s_g + a.tile_rows * E_MAX;       // (tile_rows, E_MAX): dlogits
  float* s_ds = s_dl + a.tile_rows * E_MAX;      // (warps,): ds of each warp's rows
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const int d = a.d;
  const int e = a.e;
  const int nvec1 = a.vectorized ? d / VEC : 0;
  const int nvec2 = a.vectorized ? d / S::C2 : 0;
  const float s = *a.scale;
  float* pw = a.part + blockIdx.x * a.part_stride;
  float* pv = pw + static_cast<int64_t>(e) * d;

  float ds = 0.f;  // lane-uniform
  const int64_t tiles = (a.n + a.tile_rows - 1) / a.tile_rows;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const bool first = tile == blockIdx.x;
    const int64_t t0 = tile * a.tile_rows;
    const int tile_len = static_cast<int>(min(static_cast<int64_t>(a.tile_rows), a.n - t0));

    // phase 1: a warp per RB rows
    for (int r0 = warp * S::RB; r0 < tile_len; r0 += warps * S::RB) {
      const int rows = min(S::RB, tile_len - r0);
      const T* dyr = a.dy + (t0 + r0) * d;
      const T* yr = a.y + (t0 + r0) * d;
      float u[S::RB][E_MAX];
#pragma unroll
      for (int r = 0; r < S::RB; ++r) fill(u[r], 0.f);
      T* no_copy = nullptr;
      const T* no_addend = nullptr;
      for (int c = lane; c < nvec1; c += kWarp) {
        dot_step<VEC>(dyr, no_addend, a.v, d, e, rows, c * VEC, u, no_copy, yr);
      }
      for (int col = nvec1 * VEC + lane; col < d; col += kWarp) {
        dot_step<1>(dyr, no_addend, a.v, d, e, rows, col, u, no_copy, yr);
      }
      warp_allreduce(u, e);
#pragma unroll
      for (int r = 0; r < S::RB; ++r) {
        if (r < rows) {
          const int64_t row = t0 + r0 + r;
          const float* gr = a.gating + row * e;
          const float* ggr = a.grad_gating != nullptr ? a.grad_gating + row * e : nullptr;
          float gdg = 0.f;  // Σ_e g·dg
#pragma unroll
          for (int j = 0; j < E_MAX; ++j) {
            if (j < e) {
              const float g = gr[j];
              ds = fmaf(g, u[r][j], ds);
              u[r][j] = s * u[r][j] + (ggr != nullptr ? ggr[j] : 0.f);  // dg = s·u (+ the gating's gradient)
              gdg = fmaf(g, u[r][j], gdg);
            }
          }
#pragma unroll
          for (int j = 0; j < E_MAX; ++j) {
            if (j % kWarp == lane) {
              const float g = j < e ? gr[j] : 0.f;
              const float dl = g * (u[r][j] - gdg);
              s_g[(r0 + r) * E_MAX + j] = g;
              s_dl[(r0 + r) * E_MAX + j] = dl;
              if (j < e) a.dlogits[row * e + j] = dl;
            }
          }
        }
      }
    }
    __syncthreads();

    // phase 2: a thread per C2 columns
    for (int c = threadIdx.x; c < nvec2; c += blockDim.x) {
      bwd_column_step<S::C2, E_MAX>(a, t0, tile_len, c * S::C2, s_g, s_dl, pw, pv, first);
    }
    for (int col = nvec2 * S::C2 + threadIdx.x; col < d; col += blockDim.x) {
      bwd_column_step<1, E_MAX>(a, t0, tile_len, col, s_g, s_dl, pw, pv, first);
    }
    __syncthreads();  // shared memory is rewritten by the next tile
  }

  // ds of the block: warp partials summed in warp order
  if (lane == 0) s_ds[warp] = ds;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += s_ds[w];
    pv[static_cast<int64_t>(e) * d] = total;  // at 2·E·D
  }
}

// ------------------------------------------------------------------------------------------ launch
template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(Tag<float>{});
    case at::kBFloat16:
      return f(Tag<__nv_bfloat16>{});
    case at::kHalf:
      return f(Tag<__half>{});
    default:
      TORCH_CHECK(false, "steermoe CUDA kernels take float32, bfloat16 or float16 activations, got ", dtype);
  }
}

template <typename F>
void dispatch_experts(int64_t e, F&& f) {
  TORCH_CHECK(e >= 1 && e <= 64, "steermoe CUDA kernels support 1..64 experts, got ", e);
  if (e <= 8) return f(std::integral_constant<int, 8>{});
  if (e <= 16) return f(std::integral_constant<int, 16>{});
  if (e <= 32) return f(std::integral_constant<int, 32>{});
  return f(std::integral_constant<int, 64>{});
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

int sm_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return count;
}

template <typename T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<T*>(t.data_ptr()) : nullptr;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void launch_steer_forward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const at::Tensor& v,
                          const at::Tensor& scale, const at::Tensor& y, const at::Tensor& gating,
                          const at::Tensor& residual) {
  const int64_t n = x.size(0);
  const int d = static_cast<int>(x.size(1));
  const int e = static_cast<int>(w.size(0));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int VEC = 16 / sizeof(T);
    const bool vectorized = d % VEC == 0 && aligned16(x) && aligned16(y) && aligned16(w) && aligned16(v) &&
                            (!residual.defined() || aligned16(residual));
    dispatch_experts(e, [&](auto experts) {
      constexpr int E_MAX = decltype(experts)::value;
      constexpr int R = FwdShape<T, E_MAX>::R;
      const size_t stash_bytes = static_cast<size_t>(kFwdWarps) * R * d * sizeof(T);
      const bool stash = stash_bytes <= kStashLimit;
      const int64_t blocks = ceil_div(n, kFwdWarps * R);
      auto kernel = residual.defined() ? steer_fwd_kernel<T, E_MAX, true> : steer_fwd_kernel<T, E_MAX, false>;
      kernel<<<static_cast<unsigned>(blocks), kFwdWarps * kWarp, stash ? stash_bytes : 0, stream>>>(
          ptr<const T>(x), ptr<const T>(residual), ptr<const float>(w), ptr<const float>(bias), ptr<const float>(v),
          ptr<const float>(scale), ptr<T>(y), ptr<float>(gating), n, d, e, vectorized, stash);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor launch_steer_backward(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& gating,
                                 const at::Tensor& grad_gating, const at::Tensor& w, const at::Tensor& v,
                                 const at::Tensor& scale, const at::Tensor& dx, const at::Tensor& dlogits,
                                 int64_t workspace_row) {
  const int64_t n = y.size(0);
  const int d = static_cast<int>(y.size(1));
  const int e = static_cast<int>(w.size(0));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(y);
  at::Tensor part;
  dispatch_dtype(y.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int VEC = 16 / sizeof(T);
    const bool vectorized = d % VEC == 0 && aligned16(dy) && aligned16(y) && aligned16(dx) && aligned16(w) &&
                            aligned16(v) && workspace_row % 4 == 0;  // workspace rows 16-byte aligned
    dispatch_experts(e, [&](auto experts) {
      constexpr int E_MAX = decltype(experts)::value;
      using S = BwdShape<E_MAX>;
      // Block width: just enough warps to cover the phase-2 columns in equal sweeps.
      const int64_t items = std::max<int64_t>(1, ceil_div(d, S::C2));
      const int64_t sweeps = ceil_div(items, kBwdMaxWarps * kWarp);
      const int warps = static_cast<int>(std::min<int64_t>(kBwdMaxWarps, ceil_div(ceil_div(items, sweeps), kWarp)));
      // Grid: about 8·MIN_BLOCKS resident warps per SM, each block with its own workspace slice. Tiles of
      // kMinTileRows..kMaxTileRows rows, sized so that every block gets the same number of tiles (± 1).
      const int64_t max_blocks = static_cast<int64_t>(sms) * std::max(S::MIN_BLOCKS, kBwdMaxWarps / warps);
      const int64_t rounds = ceil_div(n, max_blocks * kMaxTileRows);
      const int tile_rows = static_cast<int>(
          std::clamp<int64_t>(ceil_div(ceil_div(n, rounds * max_blocks), 4) * 4, kMinTileRows, kMaxTileRows));
      const int64_t blocks = std::min(ceil_div(n, tile_rows), max_blocks);
      part = at::empty({blocks, workspace_row}, y.options().dtype(at::kFloat));
      const size_t smem = (2 * static_cast<size_t>(tile_rows) * E_MAX + warps) * sizeof(float);

      BwdArgs<T> args{ptr<const T>(dy), ptr<const T>(y), ptr<const float>(gating), ptr<const float>(grad_gating),
                      ptr<const float>(w), ptr<const float>(v), ptr<const float>(scale), ptr<T>(dx),
                      ptr<float>(dlogits), ptr<float>(part), workspace_row, n, d, e, tile_rows, vectorized};
      steer_bwd_kernel<T, E_MAX><<<static_cast<unsigned>(blocks), warps * kWarp, smem, stream>>>(args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return part;
}

}  // namespace steermoe
