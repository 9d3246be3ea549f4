/* Few-row float32 matmul for CPU decode: y[r][n] = sum_i x[r][i] * w[n][i].
 *
 * Decode multiplies a few rows (2 for one image under CFG) by every weight, so a step costs the time it
 * takes to stream the weights from memory. Here each weight row is read from memory once and multiplied
 * with up to 4 rows of x at a time (x stays in the cache), with two independent sums per row so that the
 * fused multiply-adds do not wait on each other. Output rows n are split across `threads` OpenMP threads
 * (the caller passes torch.get_num_threads(): an OpenMP default would be per calling thread); the library
 * is loaded into PyTorch's process and shares its OpenMP runtime. Each output is summed by one thread, in
 * one order, so results do not depend on the thread count.
 *
 * Built on the machine that runs it (-march=native): AVX-512 or AVX2 vectors where the CPU has them, plain
 * C otherwise. The sums run in another order than a BLAS, so results differ from F.linear by float32
 * rounding (about 1e-6 relative).
 */
#include <stddef.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LANES 16
typedef __m512 vec;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vsum(a) _mm512_reduce_add_ps(a)
#define vadd(a, b) _mm512_add_ps(a, b)
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LANES 8
typedef __m256 vec;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vadd(a, b) _mm256_add_ps(a, b)
static float vsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#ifdef LANES
/* Rows r0..r0+m-1 of x (m <= 4) times weight row wn: 2 vectors of each per step. */
static void dot_rows(const float *x, long k, const float *wn, int m, float *out) {
    vec a[4][2];
    for (int j = 0; j < 4; j++) a[j][0] = vzero(), a[j][1] = vzero();
    long i = 0;
    for (; i + 2 * LANES <= k; i += 2 * LANES) {
        vec w0 = vload(wn + i), w1 = vload(wn + i + LANES);
        for (int j = 0; j < m; j++) {  /* m is a constant 1, 2 or 4 at each inlined call: unrolled */
            a[j][0] = vfma(w0, vload(x + j * k + i), a[j][0]);
            a[j][1] = vfma(w1, vload(x + j * k + i + LANES), a[j][1]);
        }
    }
    for (int j = 0; j < m; j++) {
        float s = vsum(vadd(a[j][0], a[j][1]));
        for (long t = i; t < k; t++) s += wn[t] * x[j * k + t];
        out[j] = s;
    }
}
#else
static void dot_rows(const float *x, long k, const float *wn, int m, float *out) {
    for (int j = 0; j < m; j++) {
        float s = 0.0f;
        for (long t = 0; t < k; t++) s += wn[t] * x[j * k + t];
        out[j] = s;
    }
}
#endif

/* Weights below this many elements (1 MB) run on the calling thread: waking the other threads costs more
 * (10-20 us on the 2-core AMD EPYC) than the work saves. */
#define PARALLEL_MIN_ELEMENTS (1L << 18)

/* x: [rows, k] row-major; w: [n_out, k] row-major; y: [rows, n_out] row-major. */
void llamagen_gemv(const float *x, const float *w, float *y, long rows, long n_out, long k, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (n_out * k >= PARALLEL_MIN_ELEMENTS)
    for (long n = 0; n < n_out; n++) {
        const float *wn = w + n * k;
        float out[4];
        long r = 0;
        for (; r + 4 <= rows; r += 4) {
            dot_rows(x + r * k, k, wn, 4, out);
            for (int j = 0; j < 4; j++) y[(r + j) * n_out + n] = out[j];
        }
        if (r + 2 <= rows) {
            dot_rows(x + r * k, k, wn, 2, out);
            y[r * n_out + n] = out[0], y[(r + 1) * n_out + n] = out[1];
            r += 2;
        }
        if (r < rows) {
            dot_rows(x + r * k, k, wn, 1, out);
            y[r * n_out + n] = out[0];
        }
    }
}

/* The sum of n floats: a read-only pass over memory, the bandwidth roofline of decode (bench/sampler.py). */
float llamagen_read_sum(const float *x, long n, int threads) {
    float s = 0.0f;
#pragma omp parallel for simd reduction(+ : s) schedule(static) num_threads(threads)
    for (long i = 0; i < n; i++) s += x[i];
    return s;
}
