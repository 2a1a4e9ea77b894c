/* Products with weights kept in blocks, the way GGUF files keep them (lmforge.quant.BlockLinear).

   A weight matrix W (N rows, K columns) is held as one int8 code per weight and, for each run of
   32 consecutive columns of a row (a block), a float scale d and, optionally, a float offset m:

       W[n, 32 b + j] = d[n, b] * codes[n, 32 b + j]  (+ m[n, b])

   Q8_0, Q4_0 and Q5_0 files are such blocks without offsets, Q4_1 and Q5_1 with them: the values
   are the file's own, only stored one byte per code. The products run in float32:

       y[i, n] = sum_b d[n, b] * sum_j codes[n, 32 b + j] * x[i, 32 b + j]
                 + sum_b m[n, b] * (sum_j x[i, 32 b + j])   + bias[n]

   which reads a quarter of the bytes float32 weights take; one row of x at a time (decoding) is
   bound by reading weights, so it runs faster. Built by lmforge.kernels with -march=native on
   the machine that runs it; AVX2 with FMA is required (lmforge falls back to float32 without).
*/
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "lmforge's block kernels need AVX2, FMA and F16C"
#endif

#define BLOCK 32
#define ROWS 4 /* rows of x per pass over a weight row */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Eight int8 codes as eight floats. */
static inline __m256 codes8(const int8_t *c) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)c)));
}

/* sum_j c[j] x[j] over one block, as eight partial sums. */
static inline __m256 block_dot(__m256 c0, __m256 c1, __m256 c2, __m256 c3, const float *x) {
    __m256 s0 = _mm256_mul_ps(c0, _mm256_loadu_ps(x));
    __m256 s1 = _mm256_mul_ps(c1, _mm256_loadu_ps(x + 8));
    s0 = _mm256_fmadd_ps(c2, _mm256_loadu_ps(x + 16), s0);
    s1 = _mm256_fmadd_ps(c3, _mm256_loadu_ps(x + 24), s1);
    return _mm256_add_ps(s0, s1);
}

/* y[i, n] for `count` (1..ROWS) rows of x starting at x (rows K apart), one weight row n: each
   block's codes are converted once and used by every row. */
static inline __attribute__((always_inline)) void weight_row(
    const float *x, long K, int count, const int8_t *codes, const float *d, float *out) {
    __m256 acc[ROWS];
    for (int i = 0; i < ROWS; i++) acc[i] = _mm256_setzero_ps();
    for (long b = 0; b < K / BLOCK; b++) {
        const int8_t *c = codes + b * BLOCK;
        __m256 c0 = codes8(c), c1 = codes8(c + 8), c2 = codes8(c + 16), c3 = codes8(c + 24);
        __m256 scale = _mm256_set1_ps(d[b]);
        for (int i = 0; i < count; i++)
            acc[i] = _mm256_fmadd_ps(scale, block_dot(c0, c1, c2, c3, x + i * K + b * BLOCK), acc[i]);
    }
    for (int i = 0; i < count; i++) out[i] = hsum(acc[i]);
}

/* sum_b m[b] * xsum[b] */
static inline float offset_term(const float *m, const float *xsum, long blocks) {
    __m256 acc = _mm256_setzero_ps();
    long b = 0;
    for (; b + 8 <= blocks; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(m + b), _mm256_loadu_ps(xsum + b), acc);
    float total = hsum(acc);
    for (; b < blocks; b++) total += m[b] * xsum[b];
    return total;
}

/* y (M, N) = x (M, K) times W transposed, W in blocks as above; offsets and bias may be NULL.
   K is a multiple of 32. Returns 0, or -1 when memory for the block sums of x ran out. */
int block_matmul(const float *x, long M, long K, const int8_t *codes, const float *scales,
                 const float *offsets, const float *bias, float *y, long N, int threads) {
    const long blocks = K / BLOCK;
    float *xsum = NULL;
    if (offsets != NULL) {
        xsum = malloc(sizeof(float) * (size_t)(M * blocks));
        if (xsum == NULL) return -1;
        for (long i = 0; i < M * blocks; i++) {
            float s = 0.0f;
            for (int j = 0; j < BLOCK; j++) s += x[i * BLOCK + j];
            xsum[i] = s;
        }
    }
    if (M == 1) { /* decoding: one row of x, the loop kept simple */
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
        for (long n = 0; n < N; n++) {
            const int8_t *c = codes + n * K;
            const float *d = scales + n * blocks;
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            long b = 0;
            for (; b + 1 < blocks; b += 2) {
                const int8_t *cb = c + b * BLOCK;
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d[b]),
                                       block_dot(codes8(cb), codes8(cb + 8), codes8(cb + 16), codes8(cb + 24), x + b * BLOCK), acc0);
                cb += BLOCK;
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d[b + 1]),
                                       block_dot(codes8(cb), codes8(cb + 8), codes8(cb + 16), codes8(cb + 24), x + b * BLOCK + BLOCK), acc1);
            }
            if (b < blocks) {
                const int8_t *cb = c + b * BLOCK;
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d[b]),
                                       block_dot(codes8(cb), codes8(cb + 8), codes8(cb + 16), codes8(cb + 24), x + b * BLOCK), acc0);
            }
            float v = hsum(_mm256_add_ps(acc0, acc1)) + (bias != NULL ? bias[n] : 0.0f);
            if (offsets != NULL) v += offset_term(offsets + n * blocks, xsum, blocks);
            y[n] = v;
        }
        free(xsum);
        return 0;
    }
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long n = 0; n < N; n++) {
        const int8_t *c = codes + n * K;
        const float *d = scales + n * blocks;
        float out[ROWS];
        for (long i0 = 0; i0 < M; i0 += ROWS) {
            long count = M - i0 < ROWS ? M - i0 : ROWS;
            switch (count) { /* constant counts: the loops over rows unroll */
                case 1: weight_row(x + i0 * K, K, 1, c, d, out); break;
                case 2: weight_row(x + i0 * K, K, 2, c, d, out); break;
                case 3: weight_row(x + i0 * K, K, 3, c, d, out); break;
                default: weight_row(x + i0 * K, K, 4, c, d, out); break;
            }
            for (long i = 0; i < count; i++) {
                float v = out[i] + (bias != NULL ? bias[n] : 0.0f);
                if (offsets != NULL) v += offset_term(offsets + n * blocks, xsum + (i0 + i) * blocks, blocks);
                y[(i0 + i) * N + n] = v;
            }
        }
    }
    free(xsum);
    return 0;
}

