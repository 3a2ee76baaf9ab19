// Small-batch CPU products that read each weight byte once (dsv3.kernels.native builds and loads this).
//
// Why it exists: a decode step multiplies a few activation rows by every weight it touches, so it is
// bound by how fast the weights stream from memory. torch's bf16 and int8 CPU paths convert or pack
// the weights on the way (and on CPUs without BF16 instructions emulate bf16 products), streaming at a
// fraction of the machine's read bandwidth. Here each weight vector is loaded once, widened to fp32 in
// registers (bf16: a 16-bit shift; FP8: through fp16 bits and its block scale) and multiplied into fp32
// accumulators for up to four activation rows at a time; int8 weights are sign-extended to int16 and
// multiplied by int16-quantized activation rows into int32 sums. Results are rounded once to the output
// type (round to nearest even for bf16), as torch's bf16 products are.
//
// Types: 0 = float32, 1 = bfloat16, 2 = int8 (weights only, with one float32 scale per output row),
// 3 = float8 e4m3fn (weights only, with float32 scales per block of rows x columns: DeepSeek's FP8 layout),
// 4 = float32 holding bfloat16 values (outputs only: rounded to bf16, stored widened, as `y.bfloat16().float()`).
// All strides are in elements; the innermost dimension of every operand is contiguous.

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define DSV3_AVX512 1
#endif

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { T_F32 = 0, T_BF16 = 1, T_I8 = 2, T_FP8 = 3, T_F32_BF16 = 4 };

// Wall time of a decode step's phases (scripts/decode_profile.py): compiled in only with -DDSV3_PROFILE
// (`native.build(profile=True)`, `DSV3_NATIVE_PROFILE=1`). dsv3_profile[phase] sums seconds on the calling
// thread, a phase's parallel regions included; PROF_STEPS counts `dsv3_decode_step` calls. Without the flag
// the macro is the statement alone.
enum { PROF_Q_IN, PROF_Q_B, PROF_ATTEND, PROF_O_PROJ, PROF_ROUTED, PROF_SHARED, PROF_DENSE, PROF_LAYERS, PROF_HEAD,
       PROF_STEPS, PROF_PHASES };
#ifdef DSV3_PROFILE
#include <time.h>
double dsv3_profile[PROF_PHASES];
static inline double profile_clock(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
#define PROFILED(phase, stmt)                              \
    do {                                                   \
        const double t0_ = profile_clock();                \
        stmt;                                              \
        dsv3_profile[phase] += profile_clock() - t0_;      \
    } while (0)
#else
#define PROFILED(phase, stmt) \
    do {                      \
        stmt;                 \
    } while (0)
#endif

static inline __m256 load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
// Round to nearest even at bf16 precision, kept in fp32 (no NaN can come out of e4m3fn weights here).
static inline __m256 round8_bf16(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}
// 8 e4m3fn weights -> fp32 times their block's scale, rounded to bf16 when `round`: what
// dequantize_blocks(w, scale_inv, dtype) produces, value by value. e4m3's bits shifted into fp16 position
// read value * 2**-8 exactly (fp16 subnormals included, which F16C converts whatever the MXCSR flags);
// times (scale * 2**8) is the one rounding of value * scale, as in the dequantization.
static inline __m256 load8_fp8(const uint8_t *p, float scale, int round) {
    const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                                   _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7));
    const __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(scale * 256.0f));
    return round ? round8_bf16(v) : v;
}
// 16 e4m3fn weights -> their values times 2**-8 (the fp16 bit pattern, exact), columns k..k+7 and k+8..k+15:
// the byte at the top of a 16-bit lane, shifted right by one with its sign copied, is the fp16 pattern once
// bit 14 is cleared (the bit mapping on 16 lanes at once: about 1.5x fewer operations per weight).
static inline void fp8x16_scaled_down(const uint8_t *p, __m256 *lo, __m256 *hi) {
    const __m256i b = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)), 8);
    const __m256i h = _mm256_and_si256(_mm256_srai_epi16(b, 1), _mm256_set1_epi16((short)0xBFFF));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}
// 16 e4m3fn weights -> columns k..k+7 (lo) and k+8..k+15 (hi), value for value what load8_fp8 gives.
static inline void load16_fp8(const uint8_t *p, float scale, int round, __m256 *lo, __m256 *hi) {
    __m256 v0, v1;
    fp8x16_scaled_down(p, &v0, &v1);
    const __m256 s = _mm256_set1_ps(scale * 256.0f);
    v0 = _mm256_mul_ps(v0, s), v1 = _mm256_mul_ps(v1, s);
    *lo = round ? round8_bf16(v0) : v0;
    *hi = round ? round8_bf16(v1) : v1;
}
static inline float fp8_to_f32(uint8_t b) {
    const int e = (b >> 3) & 15, m = b & 7;
    const float mag = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
    return b & 0x80 ? -mag : mag;
}
static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays a quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline float hmax(__m256 v) {
    float m[8], r = -INFINITY;
    _mm256_storeu_ps(m, v);
    for (int j = 0; j < 8; j++) r = m[j] > r ? m[j] : r;
    return r;
}
static inline float load1(const void *p, int64_t i, int type) {
    switch (type) {
        case T_BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
        case T_I8: return (float)((const int8_t *)p)[i];
        default: return ((const float *)p)[i];
    }
}
static inline void store1(void *p, int64_t i, int type, float v) {
    if (type == T_BF16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else if (type == T_F32_BF16)
        ((float *)p)[i] = bf16_to_f32(f32_to_bf16(v));
    else
        ((float *)p)[i] = v;
}

// Dot products of MT fp32 rows (x, row stride xs) with two weight rows w0, w1 of length K:
// out[m][j] = x[m] . w_j. Generated per weight type and MT so the accumulators stay in registers; every
// iteration prefetches 2 KiB ahead in both rows. One or two rows take 16 weights per iteration into two
// accumulator sets (independent FMA chains: with one set a single row is bound by the FMA latency, not by
// memory; 1.6x the bandwidth of the plain loop on a 265 MB bf16 matrix-vector product). Three or four rows
// hide the latency by themselves and need the registers: one set, and each widened weight vector feeds
// four FMAs (the widening, not the FMA, limits batched decode). The row loops are unrolled by pragma: left
// as loops, GCC keeps the accumulator arrays in memory (2.3x slower with four rows, measured).
#define PREFETCH_AHEAD 2048
#define DEFINE_DOT2(NAME, WTYPE, LOAD, MT)                                                              \
    static inline void NAME(const float *x, int64_t xs, const WTYPE *w0, const WTYPE *w1, int64_t K,    \
                            const float *srow, int sbs, int rnd, float out[8][2]) {                     \
        (void)srow, (void)sbs, (void)rnd; /* FP8's block scales: unused by the other weight types */    \
        __m256 a0[MT], a1[MT], b0[MT], b1[MT];                                                          \
        _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) a0[m] = a1[m] = b0[m] = b1[m] = _mm256_setzero_ps(); \
        int64_t k = 0;                                                                                  \
        for (; MT <= 2 && k + 16 <= K; k += 16) {                                                       \
            _mm_prefetch((const char *)(w0 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                         \
            _mm_prefetch((const char *)(w1 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                         \
            __m256 v0, v1, u0, u1;                                                                      \
            LOAD##_16(w0, k, v0, u0);                                                                   \
            LOAD##_16(w1, k, v1, u1);                                                                   \
            _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                    \
                __m256 xv = _mm256_loadu_ps(x + m * xs + k), xu = _mm256_loadu_ps(x + m * xs + k + 8);  \
                a0[m] = _mm256_fmadd_ps(v0, xv, a0[m]);                                                 \
                a1[m] = _mm256_fmadd_ps(v1, xv, a1[m]);                                                 \
                b0[m] = _mm256_fmadd_ps(u0, xu, b0[m]);                                                 \
                b1[m] = _mm256_fmadd_ps(u1, xu, b1[m]);                                                 \
            }                                                                                           \
        }                                                                                               \
        for (; k + 8 <= K; k += 8) {                                                                    \
            _mm_prefetch((const char *)(w0 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                         \
            _mm_prefetch((const char *)(w1 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                         \
            __m256 v0 = LOAD(w0, k), v1 = LOAD(w1, k);                                                    \
            _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                    \
                __m256 xv = _mm256_loadu_ps(x + m * xs + k);                                            \
                a0[m] = _mm256_fmadd_ps(v0, xv, a0[m]);                                                 \
                a1[m] = _mm256_fmadd_ps(v1, xv, a1[m]);                                                 \
            }                                                                                           \
        }                                                                                               \
        _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                        \
            float s0 = hsum(MT <= 2 ? _mm256_add_ps(a0[m], b0[m]) : a0[m]);                             \
            float s1 = hsum(MT <= 2 ? _mm256_add_ps(a1[m], b1[m]) : a1[m]);                             \
            for (int64_t kk = k; kk < K; kk++) {                                                        \
                s0 = fmaf(x[m * xs + kk], (float)LOAD##_1(w0, kk), s0);                                  \
                s1 = fmaf(x[m * xs + kk], (float)LOAD##_1(w1, kk), s1);                                  \
            }                                                                                           \
            out[m][0] = s0;                                                                             \
            out[m][1] = s1;                                                                             \
        }                                                                                               \
    }

// Loads of 8 weights (and of one, for the tails) at column k of row p; FP8 applies the row's scale of
// column block k >> sbs (srow) and rounds per rnd. The other types ignore srow, sbs and rnd.
#define LD_bf16(p, k) load8_bf16((p) + (k))
#define LD_f32(p, k) _mm256_loadu_ps((p) + (k))
#define LD_fp8(p, k) load8_fp8((p) + (k), srow[(k) >> sbs], rnd)
// Sixteen weights at column k (a multiple of 16: FP8 column blocks are at least 16 wide) into lo, hi.
#define LD_bf16_16(p, k, lo, hi) ((lo) = LD_bf16(p, k), (hi) = LD_bf16(p, (k) + 8))
#define LD_f32_16(p, k, lo, hi) ((lo) = LD_f32(p, k), (hi) = LD_f32(p, (k) + 8))
#define LD_fp8_16(p, k, lo, hi) load16_fp8((p) + (k), srow[(k) >> sbs], rnd, &(lo), &(hi))
#define LD_bf16_1(p, k) bf16_to_f32((p)[k])
#define LD_f32_1(p, k) ((p)[k])
#define LD_fp8_1(p, k) (rnd ? bf16_to_f32(f32_to_bf16(fp8_to_f32((p)[k]) * srow[(k) >> sbs])) : fp8_to_f32((p)[k]) * srow[(k) >> sbs])

// dot2_SUFFIX(mt): the kernel for mt rows (1-4; WIDEST, 4 or 8, for more: the caller passes at most WIDEST).
#define DEFINE_DOT2_DISPATCH(SUFFIX, WTYPE, WIDEST)                                                       \
    static inline void dot2_##SUFFIX(const float *x, int64_t xs, int mt, const WTYPE *w0, const WTYPE *w1, \
                                     int64_t K, const float *srow, int sbs, int rnd, float out[8][2]) {    \
        switch (mt) {                                                                                      \
            case 1: dot2_##SUFFIX##_1(x, xs, w0, w1, K, srow, sbs, rnd, out); break;                       \
            case 2: dot2_##SUFFIX##_2(x, xs, w0, w1, K, srow, sbs, rnd, out); break;                       \
            case 3: dot2_##SUFFIX##_3(x, xs, w0, w1, K, srow, sbs, rnd, out); break;                       \
            case 4: dot2_##SUFFIX##_4(x, xs, w0, w1, K, srow, sbs, rnd, out); break;                       \
            default: dot2_##SUFFIX##_##WIDEST(x, xs, w0, w1, K, srow, sbs, rnd, out); break;               \
        }                                                                                                  \
    }
#define DEFINE_DOT2_ALL(SUFFIX, WTYPE, LOAD)                 \
    DEFINE_DOT2(dot2_##SUFFIX##_1, WTYPE, LOAD, 1)           \
    DEFINE_DOT2(dot2_##SUFFIX##_2, WTYPE, LOAD, 2)           \
    DEFINE_DOT2(dot2_##SUFFIX##_3, WTYPE, LOAD, 3)           \
    DEFINE_DOT2(dot2_##SUFFIX##_4, WTYPE, LOAD, 4)           \
    DEFINE_DOT2_DISPATCH(SUFFIX, WTYPE, 4)

// One or two activation rows against ONE weight row: dot2's one/two-row arithmetic (two accumulator sets
// over each 16 columns, then 8, then the scalar tail: the same bits), but the weights are read as a single
// sequential stream, prefetched 4 KiB ahead once per cache line. Two rows read side by side are two streams a row
// apart, which the hardware prefetcher follows worse: on a 132 MB product from memory, 512-byte rows
// (bf16 x 256) stream at 17.4 GB/s this way vs 13.9 in pairs, 1 KiB rows (int8 x 1024) 16.3 vs 13.0, and
// 2 KiB rows are even (18.0 vs 17.9; medians of 15 alternating runs, two threads).
#define DOT1_PREFETCH 4096
#define DEFINE_DOT1(NAME, WTYPE, LOAD, MT)                                                              \
    static inline void NAME(const float *x, int64_t xs, const WTYPE *w0, int64_t K, const float *srow, int sbs, \
                            int rnd, float out[2]) {                                                    \
        (void)srow, (void)sbs, (void)rnd;                                                               \
        __m256 a0[MT], b0[MT];                                                                          \
        _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) a0[m] = b0[m] = _mm256_setzero_ps();       \
        int64_t k = 0;                                                                                  \
        for (; k + 16 <= K; k += 16) {                                                                  \
            if ((k * sizeof(WTYPE)) % 64 == 0)                                                          \
                _mm_prefetch((const char *)(w0 + k) + DOT1_PREFETCH, _MM_HINT_T0);                      \
            __m256 v0, u0;                                                                              \
            LOAD##_16(w0, k, v0, u0);                                                                   \
            _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) {                                      \
                a0[m] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + m * xs + k), a0[m]);                    \
                b0[m] = _mm256_fmadd_ps(u0, _mm256_loadu_ps(x + m * xs + k + 8), b0[m]);                \
            }                                                                                           \
        }                                                                                               \
        for (; k + 8 <= K; k += 8) {                                                                    \
            const __m256 v0 = LOAD(w0, k);                                                              \
            _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++)                                        \
                a0[m] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + m * xs + k), a0[m]);                    \
        }                                                                                               \
        _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) {                                          \
            float s0 = hsum(_mm256_add_ps(a0[m], b0[m]));                                               \
            for (int64_t kk = k; kk < K; kk++) s0 = fmaf(x[m * xs + kk], (float)LOAD##_1(w0, kk), s0);  \
            out[m] = s0;                                                                                \
        }                                                                                               \
    }
#define DEFINE_DOT1_DISPATCH(SUFFIX, WTYPE)                                                             \
    static inline void dot1_##SUFFIX(const float *x, int64_t xs, int mt, const WTYPE *w0, int64_t K,    \
                                     const float *srow, int sbs, int rnd, float out[2]) {               \
        if (mt == 1)                                                                                    \
            dot1_##SUFFIX##_1(x, xs, w0, K, srow, sbs, rnd, out);                                       \
        else                                                                                            \
            dot1_##SUFFIX##_2(x, xs, w0, K, srow, sbs, rnd, out);                                       \
    }
#define DEFINE_DOT1_ALL(SUFFIX, WTYPE, LOAD)                                                            \
    DEFINE_DOT1(dot1_##SUFFIX##_1, WTYPE, LOAD, 1)                                                      \
    DEFINE_DOT1(dot1_##SUFFIX##_2, WTYPE, LOAD, 2)                                                      \
    DEFINE_DOT1_DISPATCH(SUFFIX, WTYPE)
#ifdef DSV3_AVX512
// The same products on 16-lane registers, for CPUs with AVX-512 (F, BW, VL, DQ; the build adds those flags
// only where the CPU has them). Every lane does the arithmetic of one lane of the 8-wide kernels above, in the
// same order, so results are bit for bit the AVX2 build's: dot2's accumulators for weight rows w0 and w1 sit
// side by side in one register (lanes 0-7 and 8-15: [a0 | a1], the weights [w0[k..k+8) | w1[k..k+8)], the
// activations x[k..k+8) in both halves); dot1's two accumulator sets over 16 columns are one register
// ([a0 | b0] over 16 contiguous weights). Half the multiply-adds and widenings per weight, which is what
// limits batched decode (the lm_head product with 8 rows ran at ~145 GFLOP/s, compute-bound, on 8-wide
// registers). Eight activation rows (two full tiles of four, each row's arithmetic that of a tile of four)
// share one widening of each weight vector: 32 registers hold their 8 accumulators.
#define LDZ_PAIR_bf16(p0, p1, k) load2x8_bf16((p0) + (k), (p1) + (k))
#define LDZ_PAIR_f32(p0, p1, k) _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps((p0) + (k))), _mm256_loadu_ps((p1) + (k)), 1)
#define LDZ_PAIR_fp8(p0, p1, k) _mm512_insertf32x8(_mm512_castps256_ps512(LD_fp8(p0, k)), LD_fp8(p1, k), 1)
#define LDZ_16_bf16(p, k) load16_bf16((p) + (k))
#define LDZ_16_f32(p, k) _mm512_loadu_ps((p) + (k))
#define LDZ_16_fp8(p, k) load16z_fp8((p) + (k), srow[(k) >> sbs], rnd)
static inline __m512 load2x8_bf16(const uint16_t *p0, const uint16_t *p1) {
    const __m256i h = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p0)),
                                              _mm_loadu_si128((const __m128i *)p1), 1);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline __m512 load16z_fp8(const uint8_t *p, float scale, int round) {
    __m256 lo, hi;
    load16_fp8(p, scale, round, &lo, &hi);
    return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}
static inline __m512 bcast8(const float *p) { return _mm512_broadcast_f32x8(_mm256_loadu_ps(p)); }
static inline __m256 lo8(__m512 v) { return _mm512_castps512_ps256(v); }
static inline __m256 hi8(__m512 v) { return _mm512_extractf32x8_ps(v, 1); }

#define DEFINE_DOT2Z(NAME, WTYPE, LOAD, MT)                                                             \
    static inline void NAME(const float *x, int64_t xs, const WTYPE *w0, const WTYPE *w1, int64_t K,    \
                            const float *srow, int sbs, int rnd, float out[8][2]) {                     \
        (void)srow, (void)sbs, (void)rnd;                                                               \
        __m512 a[MT], b[MT];                                                                            \
        _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++) a[m] = b[m] = _mm512_setzero_ps();         \
        int64_t k = 0;                                                                                  \
        for (; MT <= 2 && k + 16 <= K; k += 16) {                                                       \
            _mm_prefetch((const char *)(w0 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                         \
            _mm_prefetch((const char *)(w1 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                         \
            const __m512 v = LDZ_PAIR_##LOAD(w0, w1, k), u = LDZ_PAIR_##LOAD(w0, w1, k + 8);            \
            _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) {                                      \
                a[m] = _mm512_fmadd_ps(v, bcast8(x + m * xs + k), a[m]);                                \
                b[m] = _mm512_fmadd_ps(u, bcast8(x + m * xs + k + 8), b[m]);                            \
            }                                                                                           \
        }                                                                                               \
        for (; k + 8 <= K; k += 8) {                                                                    \
            _mm_prefetch((const char *)(w0 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                         \
            _mm_prefetch((const char *)(w1 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                         \
            const __m512 v = LDZ_PAIR_##LOAD(w0, w1, k);                                                \
            _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++)                                        \
                a[m] = _mm512_fmadd_ps(v, bcast8(x + m * xs + k), a[m]);                                \
        }                                                                                               \
        _Pragma("GCC unroll 8") for (int m = 0; m < MT; m++) {                                          \
            float s0 = hsum(MT <= 2 ? _mm256_add_ps(lo8(a[m]), lo8(b[m])) : lo8(a[m]));                 \
            float s1 = hsum(MT <= 2 ? _mm256_add_ps(hi8(a[m]), hi8(b[m])) : hi8(a[m]));                 \
            for (int64_t kk = k; kk < K; kk++) {                                                        \
                s0 = fmaf(x[m * xs + kk], (float)LD_##LOAD##_1(w0, kk), s0);                             \
                s1 = fmaf(x[m * xs + kk], (float)LD_##LOAD##_1(w1, kk), s1);                             \
            }                                                                                           \
            out[m][0] = s0;                                                                             \
            out[m][1] = s1;                                                                             \
        }                                                                                               \
    }
#define DEFINE_DOT2Z_ALL(SUFFIX, WTYPE)                                                                 \
    DEFINE_DOT2Z(dot2_##SUFFIX##_1, WTYPE, SUFFIX, 1)                                                   \
    DEFINE_DOT2Z(dot2_##SUFFIX##_2, WTYPE, SUFFIX, 2)                                                   \
    DEFINE_DOT2Z(dot2_##SUFFIX##_3, WTYPE, SUFFIX, 3)                                                   \
    DEFINE_DOT2Z(dot2_##SUFFIX##_4, WTYPE, SUFFIX, 4)                                                   \
    DEFINE_DOT2Z(dot2_##SUFFIX##_8, WTYPE, SUFFIX, 8)                                                   \
    DEFINE_DOT2_DISPATCH(SUFFIX, WTYPE, 8)

#define DEFINE_DOT1Z(NAME, WTYPE, LOAD, MT)                                                             \
    static inline void NAME(const float *x, int64_t xs, const WTYPE *w0, int64_t K, const float *srow, int sbs, \
                            int rnd, float out[2]) {                                                    \
        (void)srow, (void)sbs, (void)rnd;                                                               \
        __m512 ab[MT];                                                                                  \
        _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) ab[m] = _mm512_setzero_ps();               \
        int64_t k = 0;                                                                                  \
        for (; k + 16 <= K; k += 16) {                                                                  \
            if ((k * sizeof(WTYPE)) % 64 == 0)                                                          \
                _mm_prefetch((const char *)(w0 + k) + DOT1_PREFETCH, _MM_HINT_T0);                      \
            const __m512 v = LDZ_16_##LOAD(w0, k);                                                      \
            _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++)                                        \
                ab[m] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + m * xs + k), ab[m]);                     \
        }                                                                                               \
        __m256 a0[MT], b0[MT];                                                                          \
        _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) a0[m] = lo8(ab[m]), b0[m] = hi8(ab[m]);    \
        for (; k + 8 <= K; k += 8) {                                                                    \
            const __m256 v0 = LD_##LOAD(w0, k);                                                         \
            _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++)                                        \
                a0[m] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + m * xs + k), a0[m]);                    \
        }                                                                                               \
        _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) {                                          \
            float s0 = hsum(_mm256_add_ps(a0[m], b0[m]));                                               \
            for (int64_t kk = k; kk < K; kk++) s0 = fmaf(x[m * xs + kk], (float)LD_##LOAD##_1(w0, kk), s0); \
            out[m] = s0;                                                                                \
        }                                                                                               \
    }
#define DEFINE_DOT1Z_ALL(SUFFIX, WTYPE)                                                                 \
    DEFINE_DOT1Z(dot1_##SUFFIX##_1, WTYPE, SUFFIX, 1)                                                   \
    DEFINE_DOT1Z(dot1_##SUFFIX##_2, WTYPE, SUFFIX, 2)                                                   \
    DEFINE_DOT1_DISPATCH(SUFFIX, WTYPE)
DEFINE_DOT1Z_ALL(bf16, uint16_t)
DEFINE_DOT1Z_ALL(f32, float)
DEFINE_DOT1Z_ALL(fp8, uint8_t)
DEFINE_DOT2Z_ALL(bf16, uint16_t)
DEFINE_DOT2Z_ALL(f32, float)
DEFINE_DOT2Z_ALL(fp8, uint8_t)
#define DOT2_WIDEST 8  // activation rows one dot2 call takes
#else
DEFINE_DOT1_ALL(bf16, uint16_t, LD_bf16)
DEFINE_DOT1_ALL(f32, float, LD_f32)
DEFINE_DOT1_ALL(fp8, uint8_t, LD_fp8)
DEFINE_DOT2_ALL(bf16, uint16_t, LD_bf16)
DEFINE_DOT2_ALL(f32, float, LD_f32)
DEFINE_DOT2_ALL(fp8, uint8_t, LD_fp8)
#define DOT2_WIDEST 4
#endif

// Three contiguous rows (attention's key blocks, bf16 or fp32) against three or four activation rows: twelve
// register accumulators instead of eight hide the FMA latency (1.27x the multiply-adds per second with
// four rows, one core, L2-resident, measured). Per (row, weight row) the arithmetic is dot2's for three or
// four rows, in the same order (one 8-wide accumulator, hsum, scalar tail): the same bits.
#define DEFINE_DOT3(NAME, WTYPE, LOAD, MT)                                                              \
    static inline void NAME(const float *x, int64_t xs, const WTYPE *w0, const WTYPE *w1, const WTYPE *w2, \
                            int64_t K, float out[4][3]) {                                               \
        __m256 a0[MT], a1[MT], a2[MT];                                                                  \
        _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) a0[m] = a1[m] = a2[m] = _mm256_setzero_ps(); \
        int64_t k = 0;                                                                                  \
        for (; k + 8 <= K; k += 8) {                                                                    \
            _mm_prefetch((const char *)(w2 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                         \
            const __m256 v0 = LOAD(w0, k), v1 = LOAD(w1, k), v2 = LOAD(w2, k);                          \
            _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                      \
                const __m256 xv = _mm256_loadu_ps(x + m * xs + k);                                      \
                a0[m] = _mm256_fmadd_ps(v0, xv, a0[m]);                                                 \
                a1[m] = _mm256_fmadd_ps(v1, xv, a1[m]);                                                 \
                a2[m] = _mm256_fmadd_ps(v2, xv, a2[m]);                                                 \
            }                                                                                           \
        }                                                                                               \
        _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                          \
            float s0 = hsum(a0[m]), s1 = hsum(a1[m]), s2 = hsum(a2[m]);                                 \
            for (int64_t kk = k; kk < K; kk++) {                                                        \
                const float xk = x[m * xs + kk];                                                        \
                s0 += xk * (float)LOAD##_1(w0, kk);                                                     \
                s1 += xk * (float)LOAD##_1(w1, kk);                                                     \
                s2 += xk * (float)LOAD##_1(w2, kk);                                                     \
            }                                                                                           \
            out[m][0] = s0, out[m][1] = s1, out[m][2] = s2;                                             \
        }                                                                                               \
    }
#define DEFINE_DOT3_ALL(SUFFIX, WTYPE, LOAD)                                                            \
    DEFINE_DOT3(dot3_##SUFFIX##_3, WTYPE, LOAD, 3)                                                      \
    DEFINE_DOT3(dot3_##SUFFIX##_4, WTYPE, LOAD, 4)                                                      \
    static inline void dot3_##SUFFIX(const float *x, int64_t xs, int mt, const WTYPE *w, int64_t ws, int64_t K, \
                                     float out[4][3]) {                                                 \
        if (mt == 3)                                                                                    \
            dot3_##SUFFIX##_3(x, xs, w, w + ws, w + 2 * ws, K, out);                                    \
        else                                                                                            \
            dot3_##SUFFIX##_4(x, xs, w, w + ws, w + 2 * ws, K, out);                                    \
    }
DEFINE_DOT3_ALL(bf16, uint16_t, LD_bf16)
DEFINE_DOT3_ALL(f32, float, LD_f32)

// int8 weights times int16 activations (`quantize_rows_i16`): 16 products per vpmaddwd into int32 lanes,
// 1.5-1.7x the int8 -> fp32 widening kernel's multiply-adds per cycle (measured, one core, L2-resident).
// Each lane gains at most 2 * 127 * 32767 per 16 columns, so the int32 sums are emptied into fp32 every
// I16_CHUNK columns (128 steps < 2**31 / 8.3e6). out[m][j] = the dot product in units of the row's scale.
#define I16_CHUNK 2048
#define DEFINE_DOT2_I16(NAME, MT)                                                                       \
    static inline void NAME(const int16_t *x, int64_t xs, const int8_t *w0, const int8_t *w1, int64_t K, \
                            float out[4][2]) {                                                          \
        float s0[MT], s1[MT];                                                                           \
        _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) s0[m] = s1[m] = 0.0f;                      \
        const int64_t K16 = K / 16 * 16;                                                                \
        for (int64_t c0 = 0; c0 < K16; c0 += I16_CHUNK) {                                               \
            const int64_t c1 = c0 + I16_CHUNK < K16 ? c0 + I16_CHUNK : K16;                             \
            __m256i a0[MT], a1[MT];                                                                     \
            _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) a0[m] = a1[m] = _mm256_setzero_si256(); \
            for (int64_t k = c0; k < c1; k += 16) {                                                     \
                _mm_prefetch((const char *)(w0 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                     \
                _mm_prefetch((const char *)(w1 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                     \
                const __m256i v0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w0 + k)));   \
                const __m256i v1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w1 + k)));   \
                _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                  \
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + m * xs + k));           \
                    a0[m] = _mm256_add_epi32(a0[m], _mm256_madd_epi16(v0, xv));                         \
                    a1[m] = _mm256_add_epi32(a1[m], _mm256_madd_epi16(v1, xv));                         \
                }                                                                                       \
            }                                                                                           \
            _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                      \
                s0[m] += hsum(_mm256_cvtepi32_ps(a0[m]));                                               \
                s1[m] += hsum(_mm256_cvtepi32_ps(a1[m]));                                               \
            }                                                                                           \
        }                                                                                               \
        _Pragma("GCC unroll 4") for (int m = 0; m < MT; m++) {                                          \
            int32_t t0 = 0, t1 = 0;                                                                     \
            for (int64_t k = K16; k < K; k++) t0 += x[m * xs + k] * w0[k], t1 += x[m * xs + k] * w1[k];  \
            out[m][0] = s0[m] + (float)t0;                                                              \
            out[m][1] = s1[m] + (float)t1;                                                              \
        }                                                                                               \
    }
