// CPU matrix-vector kernels for decode steps (AVX-512F), built on first use by kernels.py.
//
// A decode step reads every weight once, so its speed is the rate at which weights stream from
// memory. Row-major weights read one row at a time keep only a few streams in flight per core;
// storing them in small row blocks makes each thread's reads one sequential stream, which the
// hardware prefetcher (helped by explicit prefetches) follows at close to the memory's rate.
//
// Layouts (produced by kernels.py with a reshape/transpose, so they are dtype-agnostic there):
//   int8 (N, K): blocks of 8 rows; a block holds K/64 chunks, each 8 rows x 64 values in a row.
//   bf16 (N, K): blocks of 4 rows; a block holds K/32 chunks, each 4 rows x 32 values in a row.
// A chunk is 512 or 256 contiguous bytes; a block is 8K bytes in both (8 x K int8, 4 x K bf16).
//
// y (M, N) fp32 = x (M, K) fp32 @ W^T, times scale[n] if given, plus bias[n] if given. Products of
// int8 or bf16 values with fp32 are exact in fp32 (before the add); sums are in fp32.
#include <immintrin.h>
#include <stdint.h>

#define AHEAD 4096  // bytes to prefetch ahead of the chunk being read (into L2: measured a little faster than L1)

static inline void pf(const void* p, int lines) {
  for (int i = 0; i < lines; ++i) _mm_prefetch((const char*)p + AHEAD + 64 * i, _MM_HINT_T1);
}

