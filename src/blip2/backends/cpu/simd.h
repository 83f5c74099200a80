// The vector layer of kernels.c: 16 fp32 lanes as one AVX-512 register, or two AVX2 ones.
// Included by kernels.c only; build.py compiles it into the same library (and hashes it into the
// cache key).
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

// --- 16 fp32 lanes: one AVX-512 register, or two AVX2 ones (build.py picks the ISA). Every kernel
// below is written once against these; the layouts are the same, and so are the results up to
// the order of fp32 additions (and, for int4, where the -8 is applied: see v_nibble). ---
#ifdef __AVX512F__
typedef __m512 v16;
typedef __m512i v16i;  // 16 dwords
typedef __m512 vacc;   // a dot product's accumulator
#define FMA_MR 4  // x rows per tile of bf16_mm (kernels.c), and accumulators per (x row, weight row)
#define FMA_SPLIT 1
static inline v16 v_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v_set1(float f) { return _mm512_set1_ps(f); }
static inline v16 v_load(const float* p) { return _mm512_loadu_ps(p); }
static inline v16i v_loadi(const uint32_t* p) { return _mm512_loadu_si512(p); }
static inline void v_store(float* p, v16 a) { _mm512_storeu_ps(p, a); }
static inline v16 v_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
static inline v16 v_fmadd(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline vacc acc_zero(void) { return _mm512_setzero_ps(); }
static inline vacc acc_add(vacc a, vacc b) { return _mm512_add_ps(a, b); }
static inline vacc acc_fmadd(v16 w, v16 u, vacc a) { return _mm512_fmadd_ps(w, u, a); }
static inline float acc_sum(vacc a) { return _mm512_reduce_add_ps(a); }
static inline v16 v_i8(const int8_t* p) {  // 16 int8 -> 16 fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
static inline v16 v_bf16(const uint16_t* p) {  // 16 bf16 -> 16 fp32 (bf16 is fp32's top half)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
// 32 bf16 as 16 dwords -> the 16 at even places or at odd places, in fp32: one op each, no widening
static inline v16 v_bf16_even(const uint16_t* p) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16)); }
static inline v16 v_bf16_odd(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32((int)0xffff0000u)));
}
static inline v16 v_bf16_part(const uint16_t* p, int64_t n) {  // min(n, 16) bf16 -> fp32, zeros past n
  __mmask16 m = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
// lane sums of four registers -> (sum a0, sum a1, sum a2, sum a3)
static inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));  // a0 a1 a0 a1 per 128 bits
  __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))),
                           _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t1))));
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
// int4: nibble t of each dword as the float q - 8, by a table lookup (vpermps reads only an index's
// low 4 bits, so a shift is all the unpacking it needs). Q4_ACC: accumulators per 16 rows for one
// x row (two, so that more FMAs are in flight).
#define Q4_RAW 0
#define Q4_ACC 2
static inline v16 v_nibble(v16i v, int t) {
  const __m512 tab = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  return _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * t), tab);
}
// 16 consecutive (s, z) pairs from pair i of sz, bf16 or fp32
static inline void v_sz(const void* sz, int f32, int64_t i, v16* s, v16* z) {
  if (f32) {
    const float* p = (const float*)sz + 2 * i;
    __m512 lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + 16);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    *s = _mm512_permutex2var_ps(lo, even, hi);
    *z = _mm512_permutex2var_ps(lo, _mm512_add_epi32(even, _mm512_set1_epi32(1)), hi);
  } else {  // a dword is (s, z) as two bf16: s is its low half, z its high half
    __m512i v = _mm512_loadu_si512((const uint16_t*)sz + 2 * i);
    *s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    *z = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xffff0000u)));
  }
}
#else  // AVX2 + FMA: lanes 0-7 in lo, 8-15 in hi
typedef struct { __m256 lo, hi; } v16;
typedef struct { __m256i lo, hi; } v16i;
// 8 lanes: both halves of a v16 go into one, so that a block's 8 or 16 accumulators fit AVX2's
// 16 registers (with 16 lanes they spilled)
typedef __m256 vacc;
#define FMA_MR 2
#define FMA_SPLIT 2
static inline v16 v_two(__m256 lo, __m256 hi) { v16 r = {lo, hi}; return r; }
static inline v16 v_zero(void) { return v_two(_mm256_setzero_ps(), _mm256_setzero_ps()); }
static inline v16 v_set1(float f) { return v_two(_mm256_set1_ps(f), _mm256_set1_ps(f)); }
static inline v16 v_load(const float* p) { return v_two(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
static inline v16i v_loadi(const uint32_t* p) {
  v16i r = {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)(p + 8))};
  return r;
}
static inline void v_store(float* p, v16 a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
static inline v16 v_add(v16 a, v16 b) { return v_two(_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)); }
static inline v16 v_fmadd(v16 a, v16 b, v16 c) {
  return v_two(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi));
}
static inline vacc acc_zero(void) { return _mm256_setzero_ps(); }
static inline vacc acc_add(vacc a, vacc b) { return _mm256_add_ps(a, b); }
static inline vacc acc_fmadd(v16 w, v16 u, vacc a) { return _mm256_fmadd_ps(w.hi, u.hi, _mm256_fmadd_ps(w.lo, u.lo, a)); }
static inline float acc_sum(vacc a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
static inline __m256 i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
static inline v16 v_i8(const int8_t* p) { return v_two(i8x8(p), i8x8(p + 8)); }
static inline __m256 bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
static inline v16 v_bf16(const uint16_t* p) { return v_two(bf16x8(p), bf16x8(p + 8)); }
static inline v16 v_bf16_part(const uint16_t* p, int64_t n) {  // through a zero-padded copy
  if (n >= 16) return v_bf16(p);
  uint16_t t[16] = {0};
  memcpy(t, p, n * sizeof(uint16_t));
  return v_bf16(t);
}
// int4: a 16-entry lookup takes two vpermps and a blend per 8 lanes here, where masking nibble t in
// place and converting takes two cheap ops (2.2x faster). So v_nibble gives q * 16^t (exact: 4
// significant bits; t = 7 is shifted down, as its top bit is the sign): the kernel scales x's
// column t by q4_unit[t] = 16^-t to match, and applies the -8 to z instead (z - 8s).
#define Q4_RAW 1
#define Q4_ACC 1  // 2 lanes x 4 blocks of 16 rows: enough FMAs in flight; more would spill
static const float q4_unit[8] = {1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.0f};
static inline __m256 nib8(__m256i v, int t) {
  return _mm256_cvtepi32_ps(t == 7 ? _mm256_srli_epi32(v, 28) : _mm256_and_si256(v, _mm256_set1_epi32(15 << (4 * t))));
}
static inline v16 v_nibble(v16i v, int t) { return v_two(nib8(v.lo, t), nib8(v.hi, t)); }
static inline __m256 lo16(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline __m256 hi16(__m256i v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u))); }
static inline v16 v_bf16_even(const uint16_t* p) { v16i v = v_loadi((const uint32_t*)p); return v_two(lo16(v.lo), lo16(v.hi)); }
static inline v16 v_bf16_odd(const uint16_t* p) { v16i v = v_loadi((const uint32_t*)p); return v_two(hi16(v.lo), hi16(v.hi)); }
static inline void v_sz(const void* sz, int f32, int64_t i, v16* s, v16* z) {
  if (f32) {  // each 8 lanes: (s0 z0 s1 z1 | s4 z4 s5 z5) ... -> even / odd, then 64-bit lanes in order
    const float* p = (const float*)sz + 2 * i;
    __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8), c = _mm256_loadu_ps(p + 16), d = _mm256_loadu_ps(p + 24);
#define ORDER(u) _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(u), _MM_SHUFFLE(3, 1, 2, 0)))
    *s = v_two(ORDER(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), ORDER(_mm256_shuffle_ps(c, d, _MM_SHUFFLE(2, 0, 2, 0))));
    *z = v_two(ORDER(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), ORDER(_mm256_shuffle_ps(c, d, _MM_SHUFFLE(3, 1, 3, 1))));
#undef ORDER
  } else {  // a dword is (s, z) as two bf16: s is its low half, z its high half
    v16i v = v_loadi((const uint32_t*)sz + i);
    *s = v_two(lo16(v.lo), lo16(v.hi));
    *z = v_two(hi16(v.lo), hi16(v.hi));
  }
}
#endif
