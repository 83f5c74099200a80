// CPU matrix-vector kernels for decode steps (AVX-512F, or AVX2 + FMA), built on first use by
// build.py, called through kernels.py.
//
// A decode step reads every weight once, so its speed is the rate at which weights stream from
// memory. Row-major weights read one row at a time keep only a few streams in flight per core;
// storing them in small row blocks makes each thread's reads one sequential stream, which the
// hardware prefetcher (helped by explicit prefetches) follows at close to the memory's rate.
//
// Layouts (layout.py makes them with a reshape/transpose, so they are dtype-agnostic there):
//   int8 (N, K): blocks of 8 rows; a block holds K/64 chunks, each 8 rows x 64 values in a row.
//   bf16 (N, K): blocks of 4 rows; a block holds K/32 chunks, each 4 rows x 32 values in a row.
// A chunk is 512 or 256 contiguous bytes; a block is 8K bytes in both (8 x K int8, 4 x K bf16).
//   int4 (N, K): blocks of 64 rows; a block holds K/8 chunks of 64 dwords, dword r holding row r's
//   8 values for the chunk's 8 columns (column t in bits 4t..4t+3). 256 bytes a chunk, 32K a block.
//   (q4_pack / q4_unpack convert from / to the layout of torch's _convert_weight_to_int4pack_for_cpu.)
//   Its scales and zeros (K/G, N, 2) are stored block by block too, (N/64, K/G, 64, 2), so that
//   they stream alongside (read in torch's order they were a cache miss per group: 1.6x slower).
//
// y (M, N) fp32 = x (M, K) fp32 @ W^T, times scale[n] if given, plus bias[n] if given. Products of
// int8 or bf16 values with fp32 are exact in fp32 (before the add); sums are in fp32. Products of
// a few to a few hundred rows (batches, prefill) read each block once and reuse it from cache.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"  // v16 and its helpers: the only code that differs between AVX-512 and AVX2

// Rows of x (`bytes` each) in a panel of about 1 MB, a multiple of mr: products of many rows run
// panel by panel, so that x stays in L2 while every weight block passes by (measured: 257 fp32 rows
// of 2560 fell out of a 2 MB L2, and the rate fell by a third)
static inline int64_t panel(int64_t bytes, int mr) {
  int64_t p = ((int64_t)1 << 20) / bytes / mr * mr;
  return p > mr ? p : mr;
}
#define AHEAD 4096  // bytes to prefetch ahead of the chunk being read (into L2: measured a little faster than L1)

static inline void pf(const void* p, int lines) {
  for (int i = 0; i < lines; ++i) _mm_prefetch((const char*)p + AHEAD + 64 * i, _MM_HINT_T1);
}

static inline float finish(vacc a, const float* scale, const float* bias, int64_t n) {
  float v = acc_sum(a);
  if (scale) v *= scale[n];
  if (bias) v += bias[n];
  return v;
}

// One block of 8 int8 rows against one x row. Inlined with prefetch constant, so the decode-step
// loop has no branch inside (measurably faster than one function that also takes row pairs).
static inline void q8_row(const int8_t* b, int64_t K, const float* x, int prefetch,
                          float* y, const float* scale, const float* bias, int64_t n0) {
  vacc a[8];
  for (int r = 0; r < 8; ++r) a[r] = acc_zero();
  for (int64_t k = 0; k < K; k += 64) {
    const int8_t* c = b + k * 8;
    if (prefetch) pf(c, 8);
    for (int j = 0; j < 64; j += 16) {
      v16 u = v_load(x + k + j);
      for (int r = 0; r < 8; ++r) a[r] = acc_fmadd(v_i8(c + r * 64 + j), u, a[r]);
    }
  }
  for (int r = 0; r < 8; ++r) y[n0 + r] = finish(a[r], scale, bias, n0 + r);
}

