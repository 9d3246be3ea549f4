/* CPU decode kernels in float32: a few-row matmul y[r][n] = sum_i x[r][i] * w[n][i] (llamagen_gemv), a whole
 * decode step built on it (llamagen_decode_step), and the sampling probabilities of a step (llamagen_probs).
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
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
        /* Ask for the weights 4 KB ahead (into the next rows near the end of this one), every 64-byte line
         * of them, into every cache level. The hardware prefetchers stop at 4 KB page boundaries.
         * GPT-B's linear weights at 2 rows, 2 threads, Intel Xeon with AVX-512 (same runs): 24.7 ms with the
         * non-temporal hint 1 KB ahead on every other line (as this was, tuned for AVX2, where an iteration is
         * one line), 14.5 ms this way; a plain read of the same matrices took 15.4 ms. On the AMD EPYC (AVX2)
         * that hint had made steps 4% faster than no prefetch; this one has not been timed there. */
        for (int line = 0; line < 2 * LANES; line += 64 / (int)sizeof(float))
            __builtin_prefetch(wn + i + 1024 + line, 0, 3);
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

/* y[0..rows-1] = (or, with add, +=) rows of x (row-major [rows, k]) times weight row wn: 4 rows at a time,
 * then 2, then 1. ystride: the distance between the outputs of consecutive rows. */
static void dot_all(const float *x, long rows, long k, const float *wn, float *y, long ystride, int add) {
    float out[4];
    for (long r = 0; r < rows;) {
        int m = rows - r >= 4 ? 4 : rows - r >= 2 ? 2 : 1;
        if (m == 4)
            dot_rows(x + r * k, k, wn, 4, out);
        else if (m == 2)
            dot_rows(x + r * k, k, wn, 2, out);
        else
            dot_rows(x + r * k, k, wn, 1, out);
        for (int j = 0; j < m; j++) y[(r + j) * ystride] = add ? y[(r + j) * ystride] + out[j] : out[j];
        r += m;
    }
}

/* Past 16 KB of x (GPT-B's 16 rows are 48 KB, more than a 32 KB level-1 cache), threads take 16 weight rows at
 * a time and run each chunk of 4 rows of x over all of them: the chunk stays in level 1 across the group, and
 * the group's weights in level 2 across the chunks. Taken weight row by weight row, all of x went through
 * level 1 for every weight row: GPT-B's 16-row steps took 50.2-54.5 ms that way, 42.7-47.7 ms grouped (2 threads,
 * AMD EPYC with AVX2, same runs). */
#define GROUP_ROWS 16
#define GROUP_FROM_BYTES (16L << 10)

/* y = (with add, +=) x [rows, k] times w [n_out, k] transposed, into y [rows, ystride]: the output rows are
 * split across the team of the enclosing parallel region (an orphaned omp for; outside one, the caller runs
 * them all). Each output is summed as dot_all sums it, so grouping changes only the order of the work. */
static void matmul_team(const float *x, long rows, long k, const float *w, long n_out, float *y, long ystride,
                        int add) {
    if (rows <= 4 || rows * k * (long)sizeof(float) <= GROUP_FROM_BYTES) {
#pragma omp for schedule(static)
        for (long n = 0; n < n_out; n++) dot_all(x, rows, k, w + n * k, y + n, ystride, add);
        return;
    }
#pragma omp for schedule(static)
    for (long g = 0; g < (n_out + GROUP_ROWS - 1) / GROUP_ROWS; g++) {
        long end = (g + 1) * GROUP_ROWS < n_out ? (g + 1) * GROUP_ROWS : n_out;
        for (long r = 0; r < rows; r += 4) {
            long m = rows - r < 4 ? rows - r : 4;
            for (long n = g * GROUP_ROWS; n < end; n++)
                dot_all(x + r * k, m, k, w + n * k, y + n + r * ystride, ystride, add);
        }
    }
}

/* Weights below this many elements (1 MB) run on the calling thread: waking the other threads costs more
 * (10-20 us on the 2-core AMD EPYC) than the work saves. */
#define PARALLEL_MIN_ELEMENTS (1L << 18)

