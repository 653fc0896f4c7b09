/* uwsfmt native kernel: out = a @ b (+ mean) (+ a quantized residual) for float32 factors and a
 * float32 or float16 mean, row-major, contiguous; the output in float32, or rounded to bfloat16 /
 * float16 as it is written (not with a residual: that is added to the float32 rows afterwards,
 * tile by tile, while they are in cache).
 *
 * The reconstruction of a subspace tensor, M + L C R^T, is one thin product (inner dimension the
 * rank k, often 8-64) plus a full-size addition. With BLAS that is two passes over memory (copy M
 * into the output, then a GEMM that reads and writes it again); here each output tile is computed
 * in registers and written once, next to a single read of M, with streaming stores when the
 * output is aligned (no read-for-ownership of the destination).
 *
 * Every output value is computed the same way wherever it lies (full tile, narrow tile, masked or
 * scalar tail, any split of the rows between threads):
 *     s = 0; for p in 0..k-1: s = fma(a[i, p], b[p, j], s);   out[i, j] = s + mean[i, j]
 * so results do not depend on the shape, the alignment or the number of threads (a float16 mean is
 * converted to float32 first, exactly, as torch's cast does). A bfloat16 or
float16 output is that float32 value rounded to nearest-even, bit for bit what torch's cast of the
float32 result gives (NaN: bfloat16 0xFFFF as torch's vector cast, float16 the quiet NaN of the
hardware conversion), so a module in half precision gets the same values with half the writes
and no float32 temporary.
 *
 * Built by uwsfmt/native.py with the system C compiler on first use (-fopenmp; no -march flags:
 * the vector paths are selected at run time with target attributes), loaded through ctypes.
 */
#include <stdint.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <string.h>

enum { UWS_F32 = 0, UWS_BF16 = 1, UWS_F16 = 2 }; /* output types (the mean: UWS_F32 or UWS_F16) */

typedef struct {
    int64_t mean, a, b, out; /* addresses; mean may be 0 (no centring) */
    int64_t m, n, k;         /* out and mean: m x n, a: m x k, b: k x n */
    int64_t stream;          /* non-zero: streaming stores where the output is aligned */
    int64_t otype;           /* UWS_F32, UWS_BF16 or UWS_F16 */
    int64_t mtype;           /* the mean's type: UWS_F32 or UWS_F16 */
    int64_t res, rscale;     /* a quantized residual added last (spec 6.4): its packed codes and
                                float32 scales (0: none; then otype is UWS_F32 and stream 0) */
    int64_t rbits, raxis;    /* its bits (1, 2, 4, 8) and scale axis (0: per row, 1: per column) */
} uws_job;

/* float16 bits -> float32, exactly (subnormals, infinities and NaN payloads kept). */
static inline float uws_h2f(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    uint32_t u;
    if (e == 0x1F)
        u = sign | 0x7F800000u | (mant << 13);
    else if (e)
        u = sign | ((e + 112u) << 23) | (mant << 13);
    else if (mant == 0)
        u = sign;
    else { /* subnormal: mant * 2^-24, normalised */
        int shift = 0;
        uint32_t mm = mant;
        while (!(mm & 0x400u)) {
            mm <<= 1;
            shift++;
        }
        u = sign | ((uint32_t)(113 - shift) << 23) | ((mm & 0x3FFu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Element ``at`` of a mean of type ``mt``. */
static inline float uws_mean(const void *mean, int64_t at, int mt)
{
    return mt == UWS_F16 ? uws_h2f(((const uint16_t *)mean)[at]) : ((const float *)mean)[at];
}

static inline float uws_one(const float *ai, const float *b, int64_t n, int64_t j, int64_t k, const void *mean, int64_t row, int mt)
{
    float s = 0.0f;
    for (int64_t p = 0; p < k; p++)
        s = fmaf(ai[p], b[p * n + j], s);
    return mean ? s + uws_mean(mean, row * n + j, mt) : s;
}

/* float32 -> bfloat16, round to nearest even (torch's rule; NaN -> 0xFFFF as its vector cast). */
static inline uint16_t uws_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f)
        return 0xFFFF;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* float32 -> float16, round to nearest even, subnormals kept, overflow to infinity, NaN quiet
 * with the sign and the top of the payload kept (as the x86 conversion instruction). */
static inline uint16_t uws_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u, x = u & 0x7FFFFFFFu;
    if (x > 0x7F800000u) /* NaN */
        return (uint16_t)(sign | 0x7E00u | ((x >> 13) & 0x3FFu));
    if (x >= 0x477FF000u) /* 65520 and up (infinity too): rounds to infinity */
        return (uint16_t)(sign | 0x7C00u);
    if (x < 0x38800000u) { /* below float16's smallest normal, 2^-14: a multiple of 2^-24 */
        /* 2^-24 units, rounded to nearest even: the value is mantissa * 2^(e - 150) */
        const uint32_t e = x >> 23;
        if (e < 102) /* below 2^-25: rounds to zero (2^-25 itself is a tie, handled below) */
            return (uint16_t)sign;
        const uint32_t mant = (x & 0x7FFFFFu) | 0x800000u, shift = 126 - e; /* 14..24 */
        uint32_t q = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u)))
            q++;
        return (uint16_t)(sign | q);
    }
    /* normal: rebias the exponent (127 -> 15), round the 13 dropped bits to nearest even */
    return (uint16_t)(sign | ((x - 0x38000000u + 0xFFFu + ((x >> 13) & 1u)) >> 13));
}