// The same block against two x rows: each weight is converted once for both.
static inline void q8_pair(const int8_t* b, int64_t K, const float* x0, const float* x1, int prefetch,
                           float* y0, float* y1, const float* scale, const float* bias, int64_t n0) {
  vacc a0[8], a1[8];
  for (int r = 0; r < 8; ++r) a0[r] = a1[r] = acc_zero();
  for (int64_t k = 0; k < K; k += 64) {
    const int8_t* c = b + k * 8;
    if (prefetch) pf(c, 8);
    for (int j = 0; j < 64; j += 16) {
      v16 u0 = v_load(x0 + k + j), u1 = v_load(x1 + k + j);
      for (int r = 0; r < 8; ++r) {
        v16 w = v_i8(c + r * 64 + j);
        a0[r] = acc_fmadd(w, u0, a0[r]);
        a1[r] = acc_fmadd(w, u1, a1[r]);
      }
    }
  }
  for (int r = 0; r < 8; ++r) {
    y0[n0 + r] = finish(a0[r], scale, bias, n0 + r);
    y1[n0 + r] = finish(a1[r], scale, bias, n0 + r);
  }
}
void q8_mm(const int8_t* w, int64_t N, int64_t K, const float* x, int64_t M,
           const float* scale, const float* bias, float* y, int nt) {
  if (M == 1) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += 8) q8_row(w + n0 * K, K, x, 1, y, scale, bias, n0);
    return;
  }
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t n0 = 0; n0 < N; n0 += 8) {
    const int8_t* b = w + n0 * K;
    // the first pass streams the block from memory; later rows find it in L1/L2
    int64_t m = 0;
    for (; m + 1 < M; m += 2) q8_pair(b, K, x + m * K, x + (m + 1) * K, m == 0, y + m * N, y + (m + 1) * N, scale, bias, n0);
    if (m < M) q8_row(b, K, x + m * K, 0, y + m * N, scale, bias, n0);
  }
}

// bf16: blocks of 4 rows; accumulators [2r] and [2r+1] hold row r's two 16-wide halves of a chunk.
static inline void bf16_row(const uint16_t* b, int64_t K, const float* x, int prefetch,
                            float* y, const float* bias, int64_t n0) {
  vacc a[8];
  for (int r = 0; r < 8; ++r) a[r] = acc_zero();
  for (int64_t k = 0; k < K; k += 32) {
    const uint16_t* c = b + k * 4;
    if (prefetch) pf(c, 4);
    v16 u = v_load(x + k), uh = v_load(x + k + 16);
    for (int r = 0; r < 4; ++r) {
      a[2 * r] = acc_fmadd(v_bf16(c + r * 32), u, a[2 * r]);
      a[2 * r + 1] = acc_fmadd(v_bf16(c + r * 32 + 16), uh, a[2 * r + 1]);
    }
  }
  for (int r = 0; r < 4; ++r) y[n0 + r] = finish(acc_add(a[2 * r], a[2 * r + 1]), 0, bias, n0 + r);
}