/* W (N, K) as float32: d * code (+ m). */
void block_dequantize(const int8_t *codes, const float *scales, const float *offsets, float *w,
                      long N, long K, int threads) {
    const long blocks = K / BLOCK;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long n = 0; n < N; n++) {
        for (long b = 0; b < blocks; b++) {
            const int8_t *c = codes + n * K + b * BLOCK;
            float *out = w + n * K + b * BLOCK;
            __m256 scale = _mm256_set1_ps(scales[n * blocks + b]);
            __m256 shift = _mm256_set1_ps(offsets != NULL ? offsets[n * blocks + b] : 0.0f);
            for (int j = 0; j < BLOCK; j += 8)
                _mm256_storeu_ps(out + j, _mm256_fmadd_ps(scale, codes8(c + j), shift));
        }
    }
}

/* y = x / sqrt(mean(x^2) + eps) * w, each of `rows` rows of `dim` (RMSNorm, as Llama's, in fp32:
   the decoding form's norm, one call instead of PyTorch's six small operators). */
void rms_norm(const float *x, const float *w, float *y, long rows, long dim, float eps) {
    for (long i = 0; i < rows; i++) {
        const float *xi = x + i * dim;
        float *yi = y + i * dim;
        __m256 acc = _mm256_setzero_ps();
        long j = 0;
        for (; j + 8 <= dim; j += 8) {
            __m256 v = _mm256_loadu_ps(xi + j);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float squares = hsum(acc);
        for (; j < dim; j++) squares += xi[j] * xi[j];
        const float r = 1.0f / sqrtf(squares / (float)dim + eps);
        const __m256 scale = _mm256_set1_ps(r);
        for (j = 0; j + 8 <= dim; j += 8)
            _mm256_storeu_ps(yi + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xi + j), scale), _mm256_loadu_ps(w + j)));
        for (; j < dim; j++) yi[j] = xi[j] * r * w[j];
    }
}

/* Whether every block of 32 columns of W (N, K) lies exactly on one grid of GGUF's block
   formats, and if so its codes, scales and offsets (lmforge.quant.find_blocks). Without an offset
   a block's largest |w| sits on q = +-span and d = max|w| / span; with one its smallest w is the
   offset m (q = 0), its largest sits on q = span and d = (max - min) / span rounded to float16,
   as the files keep it. Each weight must then be exactly d * q (+ m) with q an integer of int8's
   range: the first weight that is not stops the search (a trained float weight fails at once). */
int block_find(const float *w, long N, long K, int span, int offset, int8_t *codes, float *scales,
               float *offsets) {
    const long blocks = K / BLOCK;
    for (long n = 0; n < N; n++) {
        for (long b = 0; b < blocks; b++) {
            const float *wb = w + n * K + b * BLOCK;
            float low = wb[0], high = wb[0], largest = fabsf(wb[0]);
            for (int j = 1; j < BLOCK; j++) {
                low = wb[j] < low ? wb[j] : low;
                high = wb[j] > high ? wb[j] : high;
                largest = fabsf(wb[j]) > largest ? fabsf(wb[j]) : largest;
            }
            float d, m = 0.0f;
            if (offset) {
                m = low;
                d = _cvtsh_ss(_cvtss_sh((high - low) / (float)span, _MM_FROUND_TO_NEAREST_INT));
            } else {
                d = largest / (float)span;
            }
            int8_t *c = codes + n * K + b * BLOCK;
            for (int j = 0; j < BLOCK; j++) {
                float q = d != 0.0f ? nearbyintf((wb[j] - m) / d) : 0.0f;
                if (!(q >= -127.0f && q <= 127.0f) || fmaf(d, q, m) != wb[j]) return 0;
                c[j] = (int8_t)q;
            }
            scales[n * blocks + b] = d;
            if (offset) offsets[n * blocks + b] = m;
        }
    }
    return 1;
}