/* Write one computed value as the job's output type. */
static inline void uws_put(void *out, int64_t at, float v, int ot)
{
    if (ot == UWS_F32)
        ((float *)out)[at] = v;
    else
        ((uint16_t *)out)[at] = ot == UWS_BF16 ? uws_bf16(v) : uws_f16(v);
}

/* Code ``e`` of a residual's packed codes as its signed value q (spec 6.4): ``B``-bit codes, 8 / B per
 * byte, first element in the lowest bits; q = code - 2^(B-1), or 2 code - 1 for one bit. */
static inline __attribute__((always_inline)) float uws_q(const uint8_t *C, int64_t e, const int B)
{
    const int code = (C[(e * B) >> 3] >> ((e * B) & 7)) & ((1 << B) - 1);
    return B == 1 ? (float)(2 * code - 1) : (float)(code - (1 << (B - 1)));
}

/* Per-column scales (codes of Q^T: element (i, j) is code j * m + i), portable: rows [i, i + R), columns [j0, n). */
static inline __attribute__((always_inline)) void uws_resid_cols_rest(const uws_job *J, int64_t i, int64_t R, int64_t j0, const int B)
{
    const int64_t n = J->n, m = J->m;
    const uint8_t *C = (const uint8_t *)J->res;
    const float *S = (const float *)J->rscale;
    float *O = (float *)J->out;
    for (int64_t t = 0; t < R; t++)
        for (int64_t j = j0; j < n; j++) {
            const float d = S[j] * uws_q(C, j * m + i + t, B);
            O[(i + t) * n + j] = O[(i + t) * n + j] + d;
        }
}

/* out[i, j] += scale * q[i, j] for rows [r0, r1), after the rest of the tensor was written there:
 * Q = scale * q rounded once to float32, then the float32 sum (-ffp-contract=off: no fused
 * multiply-add), exactly what adding the dequantized residual afterwards gives. Axis 1: the codes
 * are Q^T's (element (i, j) at j * m + i) and the scales are per column. */
static inline __attribute__((always_inline)) void uws_resid_t(const uws_job *J, int64_t r0, int64_t r1, const int B)
{
    if (J->raxis == 1) {
        uws_resid_cols_rest(J, r0, r1 - r0, 0, B);
        return;
    }
    const int64_t n = J->n;
    const uint8_t *C = (const uint8_t *)J->res;
    const float *S = (const float *)J->rscale;
    float *O = (float *)J->out;
    for (int64_t i = r0; i < r1; i++) {
        float *o = O + i * n;
        for (int64_t j = 0; j < n; j++) {
            const float d = S[i] * uws_q(C, i * n + j, B);
            o[j] = o[j] + d;
        }
    }
}