// The same block against mr x rows (<= FMA_MR): each weight is converted once for all of them, by
// one op per 16 values (a chunk row's 32 bf16 read as 16 dwords give the values at even places by
// a shift, those at odd places by a mask). x: bf16 split the same way (xb = 1; half the bytes of
// fp32, so 4 rows and the block stay in L1), or fp32 reordered to match (xb = 0). FMA_SPLIT
// accumulators per (x row, weight row): AVX2's 16 registers take 2 x rows with even and odd
// places apart; AVX-512's 32 take 4 x rows with both in one (16 accumulators: chains enough).
// On the AVX-512 VM: 1.2-1.9x the rate of the pairs of rows with widening conversions it replaced.
static inline __attribute__((always_inline)) void bf16_tile(const uint16_t* b, int64_t K, const void* x, int xb, int mr,
                                                            int prefetch, float* y, int64_t N, const float* bias, int64_t n0) {
  vacc a[FMA_MR][4 * FMA_SPLIT];
  for (int m = 0; m < mr; ++m)
    for (int r = 0; r < 4 * FMA_SPLIT; ++r) a[m][r] = acc_zero();
  for (int64_t k = 0; k < K; k += 32) {
    const uint16_t* c = b + k * 4;
    if (prefetch) pf(c, 4);
    v16 u[FMA_MR], uh[FMA_MR];
    for (int m = 0; m < mr; ++m) {
      const uint16_t* xm = (const uint16_t*)x + m * K + k;
      const float* xf = (const float*)x + m * K + k;
      u[m] = xb ? v_bf16_even(xm) : v_load(xf);
      uh[m] = xb ? v_bf16_odd(xm) : v_load(xf + 16);
    }
    for (int r = 0; r < 4; ++r) {
      v16 w = v_bf16_even(c + r * 32), wh = v_bf16_odd(c + r * 32);
      for (int m = 0; m < mr; ++m) {
        vacc* p = &a[m][FMA_SPLIT * r];
        p[0] = acc_fmadd(w, u[m], p[0]);
        p[FMA_SPLIT - 1] = acc_fmadd(wh, uh[m], p[FMA_SPLIT - 1]);
      }
    }
  }
  for (int m = 0; m < mr; ++m)
    for (int r = 0; r < 4; ++r)
      y[m * N + n0 + r] = finish(FMA_SPLIT == 2 ? acc_add(a[m][2 * r], a[m][2 * r + 1]) : a[m][r], 0, bias, n0 + r);
}

// x (M, K) fp32 (xb = 0) or bf16 (xb = 1)
static inline __attribute__((always_inline)) void bf16_mm_any(const uint16_t* w, int64_t N, int64_t K, const void* x, int xb,
                                                              int64_t M, const float* bias, float* y, int nt) {
  int64_t xs = xb ? 2 : 4;  // bytes of an x value
  const char* xr = (const char*)x;
  float* xp = 0;
  if (!xb) {  // fp32 x with each chunk's 32 values reordered, even places then odd ones
    const float* xf = (const float*)x;
    xp = (float*)malloc(M * K * sizeof(float));
    for (int64_t i = 0; i < M * K; i += 32)
      for (int j = 0; j < 16; ++j) {
        xp[i + j] = xf[i + 2 * j];
        xp[i + 16 + j] = xf[i + 2 * j + 1];
      }
    xr = (const char*)xp;
  }
  for (int64_t m0 = 0; m0 < M; m0 += panel(K * xs, FMA_MR)) {  // x rows a panel that stays in L2
    int64_t M1 = m0 + panel(K * xs, FMA_MR) < M ? m0 + panel(K * xs, FMA_MR) : M;
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
      const uint16_t* b = w + n0 * K;
      // the first tile streams the block from memory; later ones find it in L1/L2
      int64_t m = m0;
      for (; m + FMA_MR <= M1; m += FMA_MR) bf16_tile(b, K, xr + m * K * xs, xb, FMA_MR, m == m0, y + m * N, N, bias, n0);
      for (int t = FMA_MR - 1; t > 0; --t)
        if (M1 - m == t) bf16_tile(b, K, xr + m * K * xs, xb, t, m == m0, y + m * N, N, bias, n0);
    }
  }
  free(xp);
}

void bf16_mm(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t M,
             const float* bias, float* y, int nt) {
  if (M == 1) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += 4) bf16_row(w + n0 * K, K, x, 1, y, bias, n0);
    return;
  }
  bf16_mm_any(w, N, K, x, 0, M, bias, y, nt);
}

// Packed weights -> row-major fp32 (N, K), for products with many rows (prefill, batches), which
// run as fp32 GEMMs.
void q8_unpack_f32(const int8_t* w, int64_t N, int64_t K, float* out, int nt) {
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t n0 = 0; n0 < N; n0 += 8)
    for (int64_t k = 0; k < K; k += 64)
      for (int r = 0; r < 8; ++r)
        for (int j = 0; j < 64; j += 16)
          v_store(out + (n0 + r) * K + k + j, v_i8(w + n0 * K + k * 8 + r * 64 + j));
}