DEFINE_DOT2_I16(dot2_i8q_1, 1)
DEFINE_DOT2_I16(dot2_i8q_2, 2)
DEFINE_DOT2_I16(dot2_i8q_3, 3)
DEFINE_DOT2_I16(dot2_i8q_4, 4)
// One or two int16 activation rows against ONE int8 weight row, in one sequential stream (`DEFINE_DOT1`'s
// reason): 32 columns per step into two int32 sets, the same integer lane sums as dot2_i8q's, so the same
// float.
#define DEFINE_DOT1_I16(NAME, MT)                                                                       \
    static inline void NAME(const int16_t *x, int64_t xs, const int8_t *w0, int64_t K, float out[2]) {   \
        float s0[MT];                                                                                   \
        _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) s0[m] = 0.0f;                              \
        const int64_t K16 = K / 16 * 16;                                                                \
        for (int64_t c0 = 0; c0 < K16; c0 += I16_CHUNK) {                                               \
            const int64_t c1 = c0 + I16_CHUNK < K16 ? c0 + I16_CHUNK : K16;                             \
            __m256i a0[MT], b0[MT];                                                                     \
            _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) a0[m] = b0[m] = _mm256_setzero_si256(); \
            int64_t k = c0;                                                                             \
            for (; k + 32 <= c1; k += 32) {                                                             \
                if (k % 64 == 0) _mm_prefetch((const char *)(w0 + k) + DOT1_PREFETCH, _MM_HINT_T0);     \
                const __m256i r = _mm256_loadu_si256((const __m256i *)(w0 + k));                        \
                const __m256i lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(r));                     \
                const __m256i hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(r, 1));                \
                _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) {                                  \
                    const int16_t *xm = x + m * xs + k;                                                 \
                    a0[m] = _mm256_add_epi32(a0[m], _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)xm))); \
                    b0[m] = _mm256_add_epi32(b0[m], _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xm + 16)))); \
                }                                                                                       \
            }                                                                                           \
            if (k < c1) { /* 16 columns left */                                                         \
                const __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w0 + k)));   \
                _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++)                                    \
                    a0[m] = _mm256_add_epi32(a0[m], _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)(x + m * xs + k)))); \
            }                                                                                           \
            _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++)                                        \
                s0[m] += hsum(_mm256_cvtepi32_ps(_mm256_add_epi32(a0[m], b0[m])));                      \
        }                                                                                               \
        _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) {                                          \
            int32_t t0 = 0;                                                                             \
            for (int64_t k = K16; k < K; k++) t0 += x[m * xs + k] * w0[k];                              \
            out[m] = s0[m] + (float)t0;                                                                 \
        }                                                                                               \
    }
DEFINE_DOT1_I16(dot1_i8q_1, 1)
DEFINE_DOT1_I16(dot1_i8q_2, 2)
static inline void dot1_i8q(const int16_t *x, int64_t xs, int mt, const int8_t *w0, int64_t K, float out[2]) {
    if (mt == 1)
        dot1_i8q_1(x, xs, w0, K, out);
    else
        dot1_i8q_2(x, xs, w0, K, out);
}

static inline void dot2_i8q(const int16_t *x, int64_t xs, int mt, const int8_t *w0, const int8_t *w1, int64_t K,
                            float out[4][2]) {
    switch (mt) {
        case 1: dot2_i8q_1(x, xs, w0, w1, K, out); break;
        case 2: dot2_i8q_2(x, xs, w0, w1, K, out); break;
        case 3: dot2_i8q_3(x, xs, w0, w1, K, out); break;
        default: dot2_i8q_4(x, xs, w0, w1, K, out); break;
    }
}

// Activation rows for int8 weights: x[m] (fp32, row stride xs, K values) ~ q[m] * scale[m] with q int16
// (same row stride), scale = max |x[m]| / 32767, q = x * (32767 / max |x[m]|) rounded to the nearest
// integer (ties to even) in fp32. Relative to the
// row's largest value each activation is off by at most 2**-16, far below the int8 weights' own rounding
// (2**-8 of their row's largest). A row holding inf or NaN gets scale NaN (and zeros): all its outputs are NaN.
// int8 weights always come with these rows (`rows_times_weight` has no fp32 path for them).
static void quantize_rows_i16(const float *x, int64_t xs, int64_t M, int64_t K, int16_t *q, float *scale) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * xs;
        int16_t *qm = q + m * xs;
        float amax = 0.0f;
        int finite = 1;
        for (int64_t k = 0; k < K; k++) {
            const float a = fabsf(xm[k]);
            finite &= a <= FLT_MAX;
            amax = a > amax ? a : amax;
        }
        if (!finite) {
            scale[m] = NAN;
            memset(qm, 0, sizeof(int16_t) * (size_t)K);
            continue;
        }
        scale[m] = amax > 0.0f ? amax / 32767.0f : 1.0f;
        const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        const __m256 vinv = _mm256_set1_ps(inv), lim = _mm256_set1_ps(32767.0f);
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            const __m256 a = _mm256_min_ps(_mm256_mul_ps(_mm256_loadu_ps(xm + k), vinv), lim);
            const __m256 b = _mm256_min_ps(_mm256_mul_ps(_mm256_loadu_ps(xm + k + 8), vinv), lim);
            const __m256i packed = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
            _mm256_storeu_si256((__m256i *)(qm + k), _mm256_permute4x64_epi64(packed, 0xD8));  // packs interleaves lanes
        }
        for (; k < K; k++) {
            const float v = xm[k] * inv;
            qm[k] = (int16_t)lrintf(v < 32767.0f ? v : 32767.0f);
        }
    }
}

// FP8 weights' scales: grid[(n >> rows_log2) * grid_rs + (k >> cols_log2)] for weight row n, column k
// (blocks of powers of two, rows_log2 >= 1); round: the dequantized weights are rounded to bf16 (bf16 models).
// act: 0 = weights dequantized value by value (fp8_compute 'dequant'); 1 = fp8_compute 'gemm': activations
// quantized to e4m3 per token per column block (`quantize_rows_e4m3`), block sums scaled once; 2 = 'gemm'
// with UE8M0 (power-of-two) activation scales.
typedef struct {
    const float *grid;
    int64_t grid_rs, grid_es;  // grid_es: one expert's grid (stacked experts), else 0
    int rows_log2, cols_log2, round, act;
} fp8_grid;

// fp32 -> the nearest e4m3fn value (ties to even), as a float; |v| <= 448 here (scaled activations). Rounding
// to 3 mantissa bits is adding and subtracting 1.5 * 2**(e + 20) for v's exponent e (at least -6, e4m3's
// smallest normal exponent, below which the grid is the subnormals' 2**-9), as torch's cast rounds.
static inline float round_e4m3(float v) {
    int e;
    frexpf(v, &e);  // v = f * 2**e, 0.5 <= |f| < 1: v's exponent is e - 1
    e = e - 1 < -6 ? -6 : e - 1;
    const float magic = ldexpf(1.5f, e + 20);
    const volatile float t = v + magic;  // volatile: keep the two roundings as written
    return t - magic;
}

// Activation rows for FP8 weights under 'gemm': x[m] (M rows of K fp32, contiguous) -> q[m] (e4m3 values as
// floats, same layout) and qs[m * G + g] for the G = ceil(K / 2**gl2) column groups: what `act_quant` does
// (amax clamped to 1e-4, scale = amax / 448, with ue8m0 2**ceil(log2(scale)), q = e4m3(x / scale)).
static void quantize_rows_e4m3(const float *x, int64_t M, int64_t K, int gl2, int ue8m0, float *q, float *qs) {
    const int64_t gw = (int64_t)1 << gl2, G = (K + gw - 1) / gw;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t k0 = g * gw, k1 = k0 + gw < K ? k0 + gw : K;
            float amax = 1e-4f;
            for (int64_t k = k0; k < k1; k++) amax = fabsf(x[m * K + k]) > amax ? fabsf(x[m * K + k]) : amax;
            float scale = amax / 448.0f;
            if (ue8m0) scale = exp2f(ceilf(log2f(scale)));
            qs[m * G + g] = scale;
            for (int64_t k = k0; k < k1; k++) q[m * K + k] = round_e4m3(x[m * K + k] / scale);
        }
}

// FP8 weights under 'gemm' for one or two activation rows (x: e4m3 values, xsc: their group scales, G a row)
// against weight rows w0, w1 (block scales ws0, ws1 of one row block): per column block, the sum of
// e4m3 x e4m3 products (exact in fp32 per product) times the two scales once, as the official FP8 GEMM
// accumulates; the fp32 sum of the blocks. One row keeps lo/hi halves in separate chains (FMA latency).
#define DEFINE_DOT2_FP8G(NAME, MT)                                                                      \
    static inline void NAME(const float *x, int64_t xs, const uint8_t *w0, const uint8_t *w1, int64_t K, \
                            const float *ws0, const float *ws1, int sbs, const float *xsc, int64_t G,   \
                            float out[4][2]) {                                                          \
        __m256 t0[MT], t1[MT];                                                                          \
        _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) t0[m] = t1[m] = _mm256_setzero_ps();       \
        const int64_t bw = (int64_t)1 << sbs;                                                           \
        for (int64_t g = 0; g * bw < K; g++) {                                                          \
            const int64_t c0 = g * bw, c1 = c0 + bw < K ? c0 + bw : K;                                  \
            __m256 a0[MT], a1[MT], b0[MT], b1[MT];                                                      \
            _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) a0[m] = a1[m] = b0[m] = b1[m] = _mm256_setzero_ps(); \
            int64_t k = c0;                                                                             \
            for (; k + 16 <= c1; k += 16) {                                                             \
                _mm_prefetch((const char *)(w0 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                     \
                _mm_prefetch((const char *)(w1 + k) + PREFETCH_AHEAD, _MM_HINT_T0);                     \
                __m256 l0, h0, l1, h1;                                                                  \
                fp8x16_scaled_down(w0 + k, &l0, &h0);                                                   \
                fp8x16_scaled_down(w1 + k, &l1, &h1);                                                   \
                _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) {                                  \
                    const __m256 xv = _mm256_loadu_ps(x + m * xs + k), xu = _mm256_loadu_ps(x + m * xs + k + 8); \
                    a0[m] = _mm256_fmadd_ps(l0, xv, a0[m]);                                             \
                    a1[m] = _mm256_fmadd_ps(l1, xv, a1[m]);                                             \
                    if (MT == 1) {                                                                      \
                        b0[m] = _mm256_fmadd_ps(h0, xu, b0[m]);                                         \
                        b1[m] = _mm256_fmadd_ps(h1, xu, b1[m]);                                         \
                    } else {                                                                            \
                        a0[m] = _mm256_fmadd_ps(h0, xu, a0[m]);                                         \
                        a1[m] = _mm256_fmadd_ps(h1, xu, a1[m]);                                         \
                    }                                                                                   \
                }                                                                                       \
            }                                                                                           \
            _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) {                                      \
                float r0 = 0.0f, r1 = 0.0f;                                                             \
                for (int64_t kk = k; kk < c1; kk++) {                                                   \
                    r0 += x[m * xs + kk] * (fp8_to_f32(w0[kk]) * (1.0f / 256.0f));                      \
                    r1 += x[m * xs + kk] * (fp8_to_f32(w1[kk]) * (1.0f / 256.0f));                      \
                }                                                                                       \
                const __m256 s0 = _mm256_add_ps(_mm256_add_ps(a0[m], b0[m]), _mm256_setr_ps(r0, 0, 0, 0, 0, 0, 0, 0)); \
                const __m256 s1 = _mm256_add_ps(_mm256_add_ps(a1[m], b1[m]), _mm256_setr_ps(r1, 0, 0, 0, 0, 0, 0, 0)); \
                const float xg = xsc[m * G + g] * 256.0f;                                               \
                t0[m] = _mm256_fmadd_ps(s0, _mm256_set1_ps(xg * ws0[g]), t0[m]);                        \
                t1[m] = _mm256_fmadd_ps(s1, _mm256_set1_ps(xg * ws1[g]), t1[m]);                        \
            }                                                                                           \
        }                                                                                               \
        _Pragma("GCC unroll 2") for (int m = 0; m < MT; m++) out[m][0] = hsum(t0[m]), out[m][1] = hsum(t1[m]); \
    }