static inline __m512 ld_i8(const int8_t* p) {  // 16 int8 -> 16 fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

static inline __m512 ld_bf16(const uint16_t* p) {  // 16 bf16 -> 16 fp32 (bf16 is fp32's top half)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

static inline float finish(__m512 a, const float* scale, const float* bias, int64_t n) {
  float v = _mm512_reduce_add_ps(a);
  if (scale) v *= scale[n];
  if (bias) v += bias[n];
  return v;
}

// One block of 8 int8 rows against one x row. Inlined with prefetch constant, so the decode-step
// loop has no branch inside (measurably faster than one function that also takes row pairs).
static inline void q8_row(const int8_t* b, int64_t K, const float* x, int prefetch,
                          float* y, const float* scale, const float* bias, int64_t n0) {
  __m512 a[8];
  for (int r = 0; r < 8; ++r) a[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    const int8_t* c = b + k * 8;
    if (prefetch) pf(c, 8);
    for (int j = 0; j < 64; j += 16) {
      __m512 u = _mm512_loadu_ps(x + k + j);
      for (int r = 0; r < 8; ++r) a[r] = _mm512_fmadd_ps(ld_i8(c + r * 64 + j), u, a[r]);
    }
  }
  for (int r = 0; r < 8; ++r) y[n0 + r] = finish(a[r], scale, bias, n0 + r);
}

// The same block against two x rows: each weight is converted once for both.
static inline void q8_pair(const int8_t* b, int64_t K, const float* x0, const float* x1, int prefetch,
                           float* y0, float* y1, const float* scale, const float* bias, int64_t n0) {
  __m512 a0[8], a1[8];
  for (int r = 0; r < 8; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    const int8_t* c = b + k * 8;
    if (prefetch) pf(c, 8);
    for (int j = 0; j < 64; j += 16) {
      __m512 u0 = _mm512_loadu_ps(x0 + k + j), u1 = _mm512_loadu_ps(x1 + k + j);
      for (int r = 0; r < 8; ++r) {
        __m512 w = ld_i8(c + r * 64 + j);
        a0[r] = _mm512_fmadd_ps(w, u0, a0[r]);
        a1[r] = _mm512_fmadd_ps(w, u1, a1[r]);
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
  __m512 a[8];
  for (int r = 0; r < 8; ++r) a[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const uint16_t* c = b + k * 4;
    if (prefetch) pf(c, 4);
    __m512 u = _mm512_loadu_ps(x + k), uh = _mm512_loadu_ps(x + k + 16);
    for (int r = 0; r < 4; ++r) {
      a[2 * r] = _mm512_fmadd_ps(ld_bf16(c + r * 32), u, a[2 * r]);
      a[2 * r + 1] = _mm512_fmadd_ps(ld_bf16(c + r * 32 + 16), uh, a[2 * r + 1]);
    }
  }
  for (int r = 0; r < 4; ++r) y[n0 + r] = finish(_mm512_add_ps(a[2 * r], a[2 * r + 1]), 0, bias, n0 + r);
}

static inline void bf16_pair(const uint16_t* b, int64_t K, const float* x0, const float* x1, int prefetch,
                             float* y0, float* y1, const float* bias, int64_t n0) {
  __m512 a0[8], a1[8];
  for (int r = 0; r < 8; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const uint16_t* c = b + k * 4;
    if (prefetch) pf(c, 4);
    __m512 u0 = _mm512_loadu_ps(x0 + k), u0h = _mm512_loadu_ps(x0 + k + 16);
    __m512 u1 = _mm512_loadu_ps(x1 + k), u1h = _mm512_loadu_ps(x1 + k + 16);
    for (int r = 0; r < 4; ++r) {
      __m512 w = ld_bf16(c + r * 32), wh = ld_bf16(c + r * 32 + 16);
      a0[2 * r] = _mm512_fmadd_ps(w, u0, a0[2 * r]);
      a0[2 * r + 1] = _mm512_fmadd_ps(wh, u0h, a0[2 * r + 1]);
      a1[2 * r] = _mm512_fmadd_ps(w, u1, a1[2 * r]);
      a1[2 * r + 1] = _mm512_fmadd_ps(wh, u1h, a1[2 * r + 1]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    y0[n0 + r] = finish(_mm512_add_ps(a0[2 * r], a0[2 * r + 1]), 0, bias, n0 + r);
    y1[n0 + r] = finish(_mm512_add_ps(a1[2 * r], a1[2 * r + 1]), 0, bias, n0 + r);
  }
}

void bf16_mm(const uint16_t* w, int64_t N, int64_t K, const float* x, int64_t M,
             const float* bias, float* y, int nt) {
  if (M == 1) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t n0 = 0; n0 < N; n0 += 4) bf16_row(w + n0 * K, K, x, 1, y, bias, n0);
    return;
  }
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t n0 = 0; n0 < N; n0 += 4) {
    const uint16_t* b = w + n0 * K;
    int64_t m = 0;
    for (; m + 1 < M; m += 2) bf16_pair(b, K, x + m * K, x + (m + 1) * K, m == 0, y + m * N, y + (m + 1) * N, bias, n0);
    if (m < M) bf16_row(b, K, x + m * K, 0, y + m * N, bias, n0);
  }
}

// Packed weights -> row-major fp32 (N, K), for products with many rows (prefill, batches), which
// run as fp32 GEMMs.
void q8_unpack_f32(const int8_t* w, int64_t N, int64_t K, float* out, int nt) {
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t n0 = 0; n0 < N; n0 += 8)
    for (int64_t k = 0; k < K; k += 64)
      for (int r = 0; r < 8; ++r)
        for (int j = 0; j < 64; j += 16)
          _mm512_storeu_ps(out + (n0 + r) * K + k + j, ld_i8(w + n0 * K + k * 8 + r * 64 + j));
}

void bf16_unpack_f32(const uint16_t* w, int64_t N, int64_t K, float* out, int nt) {
  #pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t n0 = 0; n0 < N; n0 += 4)
    for (int64_t k = 0; k < K; k += 32)
      for (int r = 0; r < 4; ++r)
        for (int j = 0; j < 32; j += 16)
          _mm512_storeu_ps(out + (n0 + r) * K + k + j, ld_bf16(w + n0 * K + k * 4 + r * 32 + j));
}

// The same products for bf16 activations in and out (a bf16 model's decode step): converting here
// saves two torch ops per layer call. fp32 inside; the result is rounded to nearest-even once.
#include <stdlib.h>
#include <string.h>

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

void bf16_mm_bf16(const uint16_t* w, int64_t N, int64_t K, const uint16_t* x, int64_t M,
                  const float* bias, uint16_t* y, int nt) {
  float* xf = bf16_to_f32(x, M * K);
  float* yf = (float*)malloc(M * N * sizeof(float));
  bf16_mm(w, N, K, xf, M, bias, yf, nt);
  f32_to_bf16(yf, M * N, y);
  free(xf);
  free(yf);
}