void bf16_unpack_f32(const uint16_t* w, int64_t N, int64_t K, float* out, int nt) {
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t n0 = 0; n0 < N; n0 += 4)
    for (int64_t k = 0; k < K; k += 32)
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < 32; j += 16)
          v_store(out + (n0 + r) * K + k + j, v_bf16(w + n0 * K + k * 4 + r * 32 + j));
}

// The same products for bf16 activations in and out (a bf16 model's decode step): converting here
// saves two torch ops per layer call. fp32 inside; the result is rounded to nearest-even once.

static float* bf16_to_f32(const uint16_t* x, int64_t n) {
  float* f = (float*)malloc(n * sizeof(float));
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = (uint32_t)x[i] << 16;
    memcpy(f + i, &u, 4);
  }
  return f;
}

static void f32_to_bf16(const float* f, int64_t n, uint16_t* y) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    memcpy(&u, f + i, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) y[i] = (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    else y[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

void q8_mm_bf16(const int8_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M,
                const float* scale, const float* bias, uint16_t* y, int nt) {
  float* xf = bf16_to_f32(x, M * K);
  float* yf = (float*)malloc(M * N * sizeof(float));
  q8_mm(w, N, K, xf, M, scale, bias, yf, nt);
  f32_to_bf16(yf, M * N, y);
  free(xf);
  free(yf);
}

#ifdef __AVX512BF16__
// bf16 x against bf16 weights by VDPBF16PS: 32 bf16 pairs an instruction, each lane adding its two
// (exact) products to fp32, so a chunk row (32 bf16: one register) is used as stored. It flushes
// denormals, far below any weight or activation. A tile: DOT_MR x rows x the 4 rows of a block (16
// accumulators, 8 loads for 16 instructions). Whether it beats bf16_mm_bf16 depends on the CPU
// (dispatch `bf16.dot`): on the Xeon VM with AVX512_BF16 (no AMX), VDPBF16PS issued once per ~0.8
// ns (82 GFLOP/s a core, fp32 FMA 175), and the FMA kernel was faster.
#define DOT_MR 4

// mr (<= DOT_MR) x rows against the block at b (always inlined: mr and prefetch are constants)
static inline __attribute__((always_inline)) void dot_tile(const uint16_t* b, int64_t K, const uint16_t* x, int mr,
                                                           int prefetch, const float* bias, uint16_t* y, int64_t N, int64_t n0) {
  __m512 a[DOT_MR][4];
  for (int m = 0; m < mr; ++m)
    for (int r = 0; r < 4; ++r) a[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const uint16_t* c = b + k * 4;
    if (prefetch) pf(c, 4);
    __m512bh w[4];
    for (int r = 0; r < 4; ++r) w[r] = (__m512bh)_mm512_loadu_si512(c + 32 * r);
    for (int m = 0; m < mr; ++m) {
      __m512bh u = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < 4; ++r) a[m][r] = _mm512_dpbf16_ps(a[m][r], u, w[r]);
    }
  }
  for (int m = 0; m < mr; ++m) {
    float s[4];
    _mm_storeu_ps(s, sum4(a[m][0], a[m][1], a[m][2], a[m][3]));
    if (bias)
      for (int r = 0; r < 4; ++r) s[r] += bias[n0 + r];
    f32_to_bf16(s, 4, y + m * N + n0);
  }
}

// y (M, N) bf16 = x (M, K) bf16 @ W^T + bias, W blocked bf16 (N, K)
void bf16_dot_mm(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M,
                 const float* bias, uint16_t* y, int nt) {
  for (int64_t m0 = 0; m0 < M; m0 += panel(K * 2, DOT_MR)) {  // x rows a panel that stays in L2
    int64_t M1 = m0 + panel(K * 2, DOT_MR) < M ? m0 + panel(K * 2, DOT_MR) : M;
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
      const uint16_t* b = w + n0 * K;
      int64_t m = m0;  // the first tile streams the block from memory; later ones find it in L1
      for (; m + DOT_MR <= M1; m += DOT_MR) dot_tile(b, K, x + m * K, DOT_MR, m == m0, bias, y + m * N, N, n0);
      for (int t = DOT_MR - 1; t > 0; --t)  // the rows left: a tile made for their count
        if (M1 - m == t) dot_tile(b, K, x + m * K, t, m == m0, bias, y + m * N, N, n0);
    }
  }
}
int bf16_dot_built(void) { return 1; }
#else
int bf16_dot_built(void) { return 0; }  // no bf16_dot_mm in this build
#endif