DEFINE_DOT2_FP8G(dot2_fp8g_1, 1)
DEFINE_DOT2_FP8G(dot2_fp8g_2, 2)
// Up to four activation rows: pairs of rows (the weight rows come from L1 the second time).
static inline void dot2_fp8g(const float *x, int64_t xs, int mt, const uint8_t *w0, const uint8_t *w1, int64_t K,
                             const float *ws0, const float *ws1, int sbs, const float *xsc, int64_t G, float out[4][2]) {
    for (int m0 = 0; m0 < mt; m0 += 2) {
        float part[4][2] = {{0.0f}};
        if (mt - m0 >= 2)
            dot2_fp8g_2(x + m0 * xs, xs, w0, w1, K, ws0, ws1, sbs, xsc + m0 * G, G, part);
        else
            dot2_fp8g_1(x + m0 * xs, xs, w0, w1, K, ws0, ws1, sbs, xsc + m0 * G, G, part);
        for (int m = 0; m < 2 && m0 + m < mt; m++) out[m0 + m][0] = part[m][0], out[m0 + m][1] = part[m][1];
    }
}

static inline fp8_grid expert_grid(const fp8_grid *q, int64_t e) {
    fp8_grid g = *q;
    g.grid += e * q->grid_es;
    return g;
}

// Row n of weight wa and row n of weight wb (bf16, fp32 or int8; row stride ws) for n < count, one or two activation
// rows: ya[m, n] and yb[m, n] (row stride ys), each times its row's scale sa[n] / sb[n] where given. One `dot2` a
// pair, so each row's arithmetic is `dot1`'s (the same bits) while the two weights stream side by side.
static void pair_rows(const float *x, const int16_t *xq, const float *xqs, int64_t xs, int M, const void *wa,
                      const void *wb, int wtype, int64_t ws, const float *sa, const float *sb, int64_t count, int64_t K,
                      void *ya, void *yb, int ytype, int64_t ys) {
    float out[8][2];
    for (int64_t n = 0; n < count; n++) {
        if (wtype == T_I8) {  // int16 rows (callers quantize x), the products in units of each row's scale
            dot2_i8q(xq, xs, M, (const int8_t *)wa + n * ws, (const int8_t *)wb + n * ws, K, out);
            for (int m = 0; m < M; m++) out[m][0] *= xqs[m], out[m][1] *= xqs[m];
        } else if (wtype == T_BF16)
            dot2_bf16(x, xs, M, (const uint16_t *)wa + n * ws, (const uint16_t *)wb + n * ws, K, NULL, 0, 0, out);
        else
            dot2_f32(x, xs, M, (const float *)wa + n * ws, (const float *)wb + n * ws, K, NULL, 0, 0, out);
        const float s0 = sa ? sa[n] : 1.0f, s1 = sb ? sb[n] : 1.0f;
        for (int m = 0; m < M; m++)
            store1(ya, m * ys + n, ytype, out[m][0] * s0), store1(yb, m * ys + n, ytype, out[m][1] * s1);
    }
}

// Rows [r0, r1) of one or two activation rows times a bf16, fp32 or int8 weight (int8: xq, xqs as in
// `rows_times_weight`), walked as two sequential streams: the first half of the rows beside the second, a pair at
// a time (`dot2`: each row's arithmetic that of `dot1`, the same bits); an odd middle row goes alone. Two streams
// keep twice the loads and FMA chains in flight: on 1 GiB of bf16 weights in 2 MiB pages, two threads, 28.8-31.5
// GB/s against 25.2-28.0 one row at a time with 2 KiB rows (K = 1024), 30.8-31.5 against 28.6-29.5 with 16 KiB
// rows; a thread's whole share split in two (what `dsv3_linear` does) or 16-row blocks split in two
// (`rows_times_weight`, 28.0-28.4) both gain, but 512-byte rows lose there (24.3-25.1 against 26.7-27.6). Decode
// b1 on `small`, the two builds in alternating processes: bf16 50 -> 60 tokens/s, int8 74-80 -> 86-92.
static void rows_in_two_streams(const float *x, const int16_t *xq, const float *xqs, int64_t xs, int M, const void *w,
                                int wtype, int64_t ws, const float *scale, int64_t r0, int64_t r1, int64_t K, void *y,
                                int ytype, int64_t ys) {
    const int64_t h = (r1 - r0) / 2, b = r0 + h + (r1 - r0) % 2;  // rows r0 + i and b + i; an odd middle row alone
    const size_t wsize = wtype == T_F32 ? 4 : wtype == T_BF16 ? 2 : 1, ysize = ytype == T_BF16 ? 2 : 4;
    const char *wc = (const char *)w;
    pair_rows(x, xq, xqs, xs, M, wc + (size_t)(r0 * ws) * wsize, wc + (size_t)(b * ws) * wsize, wtype, ws,
              scale ? scale + r0 : NULL, scale ? scale + b : NULL, h, K, (char *)y + (size_t)r0 * ysize,
              (char *)y + (size_t)b * ysize, ytype, ys);
    if ((r1 - r0) % 2) {
        const int64_t mid = r0 + h;
        float v[2];
        if (wtype == T_I8) {
            dot1_i8q(xq, xs, M, (const int8_t *)w + mid * ws, K, v);
            for (int m = 0; m < M; m++) v[m] *= xqs[m];
        } else if (wtype == T_BF16)
            dot1_bf16(x, xs, M, (const uint16_t *)w + mid * ws, K, NULL, 0, 0, v);
        else
            dot1_f32(x, xs, M, (const float *)w + mid * ws, K, NULL, 0, 0, v);
        for (int m = 0; m < M; m++) store1(y, m * ys + mid, ytype, v[m] * (scale ? scale[mid] : 1.0f));
    }
}

// y[m, n] for n in [n0, n1) and all M rows: x (fp32, row stride xs) times weight rows w (row stride ws);
// scale: int8's per-row scales, fq: FP8's block scales (else NULL). xq: x's rows quantized by
// `quantize_rows_i16` (same row stride, scales xqs) for int8 weights, else NULL. key_block: the rows are one
// attention key block (64 contiguous cache rows, 18-36 KB, reused at once by the probabilities x latents):
// with three or more activation rows they go three at a time (`dot3_*`, the same bits as in pairs; 0.89-0.96x
// the time of the whole attention at 4096 keys). Weights streamed from memory keep the pairs: three rows at
// a time measured slower there (0.73-0.83x at 4 and 8 rows on the 265 MB lm_head).
static void rows_times_weight(const float *x, const int16_t *xq, const float *xqs, int64_t xs, int64_t M,
                              const void *w, int wtype, int64_t ws, const float *scale, const fp8_grid *fq, int64_t n0,
                              int64_t n1, int64_t K, void *y, int ytype, int64_t ys, int key_block) {
    float out[8][2], out3[4][3];
    int64_t n = n0;
    for (; key_block && M >= 3 && (wtype == T_BF16 || wtype == T_F32) && n + 3 <= n1; n += 3) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mt = (int)(M - m0 < 4 ? M - m0 : 4);
            const float *xm = x + m0 * xs;
            if (mt < 3) {  // the last one or two activation rows: dot2 on (n, n+1), then (n+2, n+2)
                for (int64_t p = 0; p < 3; p += 2) {
                    const int64_t np = n + p, np_b = p ? np : np + 1;
                    if (wtype == T_BF16)
                        dot2_bf16(xm, xs, mt, (const uint16_t *)w + np * ws, (const uint16_t *)w + np_b * ws, K, NULL,
                                  0, 0, out);
                    else
                        dot2_f32(xm, xs, mt, (const float *)w + np * ws, (const float *)w + np_b * ws, K, NULL, 0, 0,
                                 out);
                    for (int m = 0; m < mt; m++) {
                        out3[m][p] = out[m][0];
                        if (!p) out3[m][1] = out[m][1];
                    }
                }
            } else if (wtype == T_BF16) {
                dot3_bf16(xm, xs, mt, (const uint16_t *)w + n * ws, ws, K, out3);
            } else {
                dot3_f32(xm, xs, mt, (const float *)w + n * ws, ws, K, out3);
            }
            for (int m = 0; m < mt; m++)
                for (int j = 0; j < 3; j++) store1(y, (m0 + m) * ys + n + j, ytype, out3[m][j]);
        }
    }
    if (M <= 2 && !key_block && wtype != T_FP8 && K * (wtype == T_F32 ? 4 : wtype == T_BF16 ? 2 : 1) >= 1024) {
        rows_in_two_streams(x, xq, xqs, xs, (int)M, w, wtype, ws, scale, n0, n1, K, y, ytype, ys);  // halves together
        return;
    }
    if (M <= 2 && !key_block && !(wtype == T_FP8 && fq->act)) {  // one weight row at a time (`DEFINE_DOT1`)
        const int mt = (int)M;
        for (; n < n1; n++) {
            float v[2];
            if (wtype == T_I8) {
                dot1_i8q(xq, xs, mt, (const int8_t *)w + n * ws, K, v);
                for (int m = 0; m < mt; m++) v[m] *= xqs[m];
            } else if (wtype == T_BF16)
                dot1_bf16(x, xs, mt, (const uint16_t *)w + n * ws, K, NULL, 0, 0, v);
            else if (wtype == T_FP8)
                dot1_fp8(x, xs, mt, (const uint8_t *)w + n * ws, K, fq->grid + (n >> fq->rows_log2) * fq->grid_rs,
                         fq->cols_log2, fq->round, v);
            else
                dot1_f32(x, xs, mt, (const float *)w + n * ws, K, NULL, 0, 0, v);
            for (int m = 0; m < mt; m++) store1(y, m * ys + n, ytype, v[m] * (scale ? scale[n] : 1.0f));
        }
        return;
    }
    const int eight_rows = DOT2_WIDEST == 8 && (wtype == T_BF16 || wtype == T_F32 || (wtype == T_FP8 && !fq->act));
    for (; n < n1; n += 2) {
        const int64_t n_b = n + 1 < n1 ? n + 1 : n;  // an odd tail row is computed twice, stored once
        for (int64_t m0 = 0, mt; m0 < M; m0 += mt) {  // up to four rows at a time (dot2_*_N keep them in registers)
            mt = M - m0 < 4 ? M - m0 : 4;
            if (eight_rows && M - m0 >= 8) mt = 8;  // two tiles of four, the same arithmetic per row
            const float *xm = x + m0 * xs;
            if (wtype == T_I8) {  // always with int16 rows (callers quantize x)
                dot2_i8q(xq + m0 * xs, xs, mt, (const int8_t *)w + n * ws, (const int8_t *)w + n_b * ws, K, out);
                for (int m = 0; m < mt; m++) out[m][0] *= xqs[m0 + m], out[m][1] *= xqs[m0 + m];
            } else if (wtype == T_BF16)
                dot2_bf16(xm, xs, mt, (const uint16_t *)w + n * ws, (const uint16_t *)w + n_b * ws, K, NULL, 0, 0, out);
            else if (wtype == T_FP8 && fq->act)  // x: e4m3 values, xqs: their group scales (quantize_rows_e4m3)
                dot2_fp8g(xm, xs, mt, (const uint8_t *)w + n * ws, (const uint8_t *)w + n_b * ws, K,
                          fq->grid + (n >> fq->rows_log2) * fq->grid_rs,
                          fq->grid + (n_b >> fq->rows_log2) * fq->grid_rs, fq->cols_log2,
                          xqs + m0 * ((K + ((int64_t)1 << fq->cols_log2) - 1) >> fq->cols_log2),
                          (K + ((int64_t)1 << fq->cols_log2) - 1) >> fq->cols_log2, out);
            else if (wtype == T_FP8)  // rows n and n_b share a row block: blocks have an even number of rows
                dot2_fp8(xm, xs, mt, (const uint8_t *)w + n * ws, (const uint8_t *)w + n_b * ws, K,
                         fq->grid + (n >> fq->rows_log2) * fq->grid_rs, fq->cols_log2, fq->round, out);
            else
                dot2_f32(xm, xs, mt, (const float *)w + n * ws, (const float *)w + n_b * ws, K, NULL, 0, 0, out);
            const float s0 = scale ? scale[n] : 1.0f, s1 = scale ? scale[n_b] : 1.0f;
            for (int m = 0; m < mt; m++) {
                store1(y, (m0 + m) * ys + n, ytype, out[m][0] * s0);
                if (n_b != n) store1(y, (m0 + m) * ys + n_b, ytype, out[m][1] * s1);
            }
        }
    }
}

// x (any type) -> a contiguous fp32 copy [G*M, K] (fp32 input is copied too: rows may be strided).
static float *widen_rows(const void *x, int xtype, int64_t G, int64_t M, int64_t K, int64_t x_gs, int64_t x_ms) {
    float *buf = (float *)aligned_alloc(64, (size_t)((G * M * K * 4 + 63) / 64 * 64 + 64));
    if (!buf) return NULL;
    for (int64_t g = 0; g < G; g++)
        for (int64_t m = 0; m < M; m++) {
            float *dst = buf + (g * M + m) * K;
            const int64_t off = g * x_gs + m * x_ms;
            if (xtype == T_F32)
                memcpy(dst, (const float *)x + off, (size_t)K * 4);
            else
                for (int64_t k = 0; k < K; k++) dst[k] = load1(x, off + k, xtype);
        }
    return buf;
}

// Int16 copies of M contiguous fp32 rows of K values for int8 weights (`quantize_rows_i16`; xf NULL: only
// allocated, filled later); 0 when out of memory.
static int quantized_rows(const float *xf, int64_t M, int64_t K, int16_t **xq, float **xqs) {
    *xq = (int16_t *)aligned_alloc(64, (size_t)((M * K * 2 + 63) / 64 * 64 + 64));
    *xqs = (float *)malloc(sizeof(float) * (size_t)(M + 1));
    if (!*xq || !*xqs) {
        free(*xq), free(*xqs);
        return 0;
    }
    if (xf) quantize_rows_i16(xf, K, M, K, *xq, *xqs);
    return 1;
}

static int threads_for(int64_t work, int nthreads) {
    // Below ~64k multiply-adds a thread team costs more than it saves.
    return work < (1 << 16) ? 1 : nthreads;
}

// y[g, m, n] = sum_k x[g, m, k] * w[g, n, k] (* scale[g, n] for int8 weights), for g < G, m < M, n < N.
// FP8 weights (G == 1) take their block scales in fq.
int dsv3_linear(int64_t G, int64_t M, int64_t N, int64_t K, const void *x, int xtype, int64_t x_gs, int64_t x_ms,
                const void *w, int wtype, int64_t w_gs, int64_t w_ns, const float *scale, int64_t s_gs,
                const fp8_grid *fq, void *y, int ytype, int64_t y_gs, int64_t y_ms, int nthreads) {
    if ((wtype == T_FP8) != (fq != NULL) || (fq && G != 1)) return 2;
    if (G <= 0 || M <= 0 || N <= 0) return 0;  // nothing to write (the kernels take one row at least)
    float *xf = widen_rows(x, xtype, G, M, K, x_gs, x_ms);
    if (!xf) return 1;
    int16_t *xq = NULL;
    float *xqs = NULL;
    if (wtype == T_I8 && !quantized_rows(xf, G * M, K, &xq, &xqs)) {
        free(xf);
        return 1;
    }
    if (fq && fq->act) {  // 'gemm': x becomes its e4m3 values, xqs their scales per column block
        const int64_t groups = (K + ((int64_t)1 << fq->cols_log2) - 1) >> fq->cols_log2;
        xqs = (float *)malloc(sizeof(float) * (size_t)(M * groups + 1));
        float *x8 = (float *)aligned_alloc(64, (size_t)((M * K * 4 + 63) / 64 * 64 + 64));
        if (!xqs || !x8) {
            free(xf), free(xqs), free(x8);
            return 1;
        }
        quantize_rows_e4m3(xf, M, K, fq->cols_log2, fq->act == 2, x8, xqs);
        free(xf);
        xf = x8;
    }
    const int nt = threads_for(G * M * N * K, nthreads);
    if (G == 1 && M <= 2 && wtype != T_FP8) {  // decode-sized: each thread's rows in two streams
#pragma omp parallel num_threads(nt)
        {
            const int64_t th = omp_get_thread_num(), nth = omp_get_num_threads();
            rows_in_two_streams(xf, xq, xqs, K, (int)M, w, wtype, w_ns, scale, N * th / nth, N * (th + 1) / nth, K, y,
                                ytype, y_ms);
        }
        free(xf), free(xq), free(xqs);
        return 0;
    }
    const int64_t block = 16;
    const int64_t nblocks = (N + block - 1) / block;
    const int64_t items = G * nblocks;
    const size_t wsize = wtype == T_F32 ? 4 : wtype == T_BF16 ? 2 : 1;
    const size_t ysize = ytype == T_BF16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t it = 0; it < items; it++) {
        const int64_t g = it / nblocks, b = it % nblocks;
        const int64_t n0 = b * block, n1 = n0 + block < N ? n0 + block : N;
        rows_times_weight(xf + g * M * K, xq ? xq + g * M * K : NULL, xqs ? xqs + g * M : NULL, K, M,
                          (const char *)w + (size_t)(g * w_gs) * wsize, wtype, w_ns, scale ? scale + g * s_gs : NULL,
                          fq, n0, n1, K, (char *)y + (size_t)(g * y_gs) * ysize, ytype, y_ms, 0);
    }
    free(xf), free(xq), free(xqs);
    return 0;
}

// y[g, m, c] = sum_s x[g, m, s] * w[g, s, c]: the activation times a weight stored [in, out] (attention's
// absorbed products, probabilities times cached latents). Each thread owns 16 output columns of one g and
// streams the weight rows once per 4 activation rows.
int dsv3_matmul(int64_t G, int64_t M, int64_t S, int64_t C, const void *x, int xtype, int64_t x_gs, int64_t x_ms,
                const void *w, int wtype, int64_t w_gs, int64_t w_ss, void *y, int ytype, int64_t y_gs, int64_t y_ms,
                int nthreads) {
    if (wtype == T_I8) return 2;
    float *xf = widen_rows(x, xtype, G, M, S, x_gs, x_ms);
    if (!xf) return 1;
    const int64_t cblocks = (C + 15) / 16;
    const int64_t items = G * cblocks;
#pragma omp parallel for schedule(static) num_threads(threads_for(G * M * S * C, nthreads))
    for (int64_t it = 0; it < items; it++) {
        const int64_t g = it / cblocks, c0 = (it % cblocks) * 16;
        const int64_t cw = C - c0 < 16 ? C - c0 : 16;
        const float *xg = xf + g * M * S;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int mt = (int)(M - m0 < 4 ? M - m0 : 4);
            float acc[4][16];
            memset(acc, 0, sizeof acc);
            if (cw == 16) {
                __m256 a[4][2];
                for (int m = 0; m < 4; m++) a[m][0] = a[m][1] = _mm256_setzero_ps();
                for (int64_t s = 0; s < S; s++) {
                    const int64_t off = g * w_gs + s * w_ss + c0;
                    __m256 v0, v1;
                    if (wtype == T_BF16) {
                        v0 = load8_bf16((const uint16_t *)w + off);
                        v1 = load8_bf16((const uint16_t *)w + off + 8);
                    } else {
                        v0 = _mm256_loadu_ps((const float *)w + off);
                        v1 = _mm256_loadu_ps((const float *)w + off + 8);
                    }
                    for (int m = 0; m < mt; m++) {
                        const __m256 xv = _mm256_set1_ps(xg[(m0 + m) * S + s]);
                        a[m][0] = _mm256_fmadd_ps(xv, v0, a[m][0]);
                        a[m][1] = _mm256_fmadd_ps(xv, v1, a[m][1]);
                    }
                }
                for (int m = 0; m < mt; m++) {
                    _mm256_storeu_ps(acc[m], a[m][0]);
                    _mm256_storeu_ps(acc[m] + 8, a[m][1]);
                }
            } else {
                for (int64_t s = 0; s < S; s++)
                    for (int64_t c = 0; c < cw; c++) {
                        const float v = load1(w, g * w_gs + s * w_ss + c0 + c, wtype);
                        for (int m = 0; m < mt; m++) acc[m][c] += xg[(m0 + m) * S + s] * v;
                    }
            }
            for (int m = 0; m < mt; m++)
                for (int64_t c = 0; c < cw; c++) store1(y, g * y_gs + (m0 + m) * y_ms + c0 + c, ytype, acc[m][c]);
        }
    }
    free(xf);
    return 0;
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