/* x: [rows, k] row-major; w: [n_out, k] row-major; y: [rows, n_out] row-major. */
void llamagen_gemv(const float *x, const float *w, float *y, long rows, long n_out, long k, int threads) {
#pragma omp parallel num_threads(threads) if (n_out * k >= PARALLEL_MIN_ELEMENTS)
    matmul_team(x, rows, k, w, n_out, y, n_out, 0);
}

/* ---- One whole decode step: every layer, the final norm and the output head in one call. ----
 *
 * Run from Python, a step is some 20 small tensor operations per layer around the matmuls, each costing
 * tens of microseconds in dispatch and thread wake-ups: GPT-B at 2 rows took 25.9-27.9 ms a step with this
 * file's matmuls called from Python, 18.4-21.2 ms as one call (2 threads, AMD EPYC with AVX2, same runs).
 * Here one OpenMP team runs the whole step: the matmuls split their output rows across the threads as
 * llamagen_gemv does, the attention splits (row, head) pairs, and the threads wait for each other at a
 * barrier between stages. Every value is computed by one thread in one order, so results do not depend on
 * the thread count. The math is model.py's decode, in float32: RMSNorm, fused q/k/v, rotary pairs,
 * attention over the filled cache (keys 0..pos, minus those key_ok hides), the output projection, the
 * SiLU-gated feed-forward with its gate and up halves in one matrix, the residuals, the final norm, the
 * logits. */

/* One layer's tensors, in this order, as addresses (gemv.py lists them). */
enum { ATTENTION_NORM, WQKV, WO, FFN_NORM, W13, W2, K_CACHE, V_CACHE, TENSORS_PER_LAYER };

typedef struct {
    long rows, dim, n_head, n_kv_head, head_dim, hidden, vocab, n_layer;
    long max_seq;    /* the caches are [max_batch, n_kv_head, max_seq, head_dim]; rows use the first ones */
    long pos;        /* the position fed: its keys and values are written there, keys 0..pos attended */
    long key_stride; /* bytes between the rows of key_ok */
    float eps;
    int threads;
} step_args;

static void rms_norm(const float *x, const float *gain, float *out, long dim, float eps) {
    float squares = 0.0f;
    for (long i = 0; i < dim; i++) squares += x[i] * x[i];
    float scale = 1.0f / sqrtf(squares / (float)dim + eps);
    for (long i = 0; i < dim; i++) out[i] = x[i] * scale * gain[i];
}

/* Rotate interleaved pairs in place by rope.py's tables: cos per pair repeated, sin as (-sin, +sin). */
static void rotate(float *x, const float *cos, const float *sin, long d) {
    for (long i = 0; i < d; i += 2) {
        float x0 = x[i], x1 = x[i + 1];
        x[i] = x0 * cos[i] + x1 * sin[i];
        x[i + 1] = x1 * cos[i + 1] + x0 * sin[i + 1];
    }
}

/* Softmax attention of one query over keys/values [kv_len, d]; scores: kv_len floats of scratch. */
static void attend(const float *q, const float *keys, const float *values, long kv_len, long d,
                   const unsigned char *ok, float *scores, float *out) {
    float scale = 1.0f / sqrtf((float)d), best = -INFINITY, total = 0.0f;
    for (long t = 0; t < kv_len; t++) {
        if (ok && !ok[t]) continue;
        dot_rows(q, d, keys + t * d, 1, scores + t);
        scores[t] *= scale;
        if (scores[t] > best) best = scores[t];
    }
    for (long i = 0; i < d; i++) out[i] = 0.0f;
    for (long t = 0; t < kv_len; t++) {
        if (ok && !ok[t]) continue;
        float p = expf(scores[t] - best);
        total += p;
        for (long i = 0; i < d; i++) out[i] += p * values[t * d + i];
    }
    for (long i = 0; i < d; i++) out[i] /= total;
}

/* x: [rows, dim], the fed tokens' embeddings, overwritten with the last hidden state; logits: [rows, vocab].
 * layers: n_layer * TENSORS_PER_LAYER addresses; cos, sin: the rotary rows of pos; key_ok: NULL (every key)
 * or [rows, >= pos + 1] bytes. Returns 0, or -1 where scratch memory could not be had (nothing written). */