static void uws_resid(const uws_job *J, int64_t r0, int64_t r1)
{
    switch (J->rbits) {
    case 1: uws_resid_t(J, r0, r1, 1); break;
    case 2: uws_resid_t(J, r0, r1, 2); break;
    case 4: uws_resid_t(J, r0, r1, 4); break;
    default: uws_resid_t(J, r0, r1, 8); break;
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define UWS_X86 1

/* ---- The residual with AVX2. Every path does the same two roundings: fl(scale * q), then the sum. */

#define UWSRES __attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline))

/* The signed values q of B-bit codes held as unsigned fields in v's lanes (spec 6.4). */
UWSRES __m256 uws_signed8(__m256i v, const int B)
{
    v = B == 1 ? _mm256_sub_epi32(_mm256_add_epi32(v, v), _mm256_set1_epi32(1)) : _mm256_sub_epi32(v, _mm256_set1_epi32(1 << (B - 1)));
    return _mm256_cvtepi32_ps(v);
}

/* q of the 8 consecutive B-bit codes in the B bytes at p (first code in the lowest bits). */
UWSRES __m256 uws_codes8(const uint8_t *p, const int B)
{
    if (B == 8) {
        int64_t w;
        memcpy(&w, p, 8);
        return uws_signed8(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(w)), B);
    }
    uint32_t w = 0;
    memcpy(&w, p, (size_t)B);
    const __m256i sh = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    return uws_signed8(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), _mm256_set1_epi32((1 << B) - 1)), B);
}

/* o[0..7] += fl(sc * q), the float32 sum. */
UWSRES void uws_add8(float *o, __m256 sc, __m256 q)
{
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_mul_ps(sc, q)));
}

/* Per-column scales, 8 rows from row i (i * B and m * B multiples of 8): column j's codes of the 8
 * rows are B consecutive bytes; 8 columns decoded so, one 8 x 8 transpose, then per row
 * fl(scale * q) and the sum, as everywhere else. */
UWSRES void uws_resid_cols8(const uws_job *J, int64_t i, const int B)
{
    const int64_t n = J->n, m = J->m;
    const uint8_t *C = (const uint8_t *)J->res;
    const float *S = (const float *)J->rscale;
    float *O = (float *)J->out;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 c[8];
        for (int k = 0; k < 8; k++) /* column j + k, rows i .. i + 7 */
            c[k] = uws_codes8(C + (((j + k) * m + i) * B >> 3), B);
        const __m256 t0 = _mm256_unpacklo_ps(c[0], c[1]), t1 = _mm256_unpackhi_ps(c[0], c[1]);
        const __m256 t2 = _mm256_unpacklo_ps(c[2], c[3]), t3 = _mm256_unpackhi_ps(c[2], c[3]);
        const __m256 t4 = _mm256_unpacklo_ps(c[4], c[5]), t5 = _mm256_unpackhi_ps(c[4], c[5]);
        const __m256 t6 = _mm256_unpacklo_ps(c[6], c[7]), t7 = _mm256_unpackhi_ps(c[6], c[7]);
        const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
        __m256 r[8];
        r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
        r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
        r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
        r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
        r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
        r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
        r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
        r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
        const __m256 sc = _mm256_loadu_ps(S + j);
        for (int t = 0; t < 8; t++) /* row i + t, columns j .. j + 7 */
            uws_add8(O + (i + t) * n + j, sc, r[t]);
    }
    uws_resid_cols_rest(J, i, 8, j, B);
}

/* Per-column scales (axis 1: element (i, j) is code j * m + i): for up to 4 rows and 8 columns, one
 * gather of the 4 bytes that hold each column's codes of those rows (consecutive codes), then per
 * row a shift by the lane's bit offset. Columns whose 4 bytes would reach past the codes, and
 * tensors too large for 32-bit offsets, take the portable loop. */