// The routed experts' SwiGLU for rows sorted by expert, x already fp32 (xf, R x D): rows [start_e, start_e +
// counts[e]) go to expert e; y[r] = down_e(silu(gate_e(x[r])) * up_e(x[r])) (unweighted). Weights of expert
// e start at e * *_es elements; gate and up may be two halves of one fused [2F, D] tensor (then up = gate +
// F*D). Two parallel phases (gate/up, then down), each over blocks of output rows of every active expert, so
// each chosen expert's weights are read once whatever the number of rows it got.
static int experts_rows(int64_t R, int64_t D, int64_t F, int64_t E, const int64_t *counts, const float *xf,
                        const void *gate, const void *up, int wtype, int64_t gu_es, const float *gate_scale,
                        const float *up_scale, const void *down, int64_t down_es, const float *down_scale,
                        const fp8_grid *fp8, void *y, int ytype, int nthreads) {
    float *h = (float *)aligned_alloc(64, (size_t)((R * 2 * F * 4 + 63) / 64 * 64 + 64));
    float *hh = (float *)aligned_alloc(64, (size_t)((R * F * 4 + 63) / 64 * 64 + 64));
    int64_t *start = (int64_t *)malloc(sizeof(int64_t) * (size_t)(E + 1));
    int64_t *active = (int64_t *)malloc(sizeof(int64_t) * (size_t)(E + 1));
    // int8 weights: both products' inputs as int16 rows (x here, the SwiGLU rows in the parallel phase).
    int16_t *xq = NULL, *hq = NULL;
    float *xqs = NULL, *hqs = NULL;
    const int q8 = wtype == T_I8;
    if (!h || !hh || !start || !active || (q8 && !quantized_rows(xf, R, D, &xq, &xqs)) ||
        (q8 && !quantized_rows(NULL, R, F, &hq, &hqs))) {
        free(h), free(hh), free(start), free(active), free(xq), free(xqs), free(hq), free(hqs);
        return 1;
    }
    start[0] = 0;
    for (int64_t e = 0; e < E; e++) start[e + 1] = start[e] + counts[e];
    const int64_t block = 16;
    const int64_t fblocks = (F + block - 1) / block, dblocks = (D + block - 1) / block;
    // Active experts, so the parallel loops run over work only.
    int64_t na = 0;
    for (int64_t e = 0; e < E; e++)
        if (counts[e] > 0) active[na++] = e;
    const size_t wsize = wtype == T_F32 ? 4 : wtype == T_BF16 ? 2 : 1;
    const int nt = threads_for(R * 3 * F * D, nthreads);
    // Decode-sized (every active expert has one or two rows, weights not FP8): gate row f beside up row f, and
    // the down projection's row d beside row d + D/2, two streams a pair (`pair_rows`, the same bits).
    int paired = wtype != T_FP8 && D >= 2;
    for (int64_t i = 0; i < na; i++) paired &= counts[active[i]] <= 2;
    const int64_t Dh = D / 2, hblocks = (Dh + block - 1) / block;
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t it = 0; it < (paired ? na * fblocks : 0); it++) {
            const int64_t e = active[it / fblocks], f0 = (it % fblocks) * block, f1 = f0 + block < F ? f0 + block : F;
            const size_t wo = (size_t)(e * gu_es + f0 * D) * wsize;
            pair_rows(xf + start[e] * D, q8 ? xq + start[e] * D : NULL, q8 ? xqs + start[e] : NULL, D, (int)counts[e],
                      (const char *)gate + wo, (const char *)up + wo, wtype, D,
                      gate_scale ? gate_scale + e * F + f0 : NULL, up_scale ? up_scale + e * F + f0 : NULL, f1 - f0,
                      D, h + start[e] * 2 * F + f0, h + start[e] * 2 * F + F + f0, T_F32, 2 * F);
        }
#pragma omp for schedule(static)
        for (int64_t it = 0; it < (paired ? 0 : na * 2 * fblocks); it++) {
            const int64_t e = active[it / (2 * fblocks)], b = it % (2 * fblocks);
            const int is_up = b >= fblocks;
            const int64_t f0 = (b % fblocks) * block, f1 = f0 + block < F ? f0 + block : F;
            const void *wbase = is_up ? up : gate;
            const float *sc = is_up ? up_scale : gate_scale;
            const fp8_grid fq = fp8 ? expert_grid(&fp8[is_up ? 1 : 0], e) : (fp8_grid){0};
            rows_times_weight(xf + start[e] * D, q8 ? xq + start[e] * D : NULL, q8 ? xqs + start[e] : NULL, D,
                              counts[e], (const char *)wbase + (size_t)(e * gu_es) * wsize, wtype, D,
                              sc ? sc + e * F : NULL, fp8 ? &fq : NULL, f0, f1, D,
                              h + start[e] * 2 * F + (is_up ? F : 0), T_F32, 2 * F, 0);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            for (int64_t f = 0; f < F; f++) hh[r * F + f] = silu(h[r * 2 * F + f]) * h[r * 2 * F + F + f];
            if (q8) quantize_rows_i16(hh + r * F, F, 1, F, hq + r * F, hqs + r);
        }
        const size_t ysize = ytype == T_BF16 ? 2 : 4;
#pragma omp for schedule(static)
        for (int64_t it = 0; it < (paired ? na * hblocks : 0); it++) {
            const int64_t e = active[it / hblocks], d0 = (it % hblocks) * block, d1 = d0 + block < Dh ? d0 + block : Dh;
            const size_t wo = (size_t)(e * down_es) * wsize;
            const float *ds = down_scale ? down_scale + e * D : NULL;
            pair_rows(hh + start[e] * F, q8 ? hq + start[e] * F : NULL, q8 ? hqs + start[e] : NULL, F, (int)counts[e],
                      (const char *)down + wo + (size_t)(d0 * F) * wsize,
                      (const char *)down + wo + (size_t)((Dh + d0) * F) * wsize, wtype, F, ds ? ds + d0 : NULL,
                      ds ? ds + Dh + d0 : NULL, d1 - d0, F, (char *)y + (size_t)(start[e] * D + d0) * ysize,
                      (char *)y + (size_t)(start[e] * D + Dh + d0) * ysize, ytype, D);
            if (D % 2 && it % hblocks == hblocks - 1)  // an odd last row of down: with itself
                pair_rows(hh + start[e] * F, q8 ? hq + start[e] * F : NULL, q8 ? hqs + start[e] : NULL, F,
                          (int)counts[e], (const char *)down + wo + (size_t)((D - 1) * F) * wsize,
                          (const char *)down + wo + (size_t)((D - 1) * F) * wsize, wtype, F, ds ? ds + D - 1 : NULL,
                          ds ? ds + D - 1 : NULL, 1, F, (char *)y + (size_t)(start[e] * D + D - 1) * ysize,
                          (char *)y + (size_t)(start[e] * D + D - 1) * ysize, ytype, D);
        }
#pragma omp for schedule(static)
        for (int64_t it = 0; it < (paired ? 0 : na * dblocks); it++) {
            const int64_t e = active[it / dblocks], d0 = (it % dblocks) * block;
            const int64_t d1 = d0 + block < D ? d0 + block : D;
            const fp8_grid fq = fp8 ? expert_grid(&fp8[2], e) : (fp8_grid){0};
            rows_times_weight(hh + start[e] * F, q8 ? hq + start[e] * F : NULL, q8 ? hqs + start[e] : NULL, F,
                              counts[e], (const char *)down + (size_t)(e * down_es) * wsize, wtype, F,
                              down_scale ? down_scale + e * D : NULL, fp8 ? &fq : NULL, d0, d1, F,
                              (char *)y + (size_t)(start[e] * D) * ysize, ytype, D, 0);
        }
    }
    free(h), free(hh), free(start), free(active), free(xq), free(xqs), free(hq), free(hqs);
    return 0;
}

// `experts_rows` for x of any activation type (R x D, contiguous).
// fp8: FP8 weights' grids for gate, up, down (an array of three; grid_es set), else NULL.
int dsv3_experts(int64_t R, int64_t D, int64_t F, int64_t E, const int64_t *counts, const void *x, int xtype,
                 const void *gate, const void *up, int wtype, int64_t gu_es, const float *gate_scale,
                 const float *up_scale, const void *down, int64_t down_es, const float *down_scale,
                 const fp8_grid *fp8, void *y, int ytype, int nthreads) {
    if ((wtype == T_FP8) != (fp8 != NULL)) return 2;
    float *xf = widen_rows(x, xtype, 1, R, D, 0, D);
    if (!xf) return 1;
    const int rc = experts_rows(R, D, F, E, counts, xf, gate, up, wtype, gu_es, gate_scale, up_scale, down, down_es,
                                down_scale, fp8, y, ytype, nthreads);
    free(xf);
    return rc;
}

// ---------------------------------------------------------------------------------------------- routing
// What dsv3.model.moe.Router does for one token, on its float32 affinity logits: the same selection rules
// (module docstring there), with torch.sort's order: descending, equal values to the lower expert id,
// NaN above everything.

enum { SCORE_SIGMOID = 0, SCORE_SOFTMAX = 1 };
enum { ROUTE_GREEDY = 0, ROUTE_NOAUX_TC = 1, ROUTE_GROUP_MAX = 2 };

static inline int ranks_above(float a, float b) { return (isnan(a) && !isnan(b)) || a > b; }

// The k largest of v[0..n) (stable: ties to the lower index) -> out[0..k); taken is scratch of n bytes.
static void topk_stable(const float *v, int64_t n, int64_t k, int64_t *out, unsigned char *taken) {
    memset(taken, 0, (size_t)n);
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t i = 0; i < n; i++)
            if (!taken[i] && (best < 0 || ranks_above(v[i], v[best]))) best = i;
        out[j] = best;
        taken[best] = 1;
    }
}

// One token: logits (E, overwritten by the affinities) -> expert ids idx[K] and combine weights w[K].
// scratch holds 5E floats.
static void route_one(float *s, int64_t E, int64_t K, const float *bias, int scoring, int method, int64_t n_group,
                      int64_t topk_group, int norm_topk, float scaling, int64_t *idx, float *w, float *scratch) {
    if (scoring == SCORE_SOFTMAX) {
        float mx = s[0], sum = 0.0f;
        for (int64_t e = 1; e < E; e++) mx = s[e] > mx ? s[e] : mx;
        for (int64_t e = 0; e < E; e++) sum += (s[e] = expf(s[e] - mx));
        for (int64_t e = 0; e < E; e++) s[e] /= sum;
    } else {
        for (int64_t e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-s[e]));
    }
    float *sel = scratch, *group_score = scratch + E;
    int64_t *kept = (int64_t *)(scratch + 2 * E);  // up to E group ids
    unsigned char *taken = (unsigned char *)(scratch + 4 * E);
    for (int64_t e = 0; e < E; e++) sel[e] = bias ? s[e] + bias[e] : s[e];
    const int grouped = method == ROUTE_GROUP_MAX || (method == ROUTE_NOAUX_TC && n_group > 1);
    if (grouped) {
        const int64_t gs = E / n_group;
        for (int64_t g = 0; g < n_group; g++) {
            const float *v = sel + g * gs;
            if (method == ROUTE_GROUP_MAX) {  // V2: the group's max (NaN propagates, as torch.amax)
                float m = v[0];
                for (int64_t i = 1; i < gs; i++) m = ranks_above(v[i], m) ? v[i] : m;
                group_score[g] = m;
            } else {  // V3: the sum of the group's two largest
                int64_t top2[2];
                topk_stable(v, gs, 2, top2, taken);
                group_score[g] = v[top2[0]] + v[top2[1]];
            }
        }
        topk_stable(group_score, n_group, topk_group, kept, taken);
        memset(taken, 0, (size_t)n_group);
        for (int64_t j = 0; j < topk_group; j++) taken[kept[j]] = 1;
        for (int64_t g = 0; g < n_group; g++)
            if (!taken[g])
                for (int64_t i = 0; i < gs; i++) sel[g * gs + i] = -INFINITY;
    }
    topk_stable(sel, E, K, idx, taken);
    float sum = 0.0f;
    for (int64_t k = 0; k < K; k++) sum += (w[k] = s[idx[k]]);  // the unbiased affinities
    for (int64_t k = 0; k < K; k++) w[k] = (norm_topk ? w[k] / (sum + 1e-20f) : w[k]) * scaling;
}

// The routed half of a MoE layer for T tokens (x: T x D, contiguous): route each token (router_w [E, D]
// float32, bias [E] or NULL), run its K experts (`experts_rows`' weights) and write
// y[t] = sum_k w[t,k] * expert_{idx[t,k]}(x[t]) in x's type. Rounds where `Experts.forward` does in torch
// ops: each expert output to x's type, the weight to x's type, each product to x's type, the sum (fp32) once.
// idx_out / w_out (T x K) receive the routing when not NULL.
int dsv3_moe(int64_t T, int64_t D, int64_t F, int64_t E, int64_t K, const void *x, int xtype, const float *router_w,
             const float *bias, int scoring, int method, int64_t n_group, int64_t topk_group, int norm_topk,
             float scaling, const void *gate, const void *up, int wtype, int64_t gu_es, const float *gate_scale,
             const float *up_scale, const void *down, int64_t down_es, const float *down_scale, const fp8_grid *fp8,
             void *y, int64_t *idx_out, float *w_out, int nthreads) {
    if ((wtype == T_FP8) != (fp8 != NULL)) return 2;
    const int grouped = method == ROUTE_GROUP_MAX || (method == ROUTE_NOAUX_TC && n_group > 1);
    if (K > E || (grouped && (n_group < 1 || E % n_group || topk_group > n_group || topk_group < 1)) ||
        (method == ROUTE_NOAUX_TC && grouped && E / n_group < 2))
        return 2;
    const int64_t N = T * K;
    float *xf = widen_rows(x, xtype, 1, T, D, 0, D);
    float *logits = (float *)malloc(sizeof(float) * (size_t)(T * E));
    float *scratch = (float *)aligned_alloc(64, sizeof(float) * (size_t)((5 * E + 31) / 16 * 16));
    int64_t *idx = (int64_t *)malloc(sizeof(int64_t) * (size_t)N);
    float *w = (float *)malloc(sizeof(float) * (size_t)N);
    int64_t *counts = (int64_t *)calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *fill = (int64_t *)calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *pos = (int64_t *)malloc(sizeof(int64_t) * (size_t)N);
    float *xs = (float *)aligned_alloc(64, (size_t)((N * D * 4 + 63) / 64 * 64 + 64));
    const size_t asize = xtype == T_F32 ? 4 : 2;
    void *h = malloc(asize * (size_t)(N * D) + 64);
    int rc = 1;
    if (!xf || !logits || !scratch || !idx || !w || !counts || !fill || !pos || !xs || !h) goto done;
    const int64_t eblocks = (E + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads_for(T * E * D, nthreads))
    for (int64_t b = 0; b < eblocks; b++)
        rows_times_weight(xf, NULL, NULL, D, T, router_w, T_F32, D, NULL, NULL, b * 16, b * 16 + 16 < E ? b * 16 + 16 : E,
                          D, logits, T_F32, E, 0);
    for (int64_t t = 0; t < T; t++)
        route_one(logits + t * E, E, K, bias, scoring, method, n_group, topk_group, norm_topk, scaling, idx + t * K,
                  w + t * K, scratch);
    // Assignments sorted by expert, stable (`sort_by_expert`): assignment n = t*K + k lands in row pos[n].
    for (int64_t n = 0; n < N; n++) counts[idx[n]]++;
    for (int64_t e = 0, acc = 0; e < E; e++) fill[e] = acc, acc += counts[e];
    for (int64_t n = 0; n < N; n++) {
        pos[n] = fill[idx[n]]++;
        memcpy(xs + pos[n] * D, xf + (n / K) * D, sizeof(float) * (size_t)D);
    }
    rc = experts_rows(N, D, F, E, counts, xs, gate, up, wtype, gu_es, gate_scale, up_scale, down, down_es,
                      down_scale, fp8, h, xtype, nthreads);
    if (rc) goto done;
    for (int64_t t = 0; t < T; t++)
        for (int64_t d = 0; d < D; d++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                float wk = w[t * K + k];
                float p = load1(h, pos[t * K + k] * D + d, xtype);
                if (xtype == T_BF16) wk = bf16_to_f32(f32_to_bf16(wk)), p = bf16_to_f32(f32_to_bf16(p * wk));
                else p *= wk;
                acc += p;
            }
            store1(y, t * D + d, xtype, acc);
        }
    if (idx_out) memcpy(idx_out, idx, sizeof(int64_t) * (size_t)N);
    if (w_out) memcpy(w_out, w, sizeof(float) * (size_t)N);
done:
    free(xf), free(logits), free(scratch), free(idx), free(w), free(counts), free(fill), free(pos), free(xs), free(h);
    return rc;
}

// out[c] = sum_i a[i] * w[i * ld + c] for c < cols (a vector times a [n, cols] matrix, bf16 or fp32): four rows
// at a time, the partial sums of every column kept in `out` (L1), so the weight is read in one sequential pass,
// prefetched eight rows ahead. Each column's sum is the fma chain over i in order (a[0] w[0, c] first) whatever
// the grouping: the same bits as one row at a time, which stored and reloaded every partial sum once per row
// (the absorbed queries of a `small` decode layer, W_UK's 512 KB: 52-61 us that way, 39-40 with four rows a
// pass and the prefetch). (Blocks of 64 columns in registers walked the rows once per block, in short strided
// runs: slower still.)
#define VTM_AHEAD 8
static inline __m256 vtm_load8(const void *w, int wtype, int64_t i) {
    return wtype == T_BF16 ? load8_bf16((const uint16_t *)w + i) : _mm256_loadu_ps((const float *)w + i);
}
static void vec_times_matrix(const float *a, int64_t n, const void *w, int wtype, int64_t ld, int64_t cols,
                             float *out) {
    const int64_t c8 = cols / 8 * 8;
    const size_t wsize = wtype == T_BF16 ? 2 : 4;
    for (int64_t c = 0; c < c8; c += 8) _mm256_storeu_ps(out + c, _mm256_setzero_ps());
    // At least 4 KiB ahead (W_UV's rows are 128 bytes), and past row n: the callers walk the heads' matrices
    // in order, contiguous, so the next one starts streaming before this one ends (a prefetch never faults).
    const int64_t row_bytes = ld * (int64_t)wsize, ahead = row_bytes * VTM_AHEAD >= 4096 ? VTM_AHEAD : (4096 + row_bytes - 1) / row_bytes;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        for (int64_t r = i + ahead; r < i + ahead + 4; r++)
            for (int64_t b = 0; b < c8 * (int64_t)wsize; b += 64)
                _mm_prefetch((const char *)w + (size_t)(r * ld) * wsize + b, _MM_HINT_T0);
        const __m256 a0 = _mm256_set1_ps(a[i]), a1 = _mm256_set1_ps(a[i + 1]);
        const __m256 a2 = _mm256_set1_ps(a[i + 2]), a3 = _mm256_set1_ps(a[i + 3]);
        const int64_t o0 = i * ld, o1 = o0 + ld, o2 = o1 + ld, o3 = o2 + ld;
        for (int64_t c = 0; c < c8; c += 8) {
            __m256 acc = _mm256_fmadd_ps(a0, vtm_load8(w, wtype, o0 + c), _mm256_loadu_ps(out + c));
            acc = _mm256_fmadd_ps(a1, vtm_load8(w, wtype, o1 + c), acc);
            acc = _mm256_fmadd_ps(a2, vtm_load8(w, wtype, o2 + c), acc);
            _mm256_storeu_ps(out + c, _mm256_fmadd_ps(a3, vtm_load8(w, wtype, o3 + c), acc));
        }
    }
    for (; i < n; i++) {
        const __m256 av = _mm256_set1_ps(a[i]);
        for (int64_t c = 0; c < c8; c += 8)
            _mm256_storeu_ps(out + c, _mm256_fmadd_ps(av, vtm_load8(w, wtype, i * ld + c), _mm256_loadu_ps(out + c)));
    }
    for (int64_t c0 = c8; c0 < cols; c0++) {
        float acc = 0.0f;
        for (int64_t r = 0; r < n; r++) acc += a[r] * load1(w, r * ld + c0, wtype);
        out[c0] = acc;
    }
}

