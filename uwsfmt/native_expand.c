/* uwsfmt native kernel: out = a @ b (+ mean) for float32, row-major, contiguous.
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
 * so results do not depend on the shape, the alignment or the number of threads.
 *
 * Built by uwsfmt/native.py with the system C compiler on first use (-fopenmp; no -march flags:
 * the vector paths are selected at run time with target attributes), loaded through ctypes.
 */
#include <stdint.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int64_t mean, a, b, out; /* addresses; mean may be 0 (no centring) */
    int64_t m, n, k;         /* out and mean: m x n, a: m x k, b: k x n */
    int64_t stream;          /* non-zero: streaming stores where the output is aligned */
} uws_job;

static inline float uws_one(const float *ai, const float *b, int64_t n, int64_t j, int64_t k, const float *mi)
{
    float s = 0.0f;
    for (int64_t p = 0; p < k; p++)
        s = fmaf(ai[p], b[p * n + j], s);
    return mi ? s + mi[j] : s;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define UWS_X86 1

/* ---- AVX-512: tiles of R rows x 64 columns (16 accumulators for R = 4) ---- */

#define UWS512 __attribute__((target("avx512f"))) static inline __attribute__((always_inline))

UWS512 void uws_store512(float *dst, __m512 v, int nt)
{
    if (nt)
        _mm512_stream_ps(dst, v);
    else
        _mm512_storeu_ps(dst, v);
}

UWS512 void uws_tile512(const uws_job *J, int64_t i, const int R, int nt)
{
    const int64_t n = J->n, k = J->k;
    const float *A = (const float *)J->a, *B = (const float *)J->b, *M = (const float *)J->mean;
    float *O = (float *)J->out;
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
                    v = _mm512_add_ps(v, _mm512_loadu_ps(M + at));
                uws_store512(O + at, v, nt);
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
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, M + at));
            if (mk == (__mmask16)0xFFFF)
                uws_store512(O + at, v, nt);
            else
                _mm512_mask_storeu_ps(O + at, mk, v);
        }
    }
}

__attribute__((target("avx512f"))) static void uws_rows512(const uws_job *J, int64_t r0, int64_t r1)
{
    const int nt = J->stream && ((uintptr_t)J->out % 64 == 0) && (J->n % 16 == 0);
    int64_t i = r0;
    for (; i + 4 <= r1; i += 4)
        uws_tile512(J, i, 4, nt);
    for (; i < r1; i++)
        uws_tile512(J, i, 1, nt);
    if (nt)
        _mm_sfence();
}

/* ---- AVX2 + FMA: tiles of R rows x 16 columns (8 accumulators for R = 4) ---- */

#define UWS256 __attribute__((target("avx2,fma"))) static inline __attribute__((always_inline))

UWS256 void uws_tile256(const uws_job *J, int64_t i, const int R, int nt)
{
    const int64_t n = J->n, k = J->k;
    const float *A = (const float *)J->a, *B = (const float *)J->b, *M = (const float *)J->mean;
    float *O = (float *)J->out;
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
                    v = _mm256_add_ps(v, _mm256_loadu_ps(M + at));
                if (nt)
                    _mm256_stream_ps(O + at, v);
                else
                    _mm256_storeu_ps(O + at, v);
            }
    }
    for (int r = 0; r < R; r++) /* the last n % 16 columns */
        for (int64_t jj = j; jj < n; jj++)
            O[(i + r) * n + jj] = uws_one(A + (i + r) * k, B, n, jj, k, M ? M + (i + r) * n : 0);
}

__attribute__((target("avx2,fma"))) static void uws_rows256(const uws_job *J, int64_t r0, int64_t r1)
{
    const int nt = J->stream && ((uintptr_t)J->out % 32 == 0) && (J->n % 8 == 0);
    int64_t i = r0;
    for (; i + 4 <= r1; i += 4)
        uws_tile256(J, i, 4, nt);
    for (; i < r1; i++)
        uws_tile256(J, i, 1, nt);
    if (nt)
        _mm_sfence();
}
#endif

/* Which vector path this CPU runs: 2 = AVX-512, 1 = AVX2 + FMA, 0 = none (the caller uses BLAS). */
int uws_isa(void)
{
#ifdef UWS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
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
                ((float *)J->out)[i * J->n + j] = uws_one((const float *)J->a + i * J->k, (const float *)J->b, J->n, j,
                                                          J->k, J->mean ? (const float *)J->mean + i * J->n : 0);
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

/* 1 when built with OpenMP (the loader refuses a build without: it would run on one core). */
int uws_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