UWSRES void uws_resid_cols256t(const uws_job *J, int64_t r0, int64_t r1, const int B)
{
    const int64_t n = J->n, m = J->m, nbytes = (m * n * B + 7) / 8;
    const uint8_t *C = (const uint8_t *)J->res;
    const float *S = (const float *)J->rscale;
    float *O = (float *)J->out;
    if (8 * m * B >= ((int64_t)1 << 31)) {
        uws_resid_t(J, r0, r1, B);
        return;
    }
    const __m256i lane = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)(m * B)));
    const __m256i mk = _mm256_set1_epi32((1 << B) - 1);
    int64_t i = r0;
    if ((m * B) % 8 == 0) /* blocks of 8 rows whose codes start on byte boundaries: no gathers */
        for (; i + 8 <= r1 && (i * B) % 8 == 0; i += 8)
            uws_resid_cols8(J, i, B);
    for (; i < r1; i += 4) {
        const int R = r1 - i < 4 ? (int)(r1 - i) : 4;
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) {
            const int64_t bit0 = (j * m + i) * B;
            if ((bit0 >> 3) + ((7 * m * B + (bit0 & 7)) >> 3) + 4 > nbytes)
                break; /* the last columns: their 4-byte reads could pass the end of the codes */
            const __m256i tot = _mm256_add_epi32(lane, _mm256_set1_epi32((int)(bit0 & 7)));
            const __m256i g = _mm256_i32gather_epi32((const int *)(C + (bit0 >> 3)), _mm256_srli_epi32(tot, 3), 1);
            const __m256i bit = _mm256_and_si256(tot, _mm256_set1_epi32(7));
            const __m256 sc = _mm256_loadu_ps(S + j);
            for (int t = 0; t < R; t++) {
                const __m256i v = _mm256_and_si256(_mm256_srlv_epi32(g, _mm256_add_epi32(bit, _mm256_set1_epi32(t * B))), mk);
                uws_add8(O + (i + t) * n + j, sc, uws_signed8(v, B));
            }
        }
        uws_resid_cols_rest(J, i, R, j, B);
    }
}

UWSRES void uws_resid256t(const uws_job *J, int64_t r0, int64_t r1, const int B)
{
    if (J->raxis == 1) {
        uws_resid_cols256t(J, r0, r1, B);
        return;
    }
    const int64_t n = J->n;
    if ((n * B) % 8 != 0) { /* rows not starting on byte boundaries */
        uws_resid_t(J, r0, r1, B);
        return;
    }
    const uint8_t *C = (const uint8_t *)J->res;
    const float *S = (const float *)J->rscale;
    float *O = (float *)J->out;
    for (int64_t i = r0; i < r1; i++) { /* per-row scales: 8 codes from the B bytes that hold them */
        const uint8_t *rc = C + i * n * B / 8;
        float *o = O + i * n;
        const __m256 s = _mm256_set1_ps(S[i]);
        int64_t j = 0;
        for (; j + 8 <= n; j += 8)
            uws_add8(o + j, s, uws_codes8(rc + j * B / 8, B));
        for (; j < n; j++) {
            const float d = S[i] * uws_q(C, i * n + j, B);
            o[j] = o[j] + d;
        }
    }
}

__attribute__((target("avx2,fma,f16c"))) static void uws_resid256(const uws_job *J, int64_t r0, int64_t r1)
{
    switch (J->rbits) {
    case 1: uws_resid256t(J, r0, r1, 1); break;
    case 2: uws_resid256t(J, r0, r1, 2); break;
    case 4: uws_resid256t(J, r0, r1, 4); break;
    default: uws_resid256t(J, r0, r1, 8); break;
    }
}

/* ---- AVX-512: tiles of R rows x 64 columns (16 accumulators for R = 4) ---- */

#define UWS512 __attribute__((target("avx512f"))) static inline __attribute__((always_inline))

/* 16 values as 16-bit floats: bfloat16 by torch's integer rounding, float16 by the hardware's
 * conversion (round to nearest even whatever MXCSR says). */
UWS512 __m256i uws_half512(__m512 v, const int ot)
{
    if (ot == UWS_F16)
        return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
    return _mm512_cvtepi32_epi16(r);
}