// ---------------------------------------------------------------------------------------------- attention
// exp(x) for 8 lanes, x <= 0 (softmax arguments after subtracting the row max; -inf gives 0): 2**(x log2 e)
// as 2**n times a degree-6 polynomial for 2**f, f in [-0.5, 0.5]; relative error at most 1.1e-6 over
// [-20, 0] (measured against libm), no libm call.
static inline __m256 exp8_nonpositive(__m256 x) {
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);  // below: exactly 0 (masked keys)
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147180559945309f));  // ln 2 * frac
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(scale)), keep);
}

// The online softmax's step for one query row and one block of n scores s (scaled, hidden keys -inf; n a multiple
// of 8) whose largest is bmx: the row's running max *mx and sum *l, and its unnormalised output o (width values)
// rescaled to the new max, s replaced by exp(s - max). A row that has seen no key yet gets all-zero s.
static inline void online_softmax_step(float *s, int64_t n, float bmx, float *mx, float *l, float *o, int64_t width) {
    const float new_mx = bmx > *mx ? bmx : *mx;
    if (new_mx == -INFINITY) {
        memset(s, 0, sizeof(float) * (size_t)n);
        return;
    }
    if (new_mx != *mx) {
        const float alpha = *mx == -INFINITY ? 0.0f : expf(*mx - new_mx);
        *l *= alpha;
        for (int64_t c = 0; c < width; c++) o[c] *= alpha;
        *mx = new_mx;
    }
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(new_mx)));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    *l += hsum(acc);
}

// o[m][0..16) += sum_j p[m][j] * kv[j][r0 .. r0+16) for 4 rows of probabilities (row stride ps) and 1 row:
// the accumulators are a fixed set of registers (a loop over a run-time row count would keep them in memory).
static inline void probs_times_latents4(const float *p, int64_t ps, const char *kv, int kvtype, int64_t kv_ss,
                                        int64_t r0, int64_t S, float *o, int64_t os) {
    const size_t ksize = kvtype == T_F32 ? 4 : 2;
    __m256 a00 = _mm256_loadu_ps(o), a01 = _mm256_loadu_ps(o + 8), a10 = _mm256_loadu_ps(o + os),
           a11 = _mm256_loadu_ps(o + os + 8), a20 = _mm256_loadu_ps(o + 2 * os), a21 = _mm256_loadu_ps(o + 2 * os + 8),
           a30 = _mm256_loadu_ps(o + 3 * os), a31 = _mm256_loadu_ps(o + 3 * os + 8);
    for (int64_t j = 0; j < S; j++) {
        const char *row = kv + (size_t)(j * kv_ss + r0) * ksize;
        const __m256 k0 = kvtype == T_BF16 ? load8_bf16((const uint16_t *)row) : _mm256_loadu_ps((const float *)row);
        const __m256 k1 = kvtype == T_BF16 ? load8_bf16((const uint16_t *)row + 8) : _mm256_loadu_ps((const float *)row + 8);
        __m256 pv = _mm256_broadcast_ss(p + j);
        a00 = _mm256_fmadd_ps(pv, k0, a00), a01 = _mm256_fmadd_ps(pv, k1, a01);
        pv = _mm256_broadcast_ss(p + ps + j);
        a10 = _mm256_fmadd_ps(pv, k0, a10), a11 = _mm256_fmadd_ps(pv, k1, a11);
        pv = _mm256_broadcast_ss(p + 2 * ps + j);
        a20 = _mm256_fmadd_ps(pv, k0, a20), a21 = _mm256_fmadd_ps(pv, k1, a21);
        pv = _mm256_broadcast_ss(p + 3 * ps + j);
        a30 = _mm256_fmadd_ps(pv, k0, a30), a31 = _mm256_fmadd_ps(pv, k1, a31);
    }
    _mm256_storeu_ps(o, a00), _mm256_storeu_ps(o + 8, a01);
    _mm256_storeu_ps(o + os, a10), _mm256_storeu_ps(o + os + 8, a11);
    _mm256_storeu_ps(o + 2 * os, a20), _mm256_storeu_ps(o + 2 * os + 8, a21);
    _mm256_storeu_ps(o + 3 * os, a30), _mm256_storeu_ps(o + 3 * os + 8, a31);
}
static inline void probs_times_latents1(const float *p, const char *kv, int kvtype, int64_t kv_ss, int64_t r0,
                                        int64_t S, float *o) {
    const size_t ksize = kvtype == T_F32 ? 4 : 2;
    __m256 a0 = _mm256_loadu_ps(o), a1 = _mm256_loadu_ps(o + 8);
    for (int64_t j = 0; j < S; j++) {
        const char *row = kv + (size_t)(j * kv_ss + r0) * ksize;
        const __m256 k0 = kvtype == T_BF16 ? load8_bf16((const uint16_t *)row) : _mm256_loadu_ps((const float *)row);
        const __m256 k1 = kvtype == T_BF16 ? load8_bf16((const uint16_t *)row + 8) : _mm256_loadu_ps((const float *)row + 8);
        const __m256 pv = _mm256_broadcast_ss(p + j);
        a0 = _mm256_fmadd_ps(pv, k0, a0), a1 = _mm256_fmadd_ps(pv, k1, a1);
    }
    _mm256_storeu_ps(o, a0), _mm256_storeu_ps(o + 8, a1);
}

// One key block [j0, j0 + nj) of one cache row for M query rows (`mla_attend`'s key chunks): scores into s
// (M x KEY_BLOCK, scaled, hidden keys -inf), then the online softmax update of each row's running max mx,
// running sum l and unnormalised output o (M x R): o = o * exp(mx_old - mx_new) + exp(s - mx_new) @ kv[:, :R].
// Rows that see no key of the block are left alone; masked keys contribute exactly 0.
#define KEY_BLOCK 64
static void attend_key_block(const float *q, int64_t M, int64_t nh, int64_t C, int64_t R, const char *kvb, int kvtype,
                             int64_t kv_ss, int64_t j0, int64_t nj, int64_t S, int64_t T, float scale,
                             const unsigned char *mask_b, int64_t m_ts, float *s, float *mx, float *l, float *o,
                             float *wide) {
    const size_t ksize = kvtype == T_F32 ? 4 : 2;
    const char *kvj = kvb + (size_t)(j0 * kv_ss) * ksize;
    const char *next = kvj + (size_t)(nj * kv_ss) * ksize;  // the next block's rows, as stored (bytes apart: next_ss)
    const int64_t next_ss = kv_ss * (int64_t)ksize;
    if (kvtype == T_BF16 && wide) {
        // The block's rows widened once (`wide`: KEY_BLOCK x C floats): the scores and the latents below read each
        // row once per four query rows, and widened every time, the conversion was a third of their instructions.
        // Exact, and the products are the fp32 kernels' (the same arithmetic): the same bits.
        const int64_t c8 = C / 8 * 8;
        for (int64_t j = 0; j < nj; j++) {
            const uint16_t *row = (const uint16_t *)kvj + j * kv_ss;
            float *dst = wide + j * C;
            for (int64_t c = 0; c < c8; c += 8) _mm256_storeu_ps(dst + c, load8_bf16(row + c));
            for (int64_t c = c8; c < C; c++) dst[c] = bf16_to_f32(row[c]);
        }
        kvj = (const char *)wide, kvtype = T_F32, kv_ss = C;
    }
    rows_times_weight(q, NULL, NULL, C, M, kvj, kvtype, kv_ss, NULL, NULL, 0, nj, C, s, T_F32, KEY_BLOCK, 1);
    for (int64_t m = 0; m < M; m++) {
        const int64_t t = m / nh, last = S - T + t;  // causal: keys 0..last
        const unsigned char *vis = mask_b ? mask_b + t * m_ts + j0 : NULL;
        float *sm = s + m * KEY_BLOCK, bmx = -INFINITY;
        for (int64_t j = 0; j < KEY_BLOCK; j++) {
            const int visible = j < nj && (vis ? vis[j] : j0 + j <= last);
            sm[j] = visible ? sm[j] * scale : -INFINITY;
            bmx = sm[j] > bmx ? sm[j] : bmx;
        }
        online_softmax_step(sm, KEY_BLOCK, bmx, mx + m, l + m, o + m * R, R);
    }
    // o += p @ kv[:, :R] by blocks of 16 latent columns: a column slice of the block's rows stays in L1 while
    // every group of four query rows passes over it. Meanwhile the next block's cache rows are fetched, a few
    // rows a slice: read when the block is widened, they stalled it (a fifth of the block's time at 4096 keys,
    // the cache cold as in decode); the hardware prefetcher does not see past the arithmetic in between.
    const int64_t slices = (R + 15) / 16, rows_per_slice = (KEY_BLOCK + slices - 1) / slices;
    const int64_t row_bytes = C * (int64_t)ksize;
    for (int64_t r0 = 0, pj = 0; r0 < R; r0 += 16) {
        for (const int64_t pend = pj + rows_per_slice < KEY_BLOCK ? pj + rows_per_slice : KEY_BLOCK; pj < pend; pj++)
            for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(next + pj * next_ss + b, _MM_HINT_T0);
        const int64_t rw = R - r0 < 16 ? R - r0 : 16;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = M - m0 < 4 ? M - m0 : 4;
            if (rw == 16 && mt == 4) {
                probs_times_latents4(s + m0 * KEY_BLOCK, KEY_BLOCK, kvj, kvtype, kv_ss, r0, nj, o + m0 * R + r0, R);
            } else if (rw == 16) {
                for (int64_t m = m0; m < m0 + mt; m++)  // one row: the 4-row kernel's arithmetic, one chain
                    probs_times_latents1(s + m * KEY_BLOCK, kvj, kvtype, kv_ss, r0, nj, o + m * R + r0);
            } else {
                for (int64_t m = m0; m < m0 + mt; m++)
                    for (int64_t r = r0; r < r0 + rw; r++) {
                        float acc = o[m * R + r];
                        for (int64_t j = 0; j < nj; j++) acc += s[m * KEY_BLOCK + j] * load1(kvj, j * kv_ss + r, kvtype);
                        o[m * R + r] = acc;
                    }
            }
        }
    }
}

// MLA's absorbed attention for a few query tokens against the latent cache (dsv3.model.attention,
// `_attend_absorbed`), one call per layer. Per row b, query token t and head h:
//   q = [W_UK[h]^T q_nope (rounded to the activation type), q_rope]        (R + Dr)
//   p = softmax(scale * q . kv[b, j] over the visible keys j), in fp32     (S)
//   o = sum_j p_j kv[b, j, :R] (rounded), out[b, t, h] = W_UV[h] o (rounded) (Dv)
// kv[b] holds S cached rows [latent (R), rope key (Dr)] (row stride kv_ss, row b at kv + b * kv_bs). Key j is
// visible iff mask[b, t, j] (bool, strides m_bs, m_ts, contiguous in j) or, with mask NULL, j <= S - T + t.
// q_nope / q_rope / out are [B, T, H, d] with the given (b, t, h) strides; w_uk [H, Dn, R], w_uv_t [H, R, Dv]
// contiguous (bf16 or fp32). kv_boff: row b's cache starts kv_boff[b] elements into kv (NULL: b * kv_bs).
//
// Split-key ("flash decoding") order, three parallel phases: the query rows; then each cache row's keys in
// chunks (one per thread when B is small), each chunk walking its 64-key blocks once: scores for every
// query row, an online softmax (running max and sum), and the probabilities times the block's latents
// while the block is still in L1/L2, so the cache is read from memory once and no S-long probability
// row is stored; last, per query row, the chunks are merged (rescaled to the common max), normalised,
// rounded, and multiplied by W_UV. Masked keys weigh exactly 0, as in the two-pass softmax.
static int mla_attend(int64_t B, int64_t T, int64_t H, int64_t S, int64_t Dn, int64_t Dr, int64_t R, int64_t Dv,
                      const void *q_nope, const void *q_rope, int xtype, int64_t q_bs, int64_t q_ts, int64_t q_hs,
                      int64_t r_bs, int64_t r_ts, int64_t r_hs, const void *kv, int kvtype, int64_t kv_bs,
                      const int64_t *kv_boff, int64_t kv_ss, const void *w_uk, const void *w_uv_t, int wtype,
                      float scale, const unsigned char *mask, int64_t m_bs, int64_t m_ts, void *out, int64_t o_bs,
                      int64_t o_ts, int64_t o_hs, int nthreads) {
    const int64_t C = R + Dr, M = T * H;  // query row m of cache row b: token m / H, head m % H
    const size_t ksize = kvtype == T_F32 ? 4 : 2, wsize = wtype == T_F32 ? 4 : 2;
    const int nt = threads_for(B * H * T * S * 2 * C + B * H * T * R * (Dn + Dv), nthreads);
    const int64_t kblocks = (S + KEY_BLOCK - 1) / KEY_BLOCK;
    // Chunks per cache row: enough for every thread when the batch alone does not fill them.
    int64_t NC = (nt + B - 1) / B;
    NC = NC < kblocks ? NC : kblocks;
    NC = NC > 0 ? NC : 1;
    const int64_t items = B * NC;
    float *q = (float *)aligned_alloc(64, (size_t)((B * M * C * 4 + 63) / 64 * 64 + 64));
    float *o = (float *)aligned_alloc(64, (size_t)((items * M * R * 4 + 63) / 64 * 64 + 64));
    float *ml = (float *)malloc(sizeof(float) * (size_t)(items * M * 2));  // running max, then running sum
    float *s = (float *)aligned_alloc(64, (size_t)((nt * M * KEY_BLOCK * 4 + 63) / 64 * 64 + 64));
    float *wide = (float *)aligned_alloc(64, (size_t)((nt * KEY_BLOCK * C * 4 + 63) / 64 * 64 + 64));
    if (!q || !o || !ml || !s || !wide) {
        free(q), free(o), free(ml), free(s), free(wide);
        return 1;
    }
#pragma omp parallel num_threads(nt)
    {
        // Query rows: the absorbed latent query (rounded to the activation type), then the rope query.
#pragma omp for schedule(static)
        for (int64_t bm = 0; bm < B * M; bm++) {
            const int64_t b = bm / M, t = (bm % M) / H, h = bm % H;
            float *qm = q + bm * C;
            float qn[Dn > 0 ? Dn : 1];
            for (int64_t d = 0; d < Dn; d++) qn[d] = load1(q_nope, b * q_bs + t * q_ts + h * q_hs + d, xtype);
            vec_times_matrix(qn, Dn, (const char *)w_uk + (size_t)(h * Dn * R) * wsize, wtype, R, R, qm);
            if (xtype == T_BF16)
                for (int64_t r = 0; r < R; r++) qm[r] = bf16_to_f32(f32_to_bf16(qm[r]));
            for (int64_t d = 0; d < Dr; d++) qm[R + d] = load1(q_rope, b * r_bs + t * r_ts + h * r_hs + d, xtype);
        }
        // Key chunks: each (cache row, chunk) item owns its running max / sum / output rows.
        float *sbuf = s + (int64_t)omp_get_thread_num() * M * KEY_BLOCK;
        float *wbuf = wide + (int64_t)omp_get_thread_num() * KEY_BLOCK * C;
#pragma omp for schedule(static)
        for (int64_t it = 0; it < items; it++) {
            const int64_t b = it / NC, c = it % NC;
            const char *kvb = (const char *)kv + (size_t)(kv_boff ? kv_boff[b] : b * kv_bs) * ksize;
            float *mx = ml + it * M * 2, *l = mx + M, *oc = o + it * M * R;
            for (int64_t m = 0; m < M; m++) mx[m] = -INFINITY, l[m] = 0.0f;
            memset(oc, 0, sizeof(float) * (size_t)(M * R));
            const int64_t k1 = (c + 1) * S / NC;  // chunks of S / NC keys: whole blocks left one thread idle
            for (int64_t j0 = c * S / NC; j0 < k1; j0 += KEY_BLOCK) {  // (131 keys: 128 against 3)
                const int64_t nj = k1 - j0 < KEY_BLOCK ? k1 - j0 : KEY_BLOCK;
                attend_key_block(q + b * M * C, M, H, C, R, kvb, kvtype, kv_ss, j0, nj, S, T, scale,
                                 mask ? mask + b * m_bs : NULL, m_ts, sbuf, mx, l, oc, wbuf);
            }
        }
        // Merge the chunks of each query row, normalise, round; out = o @ W_UV^T of the row's head.
#pragma omp for schedule(static)
        for (int64_t bm = 0; bm < B * M; bm++) {
            const int64_t b = bm / M, m = bm % M, t = m / H, h = m % H;
            float gmx = -INFINITY;
            for (int64_t c = 0; c < NC; c++) {
                const float cm = ml[(b * NC + c) * M * 2 + m];
                gmx = cm > gmx ? cm : gmx;
            }
            float orow[R > 0 ? R : 1], lsum = 0.0f;
            for (int64_t r = 0; r < R; r++) orow[r] = 0.0f;
            for (int64_t c = 0; c < NC; c++) {
                const int64_t it = b * NC + c;
                const float cm = ml[it * M * 2 + m];
                if (cm == -INFINITY) continue;  // the chunk saw no key of this row
                const float w = expf(cm - gmx);
                lsum += w * ml[it * M * 2 + M + m];
                const float *oc = o + (it * M + m) * R;
                for (int64_t r = 0; r < R; r++) orow[r] += w * oc[r];
            }
            const float inv = 1.0f / lsum;  // no visible key: 0 * inf = NaN, as softmax over all -inf
            for (int64_t r = 0; r < R; r++) {
                orow[r] *= inv;
                if (xtype == T_BF16) orow[r] = bf16_to_f32(f32_to_bf16(orow[r]));
            }
            float acc[Dv > 0 ? Dv : 1];
            vec_times_matrix(orow, R, (const char *)w_uv_t + (size_t)(h * R * Dv) * wsize, wtype, Dv, Dv, acc);
            for (int64_t v = 0; v < Dv; v++) store1(out, b * o_bs + t * o_ts + h * o_hs + v, xtype, acc[v]);
        }
    }
    free(q), free(o), free(ml), free(s), free(wide);
    return 0;
}

int dsv3_mla_attend(int64_t B, int64_t T, int64_t H, int64_t S, int64_t Dn, int64_t Dr, int64_t R, int64_t Dv,
                    const void *q_nope, const void *q_rope, int xtype, int64_t q_bs, int64_t q_ts, int64_t q_hs,
                    int64_t r_bs, int64_t r_ts, int64_t r_hs, const void *kv, int kvtype, int64_t kv_bs, int64_t kv_ss,
                    const void *w_uk, const void *w_uv_t, int wtype, float scale, const unsigned char *mask,
                    int64_t m_bs, int64_t m_ts, void *out, int64_t o_bs, int64_t o_ts, int64_t o_hs, int nthreads) {
    return mla_attend(B, T, H, S, Dn, Dr, R, Dv, q_nope, q_rope, xtype, q_bs, q_ts, q_hs, r_bs, r_ts, r_hs, kv, kvtype,
                      kv_bs, NULL, kv_ss, w_uk, w_uv_t, wtype, scale, mask, m_bs, m_ts, out, o_bs, o_ts, o_hs, nthreads);
}