void bf16_mm_bf16(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M,
                  const float* bias, uint16_t* y, int nt) {
  float* yf = (float*)malloc(M * N * sizeof(float));
  float* xf = M == 1 ? bf16_to_f32(x, K) : 0;  // one row: bf16_row, which takes fp32 x
  if (xf) bf16_mm(w, N, K, xf, 1, bias, yf, nt);
  else bf16_mm_any(w, N, K, x, 1, M, bias, yf, nt);
  f32_to_bf16(yf, M * N, y);
  free(xf);
  free(yf);
}

// --- int4, group-wise: w = (q - 8) * s + z, q in [0, 15], (s, z) per row and group of G columns ---
// Here a vector lane is a row (16 rows per register), so per-row group scales apply with one
// vector FMA per group, and results are stored without a horizontal sum. A nibble becomes a float
// by v_nibble: q - 8 (AVX-512), or q times a power of 2 that x is scaled back by (AVX2, Q4_RAW).
// y = sum_g s_g * sum_{k in g} (q - 8) x_k + z_g * sum_{k in g} x_k.

// One block of 64 rows against one x row (two = 0) or two (two = 1; each weight is converted once
// for both). Inlined with `two` and `prefetch` constant. x as v_nibble needs it (scaled, Q4_RAW);
// xs: x's sums per group.
static inline void q4_block(const uint32_t* b, int64_t K, int64_t G, const float* x0, const float* x1,
                            const float* xs0, const float* xs1, int two, int prefetch,
                            const void* sz, int f32, int64_t n0, float* y0, float* y1, const float* bias) {
  v16 t0[4], t1[4];
  for (int j = 0; j < 4; ++j) t0[j] = t1[j] = v_zero();
  for (int64_t g = 0; g < K / G; ++g) {
    v16 a0[4 * Q4_ACC], a1[4];  // one row: Q4_ACC accumulators per 16 rows (for columns t % Q4_ACC)
    for (int j = 0; j < 4 * Q4_ACC; ++j) a0[j] = v_zero();
    for (int j = 0; j < 4; ++j) a1[j] = v_zero();
    for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
      const uint32_t* c = b + k * 8;  // chunk k/8: 64 dwords
      if (prefetch) {
        pf(c, 4);
        if (k == g * G) pf((const char*)sz + (n0 * (K / G) + g * 64) * (f32 ? 8 : 4), f32 ? 8 : 4);
      }
      for (int j = 0; j < 4; ++j) {
        v16i v = v_loadi(c + 16 * j);
        for (int t = 0; t < 8; ++t) {
          v16 w = v_nibble(v, t);
          if (two) {
            a0[j] = v_fmadd(w, v_set1(x0[k + t]), a0[j]);
            a1[j] = v_fmadd(w, v_set1(x1[k + t]), a1[j]);
          } else {
            a0[Q4_ACC * j + t % Q4_ACC] = v_fmadd(w, v_set1(x0[k + t]), a0[Q4_ACC * j + t % Q4_ACC]);
          }
        }
      }
    }
    for (int j = 0; j < 4; ++j) {
      v16 s, z;
      v_sz(sz, f32, n0 * (K / G) + g * 64 + 16 * j, &s, &z);
      if (Q4_RAW) z = v_fmadd(s, v_set1(-8.0f), z);  // sums of raw q: (q - 8) s + z = q s + (z - 8 s)
      v16 p = two || Q4_ACC == 1 ? a0[j] : v_add(a0[Q4_ACC * j], a0[Q4_ACC * j + 1]);
      t0[j] = v_fmadd(z, v_set1(xs0[g]), v_fmadd(p, s, t0[j]));
      if (two) t1[j] = v_fmadd(z, v_set1(xs1[g]), v_fmadd(a1[j], s, t1[j]));
    }
  }
  for (int j = 0; j < 4; ++j) {
    v16 bj = bias ? v_load(bias + n0 + 16 * j) : v_zero();
    v_store(y0 + n0 + 16 * j, v_add(t0[j], bj));
    if (two) v_store(y1 + n0 + 16 * j, v_add(t1[j], bj));
  }
}