/* Store 16 values at element ``at`` of the output, ``cnt`` of them (16: a full vector). */
UWS512 void uws_store512(void *out, int64_t at, __m512 v, int nt, const int ot, int cnt)
{
    if (ot == UWS_F32) {
        float *dst = (float *)out + at;
        if (cnt < 16)
            _mm512_mask_storeu_ps(dst, (__mmask16)((1u << cnt) - 1u), v);
        else if (nt)
            _mm512_stream_ps(dst, v);
        else
            _mm512_storeu_ps(dst, v);
        return;
    }
    uint16_t *dst = (uint16_t *)out + at;
    const __m256i h = uws_half512(v, ot);
    if (cnt < 16) { /* no 16-bit masked store without AVX512BW: through a small buffer */
        uint16_t tmp[16];
        _mm256_storeu_si256((__m256i *)tmp, h);
        memcpy(dst, tmp, (size_t)cnt * 2);
    } else if (nt)
        _mm256_stream_si256((__m256i *)dst, h);
    else
        _mm256_storeu_si256((__m256i *)dst, h);
}

/* 16 values of the mean from element ``at``, ``cnt`` of them (the rest 0). */
UWS512 __m512 uws_mean512(const void *M, int64_t at, const int mt, int cnt)
{
    if (mt == UWS_F16) {
        const uint16_t *src = (const uint16_t *)M + at;
        if (cnt == 16)
            return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)src));
        uint16_t tmp[16] = {0}; /* no 16-bit masked load without AVX512BW: through a small buffer */
        memcpy(tmp, src, (size_t)cnt * 2);
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)tmp));
    }
    if (cnt == 16)
        return _mm512_loadu_ps((const float *)M + at);
    return _mm512_maskz_loadu_ps((__mmask16)((1u << cnt) - 1u), (const float *)M + at);
}

UWS512 void uws_tile512(const uws_job *J, int64_t i, const int R, int nt, const int ot, const int mt)
{
    const int64_t n = J->n, k = J->k;
    const float *A = (const float *)J->a, *B = (const float *)J->b;
    const void *M = (const void *)J->mean;
    void *O = (void *)J->out;
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) {
        __m512 c[4][4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++)
                c[r][q] = _mm512_setzero_ps();
        for (int64_t p = 0; p < k; p++) {
            const float *bp = B + p * n + j;
            const __m512 b0 = _mm512_loadu_ps(bp), b1 = _mm512_loadu_ps(bp + 16);
            const __m512 b2 = _mm512_loadu_ps(bp + 32), b3 = _mm512_loadu_ps(bp + 48);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m512 s = _mm512_set1_ps(A[(i + r) * k + p]);
                c[r][0] = _mm512_fmadd_ps(s, b0, c[r][0]);
                c[r][1] = _mm512_fmadd_ps(s, b1, c[r][1]);
                c[r][2] = _mm512_fmadd_ps(s, b2, c[r][2]);
                c[r][3] = _mm512_fmadd_ps(s, b3, c[r][3]);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++) {
                const int64_t at = (i + r) * n + j + 16 * q;
                __m512 v = c[r][q];
                if (M)
                    v = _mm512_add_ps(v, uws_mean512(M, at, mt, 16));
                uws_store512(O, at, v, nt, ot, 16);
            }
    }
    for (; j < n; j += 16) { /* 16 columns, the last ones masked */
        const __mmask16 mk = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
        __m512 c[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            c[r] = _mm512_setzero_ps();
        for (int64_t p = 0; p < k; p++) {
            const __m512 b0 = _mm512_maskz_loadu_ps(mk, B + p * n + j);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                c[r] = _mm512_fmadd_ps(_mm512_set1_ps(A[(i + r) * k + p]), b0, c[r]);
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const int64_t at = (i + r) * n + j;
            __m512 v = c[r];
            if (M)
                v = _mm512_add_ps(v, uws_mean512(M, at, mt, n - j >= 16 ? 16 : (int)(n - j)));
            uws_store512(O, at, v, nt, ot, n - j >= 16 ? 16 : (int)(n - j));
        }
    }
}