// ------------------------------------------------------------------------------------ prefill attention
// MLA's expanded causal attention over a fresh prompt (dsv3.model.attention, `_attend_expanded` with no cache
// behind the prompt), in fp32 for CPUs whose bf16 products torch emulates: per row b, head h and query t,
//   s_j = scale * ([q_nope, q_rope] . [k_nope[j, h], k_rope[j]]) for keys j <= t,  out = softmax(s) @ v[:, h].
// torch's fused (flash) CPU kernel needs v as wide as q and k: MLA's v (64) is zero-padded to 96 there, a sixth
// of the products wasted, and the operands are widened, concatenated and transposed into new tensors first.
// Here each (row, head) widens its keys once, transposed by blocks of 64 (key j in column j), and its values,
// then walks its blocks of 64 queries, each over its key blocks with an online softmax (running max and sum, as `mla_attend`'s
// key chunks): q_nope / q_rope [B, T, H, d], kv [B, T, H, Dn + Dv] (k_nope then v), k_rope [B, T, Dr], any
// strides in (b, t, h), unit stride in d; out [B, T, H, Dv] contiguous, rounded once to the inputs' type.
// Register tiles: 6 queries x 16 keys (scores), 6 queries x 16 values (probabilities x values): 12 accumulators.
#define FA_BLOCK 64
#define FA_ROWS 66  // a block's query rows rounded up to the tiles' 6
static inline void fa_load_row(const void *p, int type, int64_t off, int64_t n, float *dst) {
    if (type == T_BF16) {
        const uint16_t *s = (const uint16_t *)p + off;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8_bf16(s + i));
        for (; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)p + off, sizeof(float) * (size_t)n);
    }
}

#define FA_TILE6(LOAD0, LOAD1, BCAST, STEP, N)                                                          \
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, \
           a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;                                       \
    for (int64_t d = 0; d < (N); d++) {                                                                 \
        const __m256 k0 = LOAD0, k1 = LOAD1;                                                            \
        __m256 b = BCAST(0);                                                                            \
        a00 = _mm256_fmadd_ps(b, k0, a00), a01 = _mm256_fmadd_ps(b, k1, a01);                           \
        b = BCAST(1), a10 = _mm256_fmadd_ps(b, k0, a10), a11 = _mm256_fmadd_ps(b, k1, a11);             \
        b = BCAST(2), a20 = _mm256_fmadd_ps(b, k0, a20), a21 = _mm256_fmadd_ps(b, k1, a21);             \
        b = BCAST(3), a30 = _mm256_fmadd_ps(b, k0, a30), a31 = _mm256_fmadd_ps(b, k1, a31);             \
        b = BCAST(4), a40 = _mm256_fmadd_ps(b, k0, a40), a41 = _mm256_fmadd_ps(b, k1, a41);             \
        b = BCAST(5), a50 = _mm256_fmadd_ps(b, k0, a50), a51 = _mm256_fmadd_ps(b, k1, a51);             \
    }

// s[i][j] (i < nq6 rows of q, row stride dq; j < 64) = q[i] . kt[:, j] (kt: dq rows of stride kts, key j column j).
static void fa_scores(const float *q, int64_t nq6, const float *kt, int64_t kts, int64_t dq, float *s) {
    for (int64_t i0 = 0; i0 < nq6; i0 += 6)
        for (int64_t j0 = 0; j0 < FA_BLOCK; j0 += 16) {
            const float *qi = q + i0 * dq, *kj = kt + j0;
#define FA_QB(r) _mm256_broadcast_ss(qi + (r) * dq + d)
            FA_TILE6(_mm256_loadu_ps(kj + d * kts), _mm256_loadu_ps(kj + d * kts + 8), FA_QB, , dq)
#undef FA_QB
            float *s0 = s + i0 * FA_BLOCK + j0;
            const __m256 acc[12] = {a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51};
            for (int r = 0; r < 6; r++)
                for (int h = 0; h < 2; h++) _mm256_storeu_ps(s0 + r * FA_BLOCK + 8 * h, acc[2 * r + h]);
        }
}

// o[i][c] += sum_{j < nk} p[i][j] v[j][c] for i < nq6, c < dv (a multiple of 16; o and v rows of stride dv).
static void fa_values(const float *p, int64_t nq6, int64_t nk, const float *v, int64_t dv, float *o) {
    for (int64_t i0 = 0; i0 < nq6; i0 += 6)
        for (int64_t c0 = 0; c0 < dv; c0 += 16) {
            const float *pi = p + i0 * FA_BLOCK, *vc = v + c0;
#define FA_PB(r) _mm256_broadcast_ss(pi + (r) * FA_BLOCK + d)
            FA_TILE6(_mm256_loadu_ps(vc + d * dv), _mm256_loadu_ps(vc + d * dv + 8), FA_PB, , nk)
#undef FA_PB
            float *o0 = o + i0 * dv + c0;
            const __m256 acc[12] = {a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51};
            for (int r = 0; r < 6; r++)
                for (int h = 0; h < 2; h++) {
                    float *op = o0 + r * dv + 8 * h;
                    _mm256_storeu_ps(op, _mm256_add_ps(_mm256_loadu_ps(op), acc[2 * r + h]));
                }
        }
}

int dsv3_prefill_attend(int64_t B, int64_t T, int64_t H, int64_t Dn, int64_t Dr, int64_t Dv, const void *q_nope,
                        const void *q_rope, int xtype, int64_t qn_bs, int64_t qn_ts, int64_t qn_hs, int64_t qr_bs,
                        int64_t qr_ts, int64_t qr_hs, const void *kv, int64_t kv_bs, int64_t kv_ts, int64_t kv_hs,
                        const void *k_rope, int64_t kr_bs, int64_t kr_ts, float scale, void *out, int nthreads) {
    if (B < 0 || T < 0 || H < 0 || Dn < 0 || Dr < 0 || Dv < 0 || (xtype != T_BF16 && xtype != T_F32)) return 2;
    const int64_t dq = Dn + Dr, dvp = (Dv + 15) / 16 * 16, nblk = (T + FA_BLOCK - 1) / FA_BLOCK;
    const int64_t Tp = nblk * FA_BLOCK;  // keys padded to whole blocks (zero keys and values, masked)
    const size_t per_thread = (size_t)(dq * Tp + Tp * dvp + FA_ROWS * dq + FA_ROWS * FA_BLOCK + FA_ROWS * dvp + 2 * FA_ROWS);
    const int nt = nthreads > 0 ? nthreads : 1;
    float *scratch = (float *)aligned_alloc(64, (sizeof(float) * per_thread * (size_t)nt + 63) / 64 * 64);
    if (!scratch) return 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t bh = 0; bh < B * H; bh++) {
        const int64_t b = bh / H, h = bh % H;
        float *kt = scratch + per_thread * (size_t)omp_get_thread_num(), *v = kt + dq * Tp, *qs = v + Tp * dvp;
        float *s = qs + FA_ROWS * dq, *o = s + FA_ROWS * FA_BLOCK, *mx = o + FA_ROWS * dvp, *l = mx + FA_ROWS;
        // This head's keys, transposed, and values, widened once for all its query blocks.
        float krow[dq > 0 ? dq : 1];
        for (int64_t j = 0; j < Tp; j++) {
            if (j < T) {
                fa_load_row(kv, xtype, b * kv_bs + j * kv_ts + h * kv_hs, Dn, krow);
                fa_load_row(k_rope, xtype, b * kr_bs + j * kr_ts, Dr, krow + Dn);
                fa_load_row(kv, xtype, b * kv_bs + j * kv_ts + h * kv_hs + Dn, Dv, v + j * dvp);
                for (int64_t c = Dv; c < dvp; c++) v[j * dvp + c] = 0.0f;
            } else {
                memset(krow, 0, sizeof(float) * (size_t)dq);
                memset(v + j * dvp, 0, sizeof(float) * (size_t)dvp);
            }
            float *ktb = kt + (j / FA_BLOCK) * dq * FA_BLOCK + j % FA_BLOCK;  // key blocks of [dq][64], contiguous
            for (int64_t d = 0; d < dq; d++) ktb[d * FA_BLOCK] = krow[d];
        }
        for (int64_t t0 = 0; t0 < T; t0 += FA_BLOCK) {
            const int64_t nq = T - t0 < FA_BLOCK ? T - t0 : FA_BLOCK, nq6 = (nq + 5) / 6 * 6;
            memset(qs, 0, sizeof(float) * (size_t)(FA_ROWS * dq));  // rows past nq: computed, never stored
            for (int64_t i = 0; i < nq; i++) {
                fa_load_row(q_nope, xtype, b * qn_bs + (t0 + i) * qn_ts + h * qn_hs, Dn, qs + i * dq);
                fa_load_row(q_rope, xtype, b * qr_bs + (t0 + i) * qr_ts + h * qr_hs, Dr, qs + i * dq + Dn);
            }
            memset(o, 0, sizeof(float) * (size_t)(FA_ROWS * dvp));
            for (int64_t i = 0; i < FA_ROWS; i++) mx[i] = -INFINITY, l[i] = 0.0f;
            for (int64_t j0 = 0; j0 < t0 + nq; j0 += FA_BLOCK) {  // causal: keys up to the block's last query
                const int64_t nk = T - j0 < FA_BLOCK ? T - j0 : FA_BLOCK;
                fa_scores(qs, nq6, kt + j0 * dq, FA_BLOCK, dq, s);
                for (int64_t i = 0; i < nq; i++) {  // online softmax: scale, mask, running max and sum
                    float *si = s + i * FA_BLOCK, bmx = -INFINITY;
                    const int64_t last = t0 + i - j0;  // keys 0..last of this block are visible
                    if (last >= FA_BLOCK - 1 && nk == FA_BLOCK) {  // the whole block (below the diagonal): 8 lanes
                        const __m256 sc = _mm256_set1_ps(scale);
                        __m256 m8 = _mm256_set1_ps(-INFINITY);
                        for (int64_t j = 0; j < FA_BLOCK; j += 8) {
                            const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(si + j), sc);
                            _mm256_storeu_ps(si + j, x);
                            m8 = _mm256_max_ps(m8, x);
                        }
                        bmx = hmax(m8);
                    } else {
                        for (int64_t j = 0; j < FA_BLOCK; j++) {
                            si[j] = j <= last && j < nk ? si[j] * scale : -INFINITY;
                            bmx = si[j] > bmx ? si[j] : bmx;
                        }
                    }
                    online_softmax_step(si, FA_BLOCK, bmx, mx + i, l + i, o + i * dvp, dvp);
                }
                for (int64_t i = nq; i < nq6; i++) memset(s + i * FA_BLOCK, 0, sizeof(float) * FA_BLOCK);
                fa_values(s, nq6, nk, v + j0 * dvp, dvp, o);
            }
            for (int64_t i = 0; i < nq; i++) {
                const float inv = 1.0f / l[i];
                for (int64_t c = 0; c < Dv; c++)
                    store1(out, ((b * T + t0 + i) * H + h) * Dv + c, xtype, o[i * dvp + c] * inv);
            }
        }
    }
    free(scratch);
    return 0;
}

// One token of `dsv3_combine` in fp32: y = sum_k h[rows[k]] * w[k], each product rounded before its sum (no FMA:
// torch multiplies, then sums).
__attribute__((optimize("fp-contract=off"))) static void combine_f32(int64_t K, int64_t D, const float *h,
                                                                      const int64_t *rows, const float *w, float *y) {
    for (int64_t d = 0; d < D; d++) y[d] = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        const float wk = w[k], *hr = h + rows[k] * D;
        for (int64_t d = 0; d < D; d++) y[d] += hr[d] * wk;
    }
}

// One token of `dsv3_combine` in bf16: the weight and each product rounded to bf16, the sum in fp32, rounded once.
static void combine_bf16(int64_t K, int64_t D, const uint16_t *h, const int64_t *rows, const float *w, uint16_t *y) {
    float wk[64], acc[8];
    for (int64_t k = 0; k < K; k++) wk[k] = bf16_to_f32(f32_to_bf16(w[k]));
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        __m256 sum = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k++) {
            const __m256 p = _mm256_mul_ps(load8_bf16(h + rows[k] * D + d), _mm256_set1_ps(wk[k]));
            // round8_bf16 would turn a NaN with only low mantissa bits into an infinity: keep NaNs as they are
            sum = _mm256_add_ps(sum, _mm256_blendv_ps(round8_bf16(p), p, _mm256_cmp_ps(p, p, _CMP_UNORD_Q)));
        }
        _mm256_storeu_ps(acc, sum);
        for (int i = 0; i < 8; i++) y[d + i] = f32_to_bf16(acc[i]);
    }
    for (; d < D; d++) {
        float sum = 0.0f;
        for (int64_t k = 0; k < K; k++) sum += bf16_to_f32(f32_to_bf16(bf16_to_f32(h[rows[k] * D + d]) * wk[k]));
        y[d] = f32_to_bf16(sum);
    }
}

// The routed experts' combine (`moe.combine`) for T tokens of K assignments: sorted row n holds assignment
// order[n] = t*K + k, and y[t] = sum_k h[row of (t, k)] * w[t, k], with the roundings of the torch ops (for bf16
// the weight and each product rounded to bf16, the sum over k in order in fp32, rounded once). One pass over h.
int dsv3_combine(int64_t T, int64_t K, int64_t D, const void *h, int type, const int64_t *order, const float *w,
                 void *y, int nthreads) {
    const int64_t N = T * K;
    if (K > 64) return 2;
    int64_t *row = (int64_t *)malloc(sizeof(int64_t) * (size_t)(N > 0 ? N : 1));
    if (!row) return 1;
    for (int64_t n = 0; n < N; n++) row[n] = -1;
    for (int64_t n = 0; n < N; n++) {
        if (order[n] < 0 || order[n] >= N || row[order[n]] >= 0) {  // not a permutation
            free(row);
            return 2;
        }
        row[order[n]] = n;
    }
#pragma omp parallel for schedule(static) num_threads(threads_for(N * D, nthreads))
    for (int64_t t = 0; t < T; t++) {
        if (type == T_BF16)
            combine_bf16(K, D, (const uint16_t *)h, row + t * K, w + t * K, (uint16_t *)y + t * D);
        else
            combine_f32(K, D, (const float *)h, row + t * K, w + t * K, (float *)y + t * D);
    }
    free(row);
    return 0;
}

// RMSNorm of R rows of D values (row strides x_rs, y_rs): n = x * rsqrt(mean(x^2) + eps) in fp32, rounded to
// the activation type, then times the weight (same type) and rounded again: what `RMSNorm.forward` does in
// torch ops (HF's order: the weight multiplies the normalised value in the activation dtype).
int dsv3_rms_norm(int64_t R, int64_t D, const void *x, int type, int64_t x_rs, const void *w, float eps, void *y,
                  int64_t y_rs) {
    for (int64_t r = 0; r < R; r++) {
        float ss = 0.0f;
        for (int64_t d = 0; d < D; d++) {
            const float v = load1(x, r * x_rs + d, type);
            ss += v * v;
        }
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int64_t d = 0; d < D; d++) {
            float n = load1(x, r * x_rs + d, type) * inv;
            if (type == T_BF16) n = bf16_to_f32(f32_to_bf16(n));
            store1(y, r * y_rs + d, type, load1(w, d, type) * n);
        }
    }
    return 0;
}

// Rotary embedding of R rows (row stride x_rs) of H heads (head stride x_hs) of d = 2*P values: each adjacent
// pair (a, b) becomes (a c - b s, a s + b c) in fp32 with the row's cos/sin (P floats each, row stride cs_rs),
// rounded to the activation type; written to y (rows of H x 2P values, row stride y_rs).
int dsv3_rope(int64_t R, int64_t H, int64_t P, const void *x, int type, int64_t x_rs, int64_t x_hs, const float *cos_,
              const float *sin_, int64_t cs_rs, void *y, int64_t y_rs) {
    for (int64_t r = 0; r < R; r++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t p = 0; p < P; p++) {
                const int64_t i = r * x_rs + h * x_hs + 2 * p, o = r * y_rs + h * 2 * P + 2 * p;
                const float a = load1(x, i, type), b = load1(x, i + 1, type);
                const float c = cos_[r * cs_rs + p], s = sin_[r * cs_rs + p];
                store1(y, o, type, a * c - b * s);
                store1(y, o + 1, type, a * s + b * c);
            }
    return 0;
}

// ---------------------------------------------------------------------------------------------- decoder layer
// One pre-norm decoder layer for a few tokens (dsv3.model.transformer.DecoderLayer with MLA attention over
// the latent cache and a dense or MoE feed-forward), in one call: the kernels above in sequence, with the
// activations rounded to their type wherever the module path rounds them (each op's output), so the result
// equals the per-module native path.

typedef struct {
    const void *w;        // [rows, cols] row-major, NULL when absent
    const float *scale;   // per-row float32 scale for int8 weights, else NULL
    int64_t rows, cols;
    int type;
    fp8_grid fp8;         // FP8 weights' block scales (grid NULL otherwise)
} dsv3_proj;

typedef struct {
    int64_t D, H, Dn, Dr, Dv, R, QR;  // QR: q LoRA rank (0: q_in is q_proj itself)
    int xtype;
    float eps_in, eps_post, eps_q, eps_kv;
    const void *norm_in, *norm_post, *norm_q, *norm_kv;  // RMSNorm weights in the activation type
    dsv3_proj q_in, kv_a, q_b, o_proj;                   // kv_a.rows == 0: q_in holds [q_in; kv_a] fused
    const void *w_uk, *w_uv_t;                           // absorbed [H, Dn, R], [H, R, Dv], activation type
    float softmax_scale;
    dsv3_proj mlp_gate, mlp_up, mlp_down;                // dense MLP or shared experts; up.rows == 0: gate fused
    int64_t E, K, F;                                     // routed experts (E == 0: dense layer)
    const float *router_w, *bias;
    int scoring, method;
    int64_t n_group, topk_group;
    int norm_topk;
    float scaling;
    const void *gate, *up, *down;
    int etype;
    int64_t gu_es, down_es;
    const float *gate_scale, *up_scale, *down_scale;
    fp8_grid expert_fp8[3];  // FP8 experts: gate, up, down grids (grid_es set)
} dsv3_layer;