// y (M, N) = x (M, K) @ W^T + bias; sz blocked scales and zeros in bf16 (f32 = 0) or fp32 (f32 = 1)
void q4_mm(const uint32_t* w, int64_t N, int64_t K, int64_t G, const float* x, int64_t M,
           const void* sz, int f32, const float* bias, float* y, int nt) {
  int64_t ng = K / G;
  float* xs = (float*)malloc(M * ng * sizeof(float));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < ng; ++g) {
      float a = 0;
      for (int64_t k = g * G; k < (g + 1) * G; ++k) a += x[m * K + k];
      xs[m * ng + g] = a;
    }
  float* xq = 0;
#if Q4_RAW
  xq = (float*)malloc(M * K * sizeof(float));
  for (int64_t i = 0; i < M * K; ++i) xq[i] = x[i] * q4_unit[i % 8];  // exact: powers of 2
  x = xq;
#endif
  if (M == 1) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += 64)
      q4_block(w + n0 * K / 8, K, G, x, 0, xs, 0, 0, 1, sz, f32, n0, y, 0, bias);
  } else {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
      const uint32_t* b = w + n0 * K / 8;
      int64_t m = 0;
      for (; m + 1 < M; m += 2)
        q4_block(b, K, G, x + m * K, x + (m + 1) * K, xs + m * ng, xs + (m + 1) * ng, 1, m == 0,
                 sz, f32, n0, y + m * N, y + (m + 1) * N, bias);
      if (m < M) q4_block(b, K, G, x + m * K, 0, xs + m * ng, 0, 0, 0, sz, f32, n0, y + m * N, 0, bias);
    }
  }
  free(xs);
  free(xq);
}

void q4_mm_bf16(const uint32_t* w, int64_t N, int64_t K, int64_t G, const uint16_t* x, int64_t M,
                const void* sz, int f32, const float* bias, uint16_t* y, int nt) {
  float* xf = bf16_to_f32(x, M * K);
  float* yf = (float*)malloc(M * N * sizeof(float));
  q4_mm(w, N, K, G, xf, M, sz, f32, bias, yf, nt);
  f32_to_bf16(yf, M * N, y);
  free(xf);
  free(yf);
}

// Packed int4 -> row-major fp32 (N, K) dequantized weights, for products with many rows.
void q4_unpack_f32(const uint32_t* w, int64_t N, int64_t K, int64_t G, const void* sz, int f32,
                   float* out, int nt) {
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const uint32_t* b = w + n0 * K / 8;
    for (int64_t g = 0; g < K / G; ++g)
      for (int j = 0; j < 4; ++j) {
        v16 s, z;
        float sv[16], zv[16];
        v_sz(sz, f32, n0 * (K / G) + g * 64 + 16 * j, &s, &z);
        v_store(sv, s);
        v_store(zv, z);
        for (int i = 0; i < 16; ++i) {
          int64_t r = 16 * j + i;
          float* o = out + (n0 + r) * K;
          for (int64_t k = g * G; k < (g + 1) * G; ++k)
            o[k] = ((float)((b[(k / 8) * 64 + r] >> (4 * (k % 8))) & 15u) - 8.0f) * sv[i] + zv[i];
        }
      }
  }
}