/* Rows [r0, r1) as output type ``ot`` (a constant where inlined: one specialised loop per type). */
UWS512 void uws_rows512t(const uws_job *J, int64_t r0, int64_t r1, const int ot, const int mt)
{
    /* streaming stores of whole vectors (64 bytes of float32, 32 of 16-bit values), each aligned */
    const int nt = J->stream && !J->res && ((uintptr_t)J->out % (ot == UWS_F32 ? 64 : 32) == 0) && (J->n % 16 == 0);
    int64_t i = r0;
    int64_t done = r0; /* rows whose residual is added: 8 at a time, while they are in cache */
    for (; i + 4 <= r1; i += 4) {
        uws_tile512(J, i, 4, nt, ot, mt);
        if (J->res && i + 4 - done >= 8) { /* (CPUs with AVX-512 have AVX2) */
            uws_resid256(J, done, i + 4);
            done = i + 4;
        }
    }
    for (; i < r1; i++)
        uws_tile512(J, i, 1, nt, ot, mt);
    if (J->res && done < r1)
        uws_resid256(J, done, r1);
    if (nt)
        _mm_sfence();
}

/* One specialised loop per (output type, mean type): ``rowst`` called with constant types, so each
 * call inlines its own copy (expanded inside a function carrying the ISA's target attribute). */
#define UWS_SPECIALISED(rowst, J, r0, r1)                                                          \
    do {                                                                                            \
        const int h_ = (J)->mtype == UWS_F16;                                                       \
        if ((J)->otype == UWS_BF16)                                                                 \
            h_ ? rowst(J, r0, r1, UWS_BF16, UWS_F16) : rowst(J, r0, r1, UWS_BF16, UWS_F32);         \
        else if ((J)->otype == UWS_F16)                                                             \
            h_ ? rowst(J, r0, r1, UWS_F16, UWS_F16) : rowst(J, r0, r1, UWS_F16, UWS_F32);           \
        else                                                                                        \
            h_ ? rowst(J, r0, r1, UWS_F32, UWS_F16) : rowst(J, r0, r1, UWS_F32, UWS_F32);           \
    } while (0)

__attribute__((target("avx512f"))) static void uws_rows512(const uws_job *J, int64_t r0, int64_t r1)
{
    UWS_SPECIALISED(uws_rows512t, J, r0, r1);
}

/* ---- AVX2 + FMA: tiles of R rows x 16 columns (8 accumulators for R = 4) ---- */

#define UWS256 __attribute__((target("avx2,fma,f16c"))) static inline __attribute__((always_inline))

/* Store 8 values at element ``at`` of the output as type ``ot``. */
UWS256 void uws_store256(void *out, int64_t at, __m256 v, int nt, const int ot)
{
    if (ot == UWS_F32) {
        if (nt)
            _mm256_stream_ps((float *)out + at, v);
        else
            _mm256_storeu_ps((float *)out + at, v);
        return;
    }
    __m128i h;
    if (ot == UWS_F16) {
        h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
        const __m256i u = _mm256_castps_si256(v);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0xFFFF), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        /* 32 -> 16 bits: packs within each 128-bit lane, then the two lanes' low halves together */
        r = _mm256_packus_epi32(r, r);
        h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(r, 0x08));
    }
    uint16_t *dst = (uint16_t *)out + at;
    if (nt)
        _mm_stream_si128((__m128i *)dst, h);
    else
        _mm_storeu_si128((__m128i *)dst, h);
}

/* 8 values of the mean from element ``at``. */
UWS256 __m256 uws_mean256(const void *M, int64_t at, const int mt)
{
    if (mt == UWS_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)M + at)));
    return _mm256_loadu_ps((const float *)M + at);
}

UWS256 void uws_tile256(const uws_job *J, int64_t i, const int R, int nt, const int ot, const int mt)
{
    const int64_t n = J->n, k = J->k;
    const float *A = (const float *)J->a, *B = (const float *)J->b;
    const void *M = (const void *)J->mean;
    void *O = (void *)J->out;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 c[4][2];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            c[r][0] = _mm256_setzero_ps();
            c[r][1] = _mm256_setzero_ps();
        }
        for (int64_t p = 0; p < k; p++) {
            const float *bp = B + p * n + j;
            const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m256 s = _mm256_set1_ps(A[(i + r) * k + p]);
                c[r][0] = _mm256_fmadd_ps(s, b0, c[r][0]);
                c[r][1] = _mm256_fmadd_ps(s, b1, c[r][1]);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            for (int q = 0; q < 2; q++) {
                const int64_t at = (i + r) * n + j + 8 * q;
                __m256 v = c[r][q];
                if (M)
                    v = _mm256_add_ps(v, uws_mean256(M, at, mt));
                uws_store256(O, at, v, nt, ot);
            }
    }
    for (int r = 0; r < R; r++) /* the last n % 16 columns */
        for (int64_t jj = j; jj < n; jj++)
            uws_put(O, (i + r) * n + jj, uws_one(A + (i + r) * k, B, n, jj, k, M, i + r, mt), ot);
}