static inline float round_to(float v, int type) { return type == T_BF16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

// y[M, p.rows] (row stride ys) = x[M, p.cols] (row stride xs) @ p.w^T
static int project(const dsv3_proj *p, int64_t M, const void *x, int xtype, int64_t xs, void *y, int64_t ys,
                   int nthreads) {
    return dsv3_linear(1, M, p->rows, p->cols, x, xtype, 0, xs, p->w, p->type, 0, p->cols, p->scale, 0,
                       p->type == T_FP8 ? &p->fp8 : NULL, y, xtype, 0, ys, nthreads);
}

// SwiGLU MLP of M rows h [M, D] -> y [M, D]: gate/up products rounded, silu rounded, product rounded.
static int mlp_rows(const dsv3_layer *L, int64_t M, const void *h, void *y, int nthreads) {
    const int t = L->xtype;
    const size_t asz = t == T_F32 ? 4 : 2;
    const int fused = L->mlp_up.rows == 0;
    const int64_t Fm = fused ? L->mlp_gate.rows / 2 : L->mlp_gate.rows;
    void *gu = malloc(asz * (size_t)(M * 2 * Fm) + 64), *a = malloc(asz * (size_t)(M * Fm) + 64);
    int rc = 1;
    if (!gu || !a) goto done;
    if ((rc = project(&L->mlp_gate, M, h, t, L->D, gu, 2 * Fm, nthreads))) goto done;
    if (!fused && (rc = project(&L->mlp_up, M, h, t, L->D, (char *)gu + asz * (size_t)Fm, 2 * Fm, nthreads))) goto done;
    // An expf a value (~20 cycles): as much as streaming the gate/up rows where they are short, so split too.
#pragma omp parallel for schedule(static) num_threads(threads_for(M * Fm * 16, nthreads))
    for (int64_t i = 0; i < M * Fm; i++) {
        const int64_t m = i / Fm, f = i % Fm;
        const float g = load1(gu, m * 2 * Fm + f, t), u = load1(gu, m * 2 * Fm + Fm + f, t);
        store1(a, i, t, round_to(silu(g), t) * u);
    }
    rc = project(&L->mlp_down, M, a, t, Fm, y, L->D, nthreads);
done:
    free(gu), free(a);
    return rc;
}

// x [B*T, D] -> out [B*T, D]. cos/sin [B*T, Dr/2] float32. The layer's cache: `store` (activation type) with
// row b's slot at store + slot_off[b] elements, C = R + Dr values per position; the real new tokens are
// written at write_off[b*T + t] (elements into store; -1: padding, not written) before attending to the
// first S positions of each slot under mask [B, T, S] (NULL: causal).
int dsv3_decode_layer(const dsv3_layer *L, int64_t B, int64_t T, const void *x, void *out, const float *cos_,
                      const float *sin_, void *store, const int64_t *slot_off, const int64_t *write_off, int64_t S,
                      const unsigned char *mask, int nthreads) {
    const int t = L->xtype;
    const size_t asz = t == T_F32 ? 4 : 2;
    const int64_t M = B * T, D = L->D, H = L->H, Dn = L->Dn, Dr = L->Dr, R = L->R, C = R + Dr;
    const int64_t QH = H * (Dn + Dr);
    const int64_t NQ = L->QR ? L->QR : QH, NX = NQ + C;  // xp = [q_in(h), kv_a(h)]
    void *h = malloc(asz * (size_t)(M * D) + 64), *xp = malloc(asz * (size_t)(M * NX) + 64);
    void *qa = malloc(asz * (size_t)(M * (L->QR + 1)) + 64), *qb = malloc(asz * (size_t)(M * QH) + 64);
    void *qr = malloc(asz * (size_t)(M * H * Dr) + 64), *kvn = malloc(asz * (size_t)(M * C) + 64);
    void *att = malloc(asz * (size_t)(M * H * L->Dv) + 64), *x1 = malloc(asz * (size_t)(M * D) + 64);
    void *y = malloc(asz * (size_t)(M * D) + 64), *sh = malloc(asz * (size_t)(M * D) + 64);
    int rc = 1;
    if (!h || !xp || !qa || !qb || !qr || !kvn || !att || !x1 || !y || !sh) goto done;
    // Attention: norm, input projections (one fused product or two into one buffer), queries, latent.
    dsv3_rms_norm(M, D, x, t, D, L->norm_in, L->eps_in, h, D);
    PROFILED(PROF_Q_IN, rc = project(&L->q_in, M, h, t, D, xp, NX, nthreads);
             if (!rc && L->kv_a.rows) rc = project(&L->kv_a, M, h, t, D, (char *)xp + asz * (size_t)NQ, NX, nthreads));
    if (rc) goto done;
    const void *q = xp;
    int64_t q_rs = NX;
    if (L->QR) {
        dsv3_rms_norm(M, L->QR, xp, t, NX, L->norm_q, L->eps_q, qa, L->QR);
        PROFILED(PROF_Q_B, rc = project(&L->q_b, M, qa, t, L->QR, qb, QH, nthreads));
        if (rc) goto done;
        q = qb, q_rs = QH;
    }
    dsv3_rope(M, H, Dr / 2, (const char *)q + asz * (size_t)Dn, t, q_rs, Dn + Dr, cos_, sin_, Dr / 2, qr, H * Dr);
    dsv3_rms_norm(M, R, (const char *)xp + asz * (size_t)NQ, t, NX, L->norm_kv, L->eps_kv, kvn, C);
    dsv3_rope(M, 1, Dr / 2, (const char *)xp + asz * (size_t)(NQ + R), t, NX, 0, cos_, sin_, Dr / 2,
              (char *)kvn + asz * (size_t)R, C);
    for (int64_t m = 0; m < M; m++)
        if (write_off[m] >= 0) memcpy((char *)store + asz * (size_t)write_off[m], (char *)kvn + asz * (size_t)(m * C), asz * (size_t)C);
    PROFILED(PROF_ATTEND,
             rc = mla_attend(B, T, H, S, Dn, Dr, R, L->Dv, q, qr, t, T * q_rs, q_rs, Dn + Dr, T * H * Dr, H * Dr, Dr,
                             store, t, 0, slot_off, C, L->w_uk, L->w_uv_t, t, L->softmax_scale, mask, T * S, S, att,
                             T * H * L->Dv, H * L->Dv, L->Dv, nthreads));
    if (rc) goto done;
    PROFILED(PROF_O_PROJ, rc = project(&L->o_proj, M, att, t, H * L->Dv, y, D, nthreads));
    if (rc) goto done;
    for (int64_t i = 0; i < M * D; i++) store1(x1, i, t, load1(x, i, t) + load1(y, i, t));
    // Feed-forward: norm, then the routed experts plus the shared ones, or the dense MLP.
    dsv3_rms_norm(M, D, x1, t, D, L->norm_post, L->eps_post, h, D);
    if (L->E) {
        PROFILED(PROF_ROUTED,
                 rc = dsv3_moe(M, D, L->F, L->E, L->K, h, t, L->router_w, L->bias, L->scoring, L->method, L->n_group,
                               L->topk_group, L->norm_topk, L->scaling, L->gate, L->up, L->etype, L->gu_es,
                               L->gate_scale, L->up_scale, L->down, L->down_es, L->down_scale,
                               L->etype == T_FP8 ? L->expert_fp8 : NULL, y, NULL, NULL, nthreads));
        if (rc) goto done;
        if (L->mlp_gate.rows) {
            PROFILED(PROF_SHARED, rc = mlp_rows(L, M, h, sh, nthreads));
            if (rc) goto done;
            for (int64_t i = 0; i < M * D; i++) store1(y, i, t, load1(y, i, t) + load1(sh, i, t));
        }
    } else {
        PROFILED(PROF_DENSE, rc = mlp_rows(L, M, h, y, nthreads));
        if (rc) goto done;
    }
    for (int64_t i = 0; i < M * D; i++) store1(out, i, t, load1(x1, i, t) + load1(y, i, t));
done:
    free(h), free(xp), free(qa), free(qb), free(qr), free(kvn), free(att), free(x1), free(y), free(sh);
    return rc;
}

// The decoder layers of one decode step in sequence (`dsv3_decode_layer` each), x -> out [B*T, D]: layer l
// attends over its cache at stores[l]; positions, offsets and mask are the same for every layer. One call
// instead of one per layer: the Python between layers costs more than the small layers' C (caches go cold).
// x is read, not written; the layers alternate between out and one scratch buffer, the last writing out.
int dsv3_decode_layers(int64_t n, const dsv3_layer *const *L, void *const *stores, int64_t B, int64_t T,
                       const void *x, void *out, const float *cos_, const float *sin_, const int64_t *slot_off,
                       const int64_t *write_off, int64_t S, const unsigned char *mask, int nthreads) {
    if (n <= 0) return 2;
    void *scratch = NULL;
    if (n > 1 && !(scratch = malloc((L[0]->xtype == T_F32 ? 4 : 2) * (size_t)(B * T * L[0]->D) + 64))) return 1;
    const void *cur = x;
    int rc = 0;
    for (int64_t l = 0; l < n && !rc; l++) {
        void *dst = (n - 1 - l) % 2 == 0 ? out : scratch;
        rc = dsv3_decode_layer(L[l], B, T, cur, dst, cos_, sin_, stores[l], slot_off, write_off, S, mask, nthreads);
        cur = dst;
    }
    free(scratch);
    return rc;
}

// out[r] = the index of row r's largest value (x: R rows of V floats, row stride rs), as torch.argmax: the first
// NaN if the row has one, else the first index holding the maximum. Greedy sampling reads one per decoded row.
int dsv3_argmax_rows(int64_t R, int64_t V, const float *x, int64_t rs, int64_t *out) {
    for (int64_t r = 0; r < R; r++) {
        const float *row = x + r * rs;
        __m256 vmax = _mm256_set1_ps(-INFINITY), vnan = _mm256_setzero_ps();
        int64_t v = 0;
        for (; v + 8 <= V; v += 8) {
            const __m256 a = _mm256_loadu_ps(row + v);
            vmax = _mm256_max_ps(vmax, a);
            vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        }
        float m = -INFINITY;
        int nan = _mm256_movemask_ps(vnan) != 0;
        if (v) {
            float lanes[8];
            _mm256_storeu_ps(lanes, vmax);
            for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
        }
        for (int64_t t = v; t < V; t++) {
            nan |= isnan(row[t]);
            m = row[t] > m ? row[t] : m;
        }
        int64_t best = 0;
        for (int64_t t = 0; t < V; t++)
            if (nan ? isnan(row[t]) : row[t] == m) {
                best = t;
                break;
            }
        out[r] = best;
    }
    return 0;
}

// `dsv3_decode_layers` for a pass described by the cache's state instead of per-row tensors: row b appends n_new[b]
// (<= T) tokens to slot slots[b] after its starts[b] cached ones. Built here, as `CacheBatch` builds them in torch:
// the rotary angles of position starts[b] + t (rows of the tables rope_cos / rope_sin [rope_len, Dr/2], which
// `RotaryEmbedding.table` fills with what it computes for those positions), the write offsets (-1: right padding),
// and the mask (query t sees key j < S iff j <= starts[b] + t and j < starts[b] + n_new[b]; key 0 always).
// Returns 3 when a position is past the tables.
int dsv3_decode_pass(int64_t n, const dsv3_layer *const *L, void *const *stores, int64_t B, int64_t T, const void *x,
                     void *out, const float *rope_cos, const float *rope_sin, int64_t rope_len, const int64_t *slots,
                     const int64_t *starts, const int64_t *n_new, int64_t slot_stride, int64_t pos_stride, int64_t S,
                     int nthreads) {
    if (n <= 0) return 2;
    const int64_t P = L[0]->Dr / 2;
    for (int64_t b = 0; b < B; b++)
        if (starts[b] < 0 || starts[b] + T > rope_len) return 3;
    float *cs = malloc(sizeof(float) * (size_t)(2 * B * T * P) + 64);
    int64_t *off = malloc(sizeof(int64_t) * (size_t)(B + B * T) + 64);
    unsigned char *mask = malloc((size_t)(B * T * S) + 64);
    int rc = 1;
    if (cs && off && mask) {
        float *cos_ = cs, *sin_ = cs + B * T * P;
        int64_t *slot_off = off, *write_off = off + B;
        for (int64_t b = 0; b < B; b++) {
            slot_off[b] = slots[b] * slot_stride;
            const int64_t end = starts[b] + n_new[b];
            for (int64_t t = 0; t < T; t++) {
                const int64_t m = b * T + t, pos = starts[b] + t;
                memcpy(cos_ + m * P, rope_cos + pos * P, sizeof(float) * (size_t)P);
                memcpy(sin_ + m * P, rope_sin + pos * P, sizeof(float) * (size_t)P);
                write_off[m] = t < n_new[b] ? slot_off[b] + pos * pos_stride : -1;
                unsigned char *row = mask + m * S;
                for (int64_t j = 0; j < S; j++) row[j] = j <= pos && j < end;
                row[0] = 1;
            }
        }
        rc = dsv3_decode_layers(n, L, stores, B, T, x, out, cos_, sin_, slot_off, write_off, S, mask, nthreads);
    }
    free(cs), free(off), free(mask);
    return rc;
}

// The model's head: final RMSNorm weight (activation type) and eps, then the vocabulary projection.
typedef struct {
    const void *norm;
    float eps;
    dsv3_proj proj;
} dsv3_head;

// One decode step of B rows, T tokens each, from token ids to logits, the cache's lengths read and advanced here:
// row b embeds ids[b*T .. b*T+T) (rows of `embed` [V, D], activation type), appends them to slot slots[b] at
// positions lengths[slots[b]] + t (`dsv3_decode_pass`), and gets logits [B*T, V]: the final norm and `head` (float32
// out, holding bf16 values for bf16 activations: the model's logits, row stride head->proj.rows). hidden, when not
// NULL, receives the stack's output [B*T, D] (activation type: the final norm's input, what MTP drafting reads).
// lengths[slots[b]] advances by T once everything succeeded. T = 1 is a plain decode step; T = 2 verifies a draft.
// Returns 4 when a slot has no room for T more positions (max_len), 5 for an id outside [0, V), 6 for a slot
// outside [0, num_slots); nothing is written then.
int dsv3_decode_step(int64_t n, const dsv3_layer *const *L, void *const *stores, int64_t B, int64_t T,
                     const int64_t *ids, const void *embed, int64_t V, const dsv3_head *head, float *logits,
                     void *hidden, const float *rope_cos, const float *rope_sin, int64_t rope_len,
                     const int64_t *slots, int64_t num_slots, int64_t *lengths, int64_t max_len, int64_t slot_stride,
                     int64_t pos_stride, int nthreads) {
    if (n <= 0 || B <= 0 || T <= 0) return 2;
    const int t = L[0]->xtype;
    const int64_t D = L[0]->D, M = B * T;
    const size_t asz = t == T_F32 ? 4 : 2;
    int64_t S = 0;
    for (int64_t b = 0; b < B; b++)
        if (slots[b] < 0 || slots[b] >= num_slots) return 6;
    for (int64_t b = 0; b < B; b++) {
        if (lengths[slots[b]] + T > max_len) return 4;
        S = lengths[slots[b]] + T > S ? lengths[slots[b]] + T : S;
    }
    for (int64_t m = 0; m < M; m++)
        if (ids[m] < 0 || ids[m] >= V) return 5;
    int64_t *meta = malloc(sizeof(int64_t) * (size_t)(2 * B) + 64);
    char *x = malloc(asz * (size_t)(3 * M * D) + 64);
    int rc = 1;
    if (meta && x) {
        int64_t *starts = meta, *counts = meta + B;
        char *h = hidden ? (char *)hidden : x + asz * (size_t)(M * D), *hn = x + asz * (size_t)(2 * M * D);
        for (int64_t b = 0; b < B; b++) starts[b] = lengths[slots[b]], counts[b] = T;
        for (int64_t m = 0; m < M; m++)
            memcpy(x + asz * (size_t)(m * D), (const char *)embed + asz * (size_t)(ids[m] * D), asz * (size_t)D);
        PROFILED(PROF_LAYERS, rc = dsv3_decode_pass(n, L, stores, B, T, x, h, rope_cos, rope_sin, rope_len, slots,
                                                    starts, counts, slot_stride, pos_stride, S, nthreads));
        if (!rc) {
            const dsv3_proj *p = &head->proj;
            PROFILED(PROF_HEAD, dsv3_rms_norm(M, D, h, t, D, head->norm, head->eps, hn, D);
                     rc = dsv3_linear(1, M, p->rows, p->cols, hn, t, 0, D, p->w, p->type, 0, p->cols, p->scale, 0,
                                      p->type == T_FP8 ? &p->fp8 : NULL, logits, t == T_BF16 ? T_F32_BF16 : T_F32, 0,
                                      p->rows, nthreads));
        }
#ifdef DSV3_PROFILE
        dsv3_profile[PROF_STEPS] += 1;
#endif
        if (!rc)  // as `CacheBatch.commit`: a slot named twice advances once
            for (int64_t b = 0; b < B; b++) lengths[slots[b]] = starts[b] + T;
    }
    free(meta), free(x);
    return rc;
}

// Greedy decoding of B rows for up to n_steps steps in one call: `dsv3_decode_step` (T = 1) over the running rows,
// then each one's argmax over the first `limit` ids (`dsv3_argmax_rows`) appended to out[b * n_steps + counts[b]]
// and fed next. Row b starts from ids[b] in slot slots[b]; it stops after an id in stops[0 .. n_stops) or at n_steps
// tokens, and the later steps run without it, in the same order: the batches, so the bits, of one step a call
// (`generate.stream`). Why: between steps a call costs ~0.7 ms of Python on `small` (its checks run on caches
// the step just flushed), 5-7% of an 8-bit step. Returns what `dsv3_decode_step` returns (1 out of memory);
// counts[b] tokens of row b are valid then too.
int dsv3_decode_greedy(int64_t n, const dsv3_layer *const *L, void *const *stores, int64_t B, const int64_t *ids,
                       const void *embed, int64_t V, const dsv3_head *head, const float *rope_cos,
                       const float *rope_sin, int64_t rope_len, const int64_t *slots, int64_t num_slots,
                       int64_t *lengths, int64_t max_len, int64_t slot_stride, int64_t pos_stride, int64_t limit,
                       int64_t n_steps, const int64_t *stops, int64_t n_stops, int64_t *out, int64_t *counts,
                       int nthreads) {
    if (B <= 0 || n_steps <= 0) return B < 0 || n_steps < 0 ? 2 : 0;
    const int64_t HV = head->proj.rows;
    if (limit <= 0 || limit > HV) return 2;
    int64_t *meta = malloc(sizeof(int64_t) * (size_t)(4 * B) + 64);
    float *logits = (float *)aligned_alloc(64, (size_t)((B * HV * 4 + 63) / 64 * 64 + 64));
    if (!meta || !logits) {
        free(meta), free(logits);
        return 1;
    }
    int64_t *rows = meta, *run_slots = meta + B, *run_ids = meta + 2 * B, *top = meta + 3 * B;
    for (int64_t b = 0; b < B; b++) rows[b] = b, run_slots[b] = slots[b], run_ids[b] = ids[b], counts[b] = 0;
    int rc = 0;
    for (int64_t running = B; running > 0;) {
        rc = dsv3_decode_step(n, L, stores, running, 1, run_ids, embed, V, head, logits, NULL, rope_cos, rope_sin,
                              rope_len, run_slots, num_slots, lengths, max_len, slot_stride, pos_stride, nthreads);
        if (rc) break;
        dsv3_argmax_rows(running, limit, logits, HV, top);
        int64_t kept = 0;
        for (int64_t i = 0; i < running; i++) {
            const int64_t b = rows[i], id = top[i];
            out[b * n_steps + counts[b]++] = id;
            int stop = counts[b] >= n_steps;
            for (int64_t j = 0; j < n_stops && !stop; j++) stop = id == stops[j];
            if (!stop) rows[kept] = b, run_slots[kept] = run_slots[i], run_ids[kept++] = id;
        }
        running = kept;
    }
    free(meta), free(logits);
    return rc;
}

// A multi-token-prediction module's input side: its embedding [V, D], the norms of that embedding (enorm) and of the
// main model's hidden state (hnorm), and the projection of their concatenation [2D -> D]; then its head.
typedef struct {
    const void *embed, *enorm, *hnorm;
    float eps_e, eps_h;
    dsv3_proj eh;
    dsv3_head head;
} dsv3_mtp;

// An MTP module's draft for B rows (`MTPLayer.forward` with logits at one position a row, decode-sized): row b feeds
// its first n_new[b] (1..T) positions, main-model hidden states hidden[b*T + t] (activation type [B*T, D]) beside
// the ids of the tokens after them ids[b*T + t], to the module's decoder layer L (cache store `store`, the module's
// latent cache) at positions lengths[slots[b]] + t, and gets the logits [B, V] of its last one (float32, as
// `dsv3_decode_step`'s). lengths[slots[b]] advances by n_new[b]. Padding positions (t >= n_new[b]) are computed on
// id 0 and never written to the cache. Returns 4, 5, 6 as `dsv3_decode_step` (7: an n_new outside [1, T]).
int dsv3_mtp_draft(const dsv3_layer *L, void *store, const dsv3_mtp *mtp, int64_t B, int64_t T, const int64_t *ids,
                   const int64_t *n_new, const void *hidden, int64_t V, float *logits, const float *rope_cos,
                   const float *rope_sin, int64_t rope_len, const int64_t *slots, int64_t num_slots, int64_t *lengths,
                   int64_t max_len, int64_t slot_stride, int64_t pos_stride, int nthreads) {
    if (B <= 0 || T <= 0) return 2;
    const int t = L->xtype;
    const int64_t D = L->D, M = B * T;
    const size_t asz = t == T_F32 ? 4 : 2;
    int64_t S = 0;
    for (int64_t b = 0; b < B; b++)
        if (slots[b] < 0 || slots[b] >= num_slots) return 6;
    for (int64_t b = 0; b < B; b++) {
        if (n_new[b] < 1 || n_new[b] > T) return 7;
        if (lengths[slots[b]] + n_new[b] > max_len) return 4;
        for (int64_t j = 0; j < n_new[b]; j++)
            if (ids[b * T + j] < 0 || ids[b * T + j] >= V) return 5;
        S = lengths[slots[b]] + n_new[b] > S ? lengths[slots[b]] + n_new[b] : S;  // as `LatentCache.bind`
    }
    const dsv3_layer *const layers[1] = {L};
    void *const stores[1] = {store};
    int64_t *starts = malloc(sizeof(int64_t) * (size_t)B + 64);
    char *x = malloc(asz * (size_t)(M * 2 * D + 2 * M * D + 2 * B * D) + 64);
    int rc = 1;
    if (starts && x) {
        char *cat = x, *e = cat + asz * (size_t)(M * 2 * D), *h = e + asz * (size_t)(M * D);
        char *last = h + asz * (size_t)(M * D), *ln = last + asz * (size_t)(B * D);
        for (int64_t b = 0; b < B; b++) starts[b] = lengths[slots[b]];
        for (int64_t m = 0; m < M; m++) {
            const int64_t id = m % T < n_new[m / T] ? ids[m] : 0;
            memcpy(e + asz * (size_t)(m * D), (const char *)mtp->embed + asz * (size_t)(id * D),
                   asz * (size_t)D);
        }
        // cat(enorm(embed(ids)), hnorm(hidden)) -> eh_proj -> the decoder layer
        dsv3_rms_norm(M, D, e, t, D, mtp->enorm, mtp->eps_e, cat, 2 * D);
        dsv3_rms_norm(M, D, hidden, t, D, mtp->hnorm, mtp->eps_h, cat + asz * (size_t)D, 2 * D);
        rc = project(&mtp->eh, M, cat, t, 2 * D, e, D, nthreads);
        if (!rc)
            rc = dsv3_decode_pass(1, layers, stores, B, T, e, h, rope_cos, rope_sin, rope_len, slots, starts, n_new,
                                  slot_stride, pos_stride, S, nthreads);
        if (!rc) {
            for (int64_t b = 0; b < B; b++)
                memcpy(last + asz * (size_t)(b * D), h + asz * (size_t)((b * T + n_new[b] - 1) * D), asz * (size_t)D);
            dsv3_rms_norm(B, D, last, t, D, mtp->head.norm, mtp->head.eps, ln, D);
            const dsv3_proj *p = &mtp->head.proj;
            rc = dsv3_linear(1, B, p->rows, p->cols, ln, t, 0, D, p->w, p->type, 0, p->cols, p->scale, 0,
                             p->type == T_FP8 ? &p->fp8 : NULL, logits, t == T_BF16 ? T_F32_BF16 : T_F32, 0,
                             p->rows, nthreads);
        }
        if (!rc)
            for (int64_t b = 0; b < B; b++) lengths[slots[b]] = starts[b] + n_new[b];
    }
    free(starts), free(x);
    return rc;
}

// One greedy speculative step of B rows (`speculative_step` for rows at temperature 0), in one call: the MTP module
// drafts from each row's pending positions (`dsv3_mtp_draft`: mtp_n[b] of them, hidden states mtp_hidden [B*2, D]
// and the ids after them mtp_ids [B*2]; its cache is mtp_store, lengths mtp_lengths), the draft d is its argmax; the
// main model verifies [last[b], d] (`dsv3_decode_step` with T = 2, lengths); with a0, a1 the argmaxes of the two
// positions, the row takes [d, a1] when a0 == d and [a0] otherwise, dropping d's cache entry. Argmaxes run over the
// first `limit` ids. Out: tokens [B*2] (-1 after a row's count), counts [B], hidden [B*2, D] (the main stack's output
// at both positions: the MTP inputs of the next step). The two caches share max_len and strides.
// Returns 4, 5, 6, 7 as `dsv3_mtp_draft` / `dsv3_decode_step`, checked for both passes before anything is written.
int dsv3_speculative_step(int64_t n, const dsv3_layer *const *L, void *const *stores, const dsv3_head *head,
                          const void *embed, int64_t V, const dsv3_layer *mtp_layer, void *mtp_store,
                          const dsv3_mtp *mtp, int64_t mtp_V, int64_t limit, int64_t B, const int64_t *slots,
                          int64_t num_slots, const int64_t *last, const int64_t *mtp_ids, const int64_t *mtp_n,
                          const void *mtp_hidden, int64_t *tokens, int64_t *counts, void *hidden,
                          const float *rope_cos, const float *rope_sin, int64_t rope_len, int64_t *lengths,
                          int64_t *mtp_lengths, int64_t max_len, int64_t slot_stride, int64_t pos_stride,
                          int nthreads) {
    if (n <= 0 || B <= 0 || limit <= 0 || limit > V || limit > mtp_V) return 2;
    for (int64_t b = 0; b < B; b++)
        if (slots[b] < 0 || slots[b] >= num_slots) return 6;
    for (int64_t b = 0; b < B; b++) {
        if (mtp_n[b] < 1 || mtp_n[b] > 2) return 7;
        if (lengths[slots[b]] + 2 > max_len || mtp_lengths[slots[b]] + mtp_n[b] > max_len) return 4;
        if (last[b] < 0 || last[b] >= V) return 5;
        for (int64_t j = 0; j < mtp_n[b]; j++)
            if (mtp_ids[b * 2 + j] < 0 || mtp_ids[b * 2 + j] >= mtp_V) return 5;
    }
    float *draft = malloc(sizeof(float) * (size_t)(B * mtp_V + 2 * B * V) + 64);
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)(5 * B) + 64);
    int rc = 1;
    if (draft && ids) {
        float *verify = draft + B * mtp_V;
        int64_t *d = ids + 2 * B, *top = ids + 3 * B;
        rc = dsv3_mtp_draft(mtp_layer, mtp_store, mtp, B, 2, mtp_ids, mtp_n, mtp_hidden, mtp_V, draft, rope_cos,
                            rope_sin, rope_len, slots, num_slots, mtp_lengths, max_len, slot_stride, pos_stride,
                            nthreads);
        if (!rc) {
            dsv3_argmax_rows(B, limit, draft, mtp_V, d);
            for (int64_t b = 0; b < B; b++) ids[2 * b] = last[b], ids[2 * b + 1] = d[b];
            rc = dsv3_decode_step(n, L, stores, B, 2, ids, embed, V, head, verify, hidden, rope_cos, rope_sin,
                                  rope_len, slots, num_slots, lengths, max_len, slot_stride, pos_stride, nthreads);
        }
        if (!rc) {
            dsv3_argmax_rows(2 * B, limit, verify, V, top);
            for (int64_t b = 0; b < B; b++) {
                const int accepted = top[2 * b] == d[b];
                tokens[2 * b] = accepted ? d[b] : top[2 * b];
                tokens[2 * b + 1] = accepted ? top[2 * b + 1] : -1;
                counts[b] = accepted ? 2 : 1;
                if (!accepted) lengths[slots[b]] -= 1;  // d's entry
            }
        }
    }
    free(draft), free(ids);
    return rc;
}