int llamagen_decode_step(const step_args *a, float *x, float *logits, const int64_t *layers, const float *norm,
                         const float *output, const float *cos, const float *sin, const unsigned char *key_ok) {
    const long R = a->rows, D = a->dim, H = a->n_head, G = a->n_kv_head, d = a->head_dim, F = a->hidden;
    const long QKV = (H + 2 * G) * d, kv_len = a->pos + 1, group = H / G;
    float *xn = malloc(sizeof(float) * R * D), *qkv = malloc(sizeof(float) * R * QKV);
    float *att = malloc(sizeof(float) * R * D), *gate = malloc(sizeof(float) * R * 2 * F);
    float *act = malloc(sizeof(float) * R * F), *scores = malloc(sizeof(float) * a->threads * kv_len);
    if (!xn || !qkv || !att || !gate || !act || !scores) {
        free(xn), free(qkv), free(att), free(gate), free(act), free(scores);
        return -1;
    }
#pragma omp parallel num_threads(a->threads)
    {
        float *my_scores = scores + (long)omp_get_thread_num() * kv_len;
        for (long l = 0; l < a->n_layer; l++) {
            const int64_t *t = layers + l * TENSORS_PER_LAYER;
            const float *wqkv = (const float *)t[WQKV], *wo = (const float *)t[WO];
            const float *w13 = (const float *)t[W13], *w2 = (const float *)t[W2];
            float *k_cache = (float *)t[K_CACHE], *v_cache = (float *)t[V_CACHE];

#pragma omp for schedule(static)
            for (long r = 0; r < R; r++) rms_norm(x + r * D, (const float *)t[ATTENTION_NORM], xn + r * D, D, a->eps);
            matmul_team(xn, R, D, wqkv, QKV, qkv, QKV, 0);
            /* Rotate each q and k head; write k and v into the caches at pos. */
#pragma omp for schedule(static)
            for (long rh = 0; rh < R * (H + G); rh++) {
                long r = rh / (H + G), h = rh % (H + G);
                float *head = qkv + r * QKV + h * d;
                rotate(head, cos, sin, d);
                if (h >= H) {  /* k head g = h - H; its v head follows all the k heads */
                    long g = h - H, at = ((r * G + g) * a->max_seq + a->pos) * d;
                    const float *v = qkv + r * QKV + (H + G + g) * d;
                    for (long i = 0; i < d; i++) k_cache[at + i] = head[i], v_cache[at + i] = v[i];
                }
            }
#pragma omp for schedule(static)
            for (long rh = 0; rh < R * H; rh++) {
                long r = rh / H, h = rh % H, cache = (r * G + h / group) * a->max_seq * d;
                const unsigned char *ok = key_ok ? key_ok + r * a->key_stride : NULL;
                attend(qkv + r * QKV + h * d, k_cache + cache, v_cache + cache, kv_len, d, ok, my_scores,
                       att + r * D + h * d);
            }
            matmul_team(att, R, D, wo, D, x, D, 1);
#pragma omp for schedule(static)
            for (long r = 0; r < R; r++) rms_norm(x + r * D, (const float *)t[FFN_NORM], xn + r * D, D, a->eps);
            matmul_team(xn, R, D, w13, 2 * F, gate, 2 * F, 0);  /* the gate and up halves side by side */
#pragma omp for schedule(static)
            for (long r = 0; r < R; r++)
                for (long n = 0; n < F; n++) {
                    float g = gate[r * 2 * F + n];
                    act[r * F + n] = g / (1.0f + expf(-g)) * gate[r * 2 * F + F + n];
                }
            matmul_team(act, R, F, w2, D, x, D, 1);
        }
#pragma omp for schedule(static)
        for (long r = 0; r < R; r++) rms_norm(x + r * D, norm, xn + r * D, D, a->eps);
        matmul_team(xn, R, D, output, a->vocab, logits, a->vocab, 0);
    }
    free(xn), free(qkv), free(att), free(gate), free(act), free(scores);
    return 0;
}

/* ---- Sampling probabilities of a step's logits, in one pass instead of six tensor operations. ----
 *
 * sampling.py's order: guided logits uncond + (cond - uncond) * cfg_scale (rows [cond; uncond] in, one row out
 * per pair), divided by the temperature, every logit below the top_k-th largest set to -inf (ties at it kept),
 * softmax. Equal to the tensor operations to float32 rounding (exp and the softmax sum round in their own
 * order). */