UWS256 void uws_rows256t(const uws_job *J, int64_t r0, int64_t r1, const int ot, const int mt)
{
    /* streaming stores of whole vectors (32 bytes of float32, 16 of 16-bit values), each aligned */
    const int nt = J->stream && !J->res && ((uintptr_t)J->out % (ot == UWS_F32 ? 32 : 16) == 0) && (J->n % 8 == 0);
    int64_t i = r0;
    int64_t done = r0; /* rows whose residual is added: 8 at a time, while they are in cache */
    for (; i + 4 <= r1; i += 4) {
        uws_tile256(J, i, 4, nt, ot, mt);
        if (J->res && i + 4 - done >= 8) {
            uws_resid256(J, done, i + 4);
            done = i + 4;
        }
    }
    for (; i < r1; i++)
        uws_tile256(J, i, 1, nt, ot, mt);
    if (J->res && done < r1)
        uws_resid256(J, done, r1);
    if (nt)
        _mm_sfence();
}

__attribute__((target("avx2,fma,f16c"))) static void uws_rows256(const uws_job *J, int64_t r0, int64_t r1)
{
    UWS_SPECIALISED(uws_rows256t, J, r0, r1);
}
#endif

/* Which vector path this CPU runs: 2 = AVX-512, 1 = AVX2 + FMA + F16C, 0 = none (the caller uses BLAS). */
int uws_isa(void)
{
#ifdef UWS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return 1;
#endif
    return 0;
}

/* Rows [part * chunk, (part + 1) * chunk) of every job, chunk = its rows split in ``parts``,
 * rounded up to a multiple of 4. */
static void uws_part(const uws_job *jobs, int64_t count, int64_t part, int64_t parts, int isa)
{
    for (int64_t t = 0; t < count; t++) {
        const uws_job *J = jobs + t;
        int64_t chunk = (J->m + parts - 1) / parts;
        chunk = (chunk + 3) / 4 * 4;
        const int64_t r0 = part * chunk, r1 = r0 + chunk < J->m ? r0 + chunk : J->m;
        if (r0 >= r1)
            continue;
#ifdef UWS_X86
        if (isa == 2) {
            uws_rows512(J, r0, r1);
            continue;
        }
        if (isa == 1) {
            uws_rows256(J, r0, r1);
            continue;
        }
#endif
        for (int64_t i = r0; i < r1; i++) /* portable path, used by the tests to pin the arithmetic */
            for (int64_t j = 0; j < J->n; j++)
                uws_put((void *)J->out, i * J->n + j,
                        uws_one((const float *)J->a + i * J->k, (const float *)J->b, J->n, j, J->k,
                                (const void *)J->mean, i, (int)J->mtype),
                        (int)J->otype);
        if (J->res)
            uws_resid(J, r0, r1);
    }
}

/* Every job, split between ``threads`` OpenMP threads (one: no OpenMP call at all). Built with
 * -fopenmp and loaded into a process where torch has loaded its libgomp, this runs on torch's
 * own thread pool: no second set of threads competing with torch's spinning workers. */
void uws_expand(const uws_job *jobs, int64_t count, int threads, int isa)
{
    if (threads <= 1) {
        uws_part(jobs, count, 0, 1, isa);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
    uws_part(jobs, count, omp_get_thread_num(), omp_get_num_threads(), isa);
#else
    uws_part(jobs, count, 0, 1, isa);
#endif
}

/* sizeof(uws_job): the loader refuses a library whose job layout is not the one it passes. */
int64_t uws_job_size(void)
{
    return (int64_t)sizeof(uws_job);
}

/* 1 when built with OpenMP (the loader refuses a build without: it would run on one core). */
int uws_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