// `dequantize_blocks` for prefill-sized products: rows r0 .. r0+R of an e4m3fn weight [N, C] (w: row r0, row stride
// w_rs) times its block scales [ceil(N/b0), ceil(C/b1)] (scale: the grid's first row, row stride s_rs) into float32
// out [R, C] (row stride out_rs), rounded to bf16 (held in fp32) when `round`: value for value
// `dequantize_blocks(w, s, (b0, b1), bf16 if round else fp32)[r0:r0+R].float()`, in one pass over the weight instead
// of six, rows split between the threads.
int dsv3_dequantize_fp8(int64_t R, int64_t C, int64_t r0, const uint8_t *w, int64_t w_rs, const float *scale,
                        int64_t s_rs, int64_t b0, int64_t b1, int round, float *out, int64_t out_rs, int nthreads) {
    if (R < 0 || C < 0 || r0 < 0 || b0 <= 0 || b1 <= 0) return 2;
#pragma omp parallel for schedule(static) num_threads(threads_for(R * C, nthreads))
    for (int64_t r = 0; r < R; r++) {
        const uint8_t *wr = w + r * w_rs;
        const float *sr = scale + ((r0 + r) / b0) * s_rs;
        float *o = out + r * out_rs;
        for (int64_t c0 = 0; c0 < C; c0 += b1) {
            const int64_t c1 = c0 + b1 < C ? c0 + b1 : C;
            const float s = sr[c0 / b1];
            int64_t c = c0;
            for (; c + 16 <= c1; c += 16) {
                __m256 lo, hi;
                load16_fp8(wr + c, s, round, &lo, &hi);
                _mm256_storeu_ps(o + c, lo);
                _mm256_storeu_ps(o + c + 8, hi);
            }
            for (; c + 8 <= c1; c += 8) _mm256_storeu_ps(o + c, load8_fp8(wr + c, s, round));
            for (; c < c1; c++) {
                const float v = fp8_to_f32(wr[c]) * s;
                o[c] = round ? bf16_to_f32(f32_to_bf16(v)) : v;
            }
        }
    }
    return 0;
}

// `(q.float() * scale[:, None]).to(bf16 or fp32)` (`int8.dequantize_int8`) for int8 weights q [R, C] with one float32
// scale per row, value for value (one fp32 rounding of each product, then round-to-nearest-even to bf16), in one
// pass: the torch expression takes three and an fp32 temporary four times the weight's size, which cost an int8
// model's prefill 4x its GEMMs on a CPU with bf16 products. out_type: T_BF16 or T_F32; rows split between threads.
int dsv3_dequantize_int8(int64_t R, int64_t C, const int8_t *q, int64_t q_rs, const float *scale, void *out,
                         int out_type, int64_t out_rs, int nthreads) {
    if (R < 0 || C < 0 || (out_type != T_BF16 && out_type != T_F32)) return 2;
#pragma omp parallel for schedule(static) num_threads(threads_for(R * C, nthreads))
    for (int64_t r = 0; r < R; r++) {
        const int8_t *qr = q + r * q_rs;
        const __m256 s = _mm256_set1_ps(scale[r]);
        int64_t c = 0;
        if (out_type == T_BF16) {
            uint16_t *o = (uint16_t *)out + r * out_rs;
            for (; c + 8 <= C; c += 8) {
                const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qr + c)));
                const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(round8_bf16(_mm256_mul_ps(_mm256_cvtepi32_ps(v), s))), 16);
                // packus within 128-bit lanes: [b0..b3 b0..b3 | b4..b7 b4..b7]; quadwords 0 and 2 hold b0..b7
                const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
                _mm_storeu_si128((__m128i *)(o + c), _mm256_castsi256_si128(packed));
            }
            for (; c < C; c++) o[c] = f32_to_bf16((float)qr[c] * scale[r]);
        } else {
            float *o = (float *)out + r * out_rs;
            for (; c + 8 <= C; c += 8) {
                const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qr + c)));
                _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_cvtepi32_ps(v), s));
            }
            for (; c < C; c++) o[c] = (float)qr[c] * scale[r];
        }
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------- prefill products
// y[m, n] = sum_k x[m, k] * w[n, k] in fp32, for products of many rows (prefill: `linear.widened_linear`). x and w
// are bf16 or fp32, widened while they are copied into the blocks below; y is fp32 (row stride ys).
//
// Why not torch: its fp32 GEMM (MKL) reaches ~56 GFLOP/s a core on the AVX2-only benchmark host, 61% of the
// cores' FMA peak (91 GFLOP/s, measured with 12 independent FMA chains), and needs fp32 copies of the bf16
// weights and activations first. The loop nest is the usual one of BLAS libraries: per thread a slice of the
// weight rows (output columns) in panels of GEMM_NC; per GEMM_KC columns of k, the panel is copied into
// fp32 micro-panels of 16 weight rows, k-major (`Bp[k][16]`, GEMM_KC x 16 floats = 16 KiB: L1); per GEMM_MC
// activation rows, those are copied likewise into micro-panels of 6 rows (`Ap[k][6]`, GEMM_MC x GEMM_KC floats:
// L2); each (6 x 16) output tile is then 12 accumulators, each k step two weight loads, six broadcasts and
// twelve FMAs. The sum over k runs in blocks of GEMM_KC, each block continuing the tile's sums in memory, so every
// output is one fp32 multiply-add chain over k = 0, 1, ... in order: the same bits whatever the tiles, blocks or
// thread split (a product over a slice of the weight's rows is that slice of the whole product).
#define GEMM_MR 6
#define GEMM_NR 16
#define GEMM_KC 256
#define GEMM_MC 120
#define GEMM_NC 3072

// c[i][j] (+)= sum_k ap[k][i] * bp[k][j] for a full 6 x 16 tile (row stride cs).
static inline void gemm_tile(int64_t kc, const float *ap, const float *bp, float *c, int64_t cs, int accumulate) {
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    if (accumulate) {
        c00 = _mm256_loadu_ps(c), c01 = _mm256_loadu_ps(c + 8);
        c10 = _mm256_loadu_ps(c + cs), c11 = _mm256_loadu_ps(c + cs + 8);
        c20 = _mm256_loadu_ps(c + 2 * cs), c21 = _mm256_loadu_ps(c + 2 * cs + 8);
        c30 = _mm256_loadu_ps(c + 3 * cs), c31 = _mm256_loadu_ps(c + 3 * cs + 8);
        c40 = _mm256_loadu_ps(c + 4 * cs), c41 = _mm256_loadu_ps(c + 4 * cs + 8);
        c50 = _mm256_loadu_ps(c + 5 * cs), c51 = _mm256_loadu_ps(c + 5 * cs + 8);
    } else {
        c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
    }
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; k++) {
        const __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps(bp + 8);
        __m256 a = _mm256_broadcast_ss(ap);
        c00 = _mm256_fmadd_ps(a, b0, c00), c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(ap + 1);
        c10 = _mm256_fmadd_ps(a, b0, c10), c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(ap + 2);
        c20 = _mm256_fmadd_ps(a, b0, c20), c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(ap + 3);
        c30 = _mm256_fmadd_ps(a, b0, c30), c31 = _mm256_fmadd_ps(a, b1, c31);
        a = _mm256_broadcast_ss(ap + 4);
        c40 = _mm256_fmadd_ps(a, b0, c40), c41 = _mm256_fmadd_ps(a, b1, c41);
        a = _mm256_broadcast_ss(ap + 5);
        c50 = _mm256_fmadd_ps(a, b0, c50), c51 = _mm256_fmadd_ps(a, b1, c51);
        ap += GEMM_MR, bp += GEMM_NR;
    }
    _mm256_storeu_ps(c, c00), _mm256_storeu_ps(c + 8, c01);
    _mm256_storeu_ps(c + cs, c10), _mm256_storeu_ps(c + cs + 8, c11);
    _mm256_storeu_ps(c + 2 * cs, c20), _mm256_storeu_ps(c + 2 * cs + 8, c21);
    _mm256_storeu_ps(c + 3 * cs, c30), _mm256_storeu_ps(c + 3 * cs + 8, c31);
    _mm256_storeu_ps(c + 4 * cs, c40), _mm256_storeu_ps(c + 4 * cs + 8, c41);
    _mm256_storeu_ps(c + 5 * cs, c50), _mm256_storeu_ps(c + 5 * cs + 8, c51);
}

// r[0..7] (rows) -> their columns, in place: r[j] = (r[0][j], ..., r[7][j]).
static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20), r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20), r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31), r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31), r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Rows [r0, r0 + nr) x columns [k0, k0 + kc) of src (bf16 or fp32, row stride rs) -> micro-panels of `width` (6 or
// 16) rows, k-major: dst[(r / width) * kc * width + k * width + r % width], rows past nr zero. Eight columns of up
// to eight rows at a time go through one 8 x 8 transpose; a width-6 panel's eight-float stores spill two floats
// into the next k's slot (rewritten by the next store) and past the panel's end (the next panel's first floats,
// written after it, or the buffer's slack of 8 floats).
static void gemm_pack(const void *src, int type, int64_t rs, int64_t r0, int64_t nr, int64_t k0, int64_t kc, int width,
                      float *dst) {
    const int64_t k8 = kc / 8 * 8;
    for (int64_t p = 0; p < nr; p += width) {
        float *panel = dst + p * kc;
        const int64_t rows = nr - p < width ? nr - p : width;
        for (int64_t h = 0; h < width; h += 8) {  // the panel's rows h..h+7 (width 6: rows 6 and 7 are zero)
            const void *row[8];
            int64_t live = rows - h < 8 ? rows - h : 8;
            live = live > 0 ? live : 0;
            for (int i = 0; i < 8; i++)
                row[i] = i < live ? (const char *)src + ((r0 + p + h + i) * rs + k0) * (type == T_BF16 ? 2 : 4) : NULL;
            for (int64_t k = 0; k < k8; k += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; i++)
                    r[i] = !row[i] ? _mm256_setzero_ps()
                           : type == T_BF16 ? load8_bf16((const uint16_t *)row[i] + k)
                                            : _mm256_loadu_ps((const float *)row[i] + k);
                transpose8(r);
                for (int j = 0; j < 8; j++) _mm256_storeu_ps(panel + (k + j) * width + h, r[j]);
            }
            const int hw = width - h < 8 ? (int)(width - h) : 8;
            for (int64_t k = k8; k < kc; k++)
                for (int i = 0; i < hw; i++)
                    panel[k * width + h + i] = !row[i] ? 0.0f : type == T_BF16 ? bf16_to_f32(((const uint16_t *)row[i])[k])
                                                                                : ((const float *)row[i])[k];
        }
    }
}

int dsv3_gemm(int64_t M, int64_t N, int64_t K, const void *x, int xtype, int64_t xs, const void *w, int wtype,
              int64_t ws, float *y, int64_t ys, int nthreads) {
    if (M < 0 || N < 0 || K < 0 || (xtype != T_F32 && xtype != T_BF16) || (wtype != T_F32 && wtype != T_BF16)) return 2;
    if (K == 0) {
        for (int64_t m = 0; m < M; m++) memset(y + m * ys, 0, sizeof(float) * (size_t)N);
        return 0;
    }
    // Threads split the larger output dimension in whole tiles, each packing its own blocks. Split by columns,
    // every thread copies all M activation rows for N / nt columns of arithmetic; split by rows, all N weight
    // rows for M / nt rows: the copies cost nt/N + 1/M of the arithmetic one way, 1/N + nt/M the other.
    const int split_rows = M > N;
    const int64_t unit = split_rows ? GEMM_MR : GEMM_NR, units = ((split_rows ? M : N) + unit - 1) / unit;
    int nt = threads_for(M * N * K, nthreads);
    nt = nt < units ? nt : (int)(units > 0 ? units : 1);
    int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        const int64_t th = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t lo = units * th / nth * unit, hi_u = units * (th + 1) / nth * unit, size = split_rows ? M : N;
        const int64_t hi = hi_u < size ? hi_u : size;
        const int64_t m_lo = split_rows ? lo : 0, m_hi = split_rows ? hi : M;
        const int64_t n_lo = split_rows ? 0 : lo, n_hi = split_rows ? N : hi;
        float *bp = (float *)aligned_alloc(64, sizeof(float) * (GEMM_KC * GEMM_NC + 64));
        float *ap = (float *)aligned_alloc(64, sizeof(float) * (GEMM_KC * GEMM_MC + 64));  // + the packing's slack
        if (!bp || !ap) {
            failed = 1;
        } else {
            float edge[GEMM_MR * GEMM_NR];
            for (int64_t jc = n_lo; jc < n_hi; jc += GEMM_NC) {
                const int64_t nc = n_hi - jc < GEMM_NC ? n_hi - jc : GEMM_NC;
                for (int64_t pc = 0; pc < K; pc += GEMM_KC) {
                    const int64_t kc = K - pc < GEMM_KC ? K - pc : GEMM_KC;
                    gemm_pack(w, wtype, ws, jc, nc, pc, kc, GEMM_NR, bp);
                    for (int64_t ic = m_lo; ic < m_hi; ic += GEMM_MC) {
                        const int64_t mc = m_hi - ic < GEMM_MC ? m_hi - ic : GEMM_MC;
                        gemm_pack(x, xtype, xs, ic, mc, pc, kc, GEMM_MR, ap);
                        for (int64_t jr = 0; jr < nc; jr += GEMM_NR) {
                            const int64_t nr = nc - jr < GEMM_NR ? nc - jr : GEMM_NR;
                            for (int64_t ir = 0; ir < mc; ir += GEMM_MR) {
                                const int64_t mr = mc - ir < GEMM_MR ? mc - ir : GEMM_MR;
                                float *c = y + (ic + ir) * ys + jc + jr;
                                if (mr == GEMM_MR && nr == GEMM_NR) {
                                    gemm_tile(kc, ap + ir * kc, bp + jr * kc, c, ys, pc > 0);
                                    continue;
                                }
                                // A partial tile: through a full one on the stack.
                                for (int64_t i = 0; i < GEMM_MR; i++)
                                    for (int64_t j = 0; j < GEMM_NR; j++)
                                        edge[i * GEMM_NR + j] = pc > 0 && i < mr && j < nr ? c[i * ys + j] : 0.0f;
                                gemm_tile(kc, ap + ir * kc, bp + jr * kc, edge, GEMM_NR, 1);
                                for (int64_t i = 0; i < mr; i++)
                                    for (int64_t j = 0; j < nr; j++) c[i * ys + j] = edge[i * GEMM_NR + j];
                            }
                        }
                    }
                }
            }
        }
        free(bp), free(ap);
    }
    return failed ? 1 : 0;
}