static void swap(float *a, float *b) {
    float t = *a;
    *a = *b, *b = t;
}

/* The value that would sit at index k of v[0..n-1] sorted ascending (v is reordered; no NaN in it): Wirth's
 * selection by partitioning, O(n) on average. */
static float select_kth(float *v, long n, long k) {
    long lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = v[k];
        long i = lo, j = hi;
        do {
            while (v[i] < pivot) i++;
            while (pivot < v[j]) j--;
            if (i <= j) swap(v + i, v + j), i++, j--;
        } while (i <= j);
        if (j < k) lo = i;
        if (k < i) hi = j;
    }
    return v[k];
}

/* logits: [2 * rows, vocab] when guided, else [rows, vocab]; probs: [rows, vocab]. temperature: already
 * floored by the caller; top_k 0: off. Returns 0, every row then a distribution (finite, non-negative, summing
 * to 1), or -1 where a logit is NaN, a row's weights have no finite positive sum, or scratch memory could not
 * be had (the caller then computes them with tensor operations, whose draw reports the fault). */
int llamagen_probs(const float *logits, long rows, long vocab, int guided, float cfg_scale, float temperature,
                   long top_k, float *probs) {
    const int filter = top_k > 0 && top_k < vocab;
    float *scratch = filter ? malloc(sizeof(float) * vocab) : NULL;
    if (filter && !scratch) return -1;
    for (long r = 0; r < rows; r++) {
        const float *cond = logits + r * vocab, *uncond = logits + (rows + r) * vocab;
        float *z = probs + r * vocab, best = -INFINITY;
        int nan = 0;
        for (long i = 0; i < vocab; i++) {
            float guided_logit = guided ? (cond[i] - uncond[i]) * cfg_scale + uncond[i] : cond[i];
            z[i] = guided_logit / temperature;
            nan |= z[i] != z[i];
        }
        if (nan) {
            free(scratch);
            return -1;
        }
        if (scratch) {
            memcpy(scratch, z, sizeof(float) * vocab);
            float kth = select_kth(scratch, vocab, vocab - top_k);
            for (long i = 0; i < vocab; i++)
                if (z[i] < kth) z[i] = -INFINITY;
        }
        for (long i = 0; i < vocab; i++) best = z[i] > best ? z[i] : best;
        double total = 0.0;  /* a float sum of 16384 terms in a row drifts by 1e-5 */
        for (long i = 0; i < vocab; i++) {
            z[i] = z[i] == -INFINITY ? 0.0f : expf(z[i] - best);
            total += z[i];
        }
        if (!(total > 0.0 && isfinite(total))) { /* every logit -inf, or a +inf one (inf - inf above) */
            free(scratch);
            return -1;
        }
        float scale = (float)(1.0 / total);
        for (long i = 0; i < vocab; i++) z[i] *= scale;
    }
    free(scratch);
    return 0;
}

/* The sum of n floats: a read-only pass over memory, the bandwidth roofline of decode (bench/sampler.py). Each
 * thread sums its own contiguous part into 4 vector sums: with one sum (an OpenMP simd reduction, as this was),
 * every add waited on the one before, and the loop read 22-23 GB/s where this reads 26-27 GB/s (2 threads,
 * Intel Xeon with AVX-512, same runs), so the roofline was a slow reader's. */
float llamagen_read_sum(const float *x, long n, int threads) {
    float s = 0.0f;
#pragma omp parallel num_threads(threads) reduction(+ : s)
    {
        long per = (n + omp_get_num_threads() - 1) / omp_get_num_threads();
        long i = per * omp_get_thread_num(), end = i + per < n ? i + per : n;
#ifdef LANES
        vec a[4] = {vzero(), vzero(), vzero(), vzero()};
        for (; i + 4 * LANES <= end; i += 4 * LANES)
            for (int j = 0; j < 4; j++) a[j] = vadd(a[j], vload(x + i + j * LANES));
        s += vsum(vadd(vadd(a[0], a[1]), vadd(a[2], a[3])));
#endif
#pragma omp simd reduction(+ : s)
        for (long t = i; t < end; t++) s += x[t];
    }
    return s;
}