// torch's int4pack layout (blocks of 64 rows: K rows of 32 bytes, byte j of row k holding row j's
// value in its low nibble and row 32 + j's in its high one) <-> ours. src and dst must not overlap.
void q4_pack(const uint8_t* src, uint32_t* dst, int64_t N, int64_t K, int nt) {
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const uint8_t* s = src + n0 * K / 2;
    uint32_t* d = dst + n0 * K / 8;
    for (int64_t c = 0; c < K / 8; ++c) {
      uint32_t acc[64] = {0};
      for (int t = 0; t < 8; ++t) {
        const uint8_t* row = s + (8 * c + t) * 32;
        for (int r = 0; r < 32; ++r) {
          acc[r] |= (uint32_t)(row[r] & 15u) << (4 * t);
          acc[32 + r] |= (uint32_t)(row[r] >> 4) << (4 * t);
        }
      }
      memcpy(d + 64 * c, acc, sizeof acc);
    }
  }
}

void q4_unpack(const uint32_t* src, uint8_t* dst, int64_t N, int64_t K, int nt) {
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const uint32_t* s = src + n0 * K / 8;
    uint8_t* d = dst + n0 * K / 2;
    for (int64_t c = 0; c < K / 8; ++c)
      for (int t = 0; t < 8; ++t)
        for (int r = 0; r < 32; ++r)
          d[(8 * c + t) * 32 + r] = (uint8_t)(((s[64 * c + r] >> (4 * t)) & 15u) | (((s[64 * c + 32 + r] >> (4 * t)) & 15u) << 4));
  }
}

// --- attention of one new query per row over a bf16 KV cache (a decode step) ---
// q (B, H, D), k and v (B, H, S, D), y (B, H, D), all bf16; mask (B, S) bytes, nonzero = attend
// (NULL: all). In fp32 as SDPA computes for fp32 inputs (scores, softmax, weighted sum); y is
// rounded once. A row with nothing to attend gets zeros. Reading the bf16 cache directly saves
// converting it to fp32 for SDPA at every step, which cost more than the attention itself.
// k, v: (B, H, S, D) with rows of D contiguous and `ld` values from one head to the next (S * D
// for a whole cache, more for the live front of one: a decode step reads only the positions so far)
void attn1_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint8_t* mask,
                int64_t B, int64_t H, int64_t S, int64_t D, int64_t ld, float scale, uint16_t* y, int nt) {
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const uint16_t* kh = k + bh * ld;
    const uint16_t* vh = v + bh * ld;
    const uint8_t* mk = mask ? mask + (bh / H) * S : 0;
    int64_t Dp = (D + 15) / 16 * 16;  // the output row is padded to whole vectors (zeros past D)
    float* p = (float*)malloc((S + Dp) * sizeof(float));  // scores, then the output row
    float* o = p + S;
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; ++s) {
      if (mk && !mk[s]) {
        p[s] = -INFINITY;
        continue;
      }
      vacc a = acc_zero();
      for (int64_t d = 0; d < D; d += 16)
        a = acc_fmadd(v_bf16_part(kh + s * D + d, D - d), v_bf16_part(q + bh * D + d, D - d), a);
      p[s] = acc_sum(a) * scale;
      if (p[s] > mx) mx = p[s];
    }
    for (int64_t d = 0; d < Dp; ++d) o[d] = 0.0f;
    if (mx != -INFINITY) {
      float tot = 0.0f;
      for (int64_t s = 0; s < S; ++s) {
        p[s] = expf(p[s] - mx);  // masked: exp(-inf) = 0
        tot += p[s];
      }
      for (int64_t s = 0; s < S; ++s) {
        if (p[s] == 0.0f) continue;
        v16 w = v_set1(p[s]);
        for (int64_t d = 0; d < D; d += 16) v_store(o + d, v_fmadd(w, v_bf16_part(vh + s * D + d, D - d), v_load(o + d)));
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= tot;
    }
    f32_to_bf16(o, D, y + bh * D);
    free(p);
  }
}

// The vector width this library was built for (build.py checks it is the ISA it asked for).
#ifdef __AVX512F__
int kernels_isa(void) { return 512; }
#else
int kernels_isa(void) { return 256; }
#endif
