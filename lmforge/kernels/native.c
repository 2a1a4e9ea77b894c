/* lmforge's native kernels, for decoding (1-5) and training (6-8), built by lmforge.kernels with
   -march=native on the machine that runs them; AVX2 with FMA and F16C is required (lmforge keeps
   PyTorch's kernels without).

   1. Products with weights kept in blocks, the way GGUF files keep them (lmforge.quant.BlockLinear).
   2. One row of x times a float32 or bfloat16 weight stored transposed (lmforge.quant.DecodeLinear).
   3. RMSNorm of rows in one call.
   4. Attention for one new token of each sequence over its key/value cache (SelfAttention).
   5. A whole pre-norm Transformer block's step for one new token (TransformerBlock decoding).
   6. GELU, its tanh and erf forms, forward and backward, over many float32 or bfloat16 values
      (training); 6b. LayerNorm for training, with the residual sum before it, in float32 or with a
      bfloat16 output and gradient (under autocast).
   7. Causal self-attention over whole sequences from the fused Q/K/V projection, forward and
      backward (training).
   8. The same in bfloat16 on AMX tiles, where the CPU has them (training under autocast).

   1. Blocks. A weight matrix W (N rows, K columns) is held as one int8 code per weight and, for
   each run of 32 consecutive columns of a row (a block), a float scale d and, optionally, a float
   offset m:

       W[n, 32 b + j] = d[n, b] * codes[n, 32 b + j]  (+ m[n, b])

   Q8_0, Q4_0 and Q5_0 files are such blocks without offsets, Q4_1 and Q5_1 with them: the values
   are the file's own, only stored one byte per code. The products run in float32:

       y[i, n] = sum_b d[n, b] * sum_j codes[n, 32 b + j] * x[i, 32 b + j]
                 + sum_b m[n, b] * (sum_j x[i, 32 b + j])   + bias[n]

   which reads under a third of the bytes float32 weights take; one row of x at a time (decoding)
   is bound by reading weights, so it runs faster.
*/
#define _DEFAULT_SOURCE /* syscall (section 8 asks for the AMX tiles) */
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <immintrin.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "lmforge's native kernels need AVX2, FMA and F16C"
#endif

#define BLOCK 32
#define ROWS 4 /* rows of x per pass over a pair of weight rows (8 accumulators in registers; 6 spill) */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Denormal operands and results read and written as zero while a training kernel runs, each
   thread's mode restored after (MXCSR's DAZ and FTZ bits). Softmax weights of far-off keys times
   small gradients fall below float32's normal range (1.2e-38) once attention sharpens, and each
   denormal operand costs a hundred cycles or more: the attention backward pass ran 40 times as
   slow on such values. Nothing this small changes a result beyond float32's rounding. */
static inline unsigned int flush_denormals(void) {
    const unsigned int mode = _mm_getcsr();
    _mm_setcsr(mode | 0x8040);
    return mode;
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
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

/* d * q + m for eight codes q: the weights' exact float values. */
static inline __m256 widen8(const int8_t *c, __m256 scale, __m256 shift) {
    return _mm256_fmadd_ps(scale, codes8(c), shift);
}

/* acc + d * sum_j q[j] x[j] over one block of codes q. */
static inline __m256 add_block(__m256 acc, const int8_t *q, float d, const float *x) {
    return _mm256_fmadd_ps(_mm256_set1_ps(d), block_dot(codes8(q), codes8(q + 8), codes8(q + 16), codes8(q + 24), x), acc);
}

/* Several rows of x (a batch of sequences decoding together) against two weight rows: each
   8 weights are widened once, to their exact values w = d * q (+ m), and used by every row of x
   (`count`, 1..ROWS); each row of x is loaded once for both weight rows. */
static inline __attribute__((always_inline)) void weight_pair(
    const float *x, long K, int count, const int8_t *c0, const int8_t *c1, const float *d0, const float *d1,
    const float *m0, const float *m1, float out0[ROWS], float out1[ROWS]) {
    __m256 acc0[ROWS], acc1[ROWS];
    for (int i = 0; i < ROWS; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
    for (long b = 0; b < K / BLOCK; b++) {
        const __m256 scale0 = _mm256_set1_ps(d0[b]), scale1 = _mm256_set1_ps(d1[b]);
        const __m256 shift0 = _mm256_set1_ps(m0 != NULL ? m0[b] : 0.0f);
        const __m256 shift1 = _mm256_set1_ps(m1 != NULL ? m1[b] : 0.0f);
        for (int j = 0; j < BLOCK; j += 8) {
            const __m256 w0 = widen8(c0 + b * BLOCK + j, scale0, shift0);
            const __m256 w1 = widen8(c1 + b * BLOCK + j, scale1, shift1);
            for (int i = 0; i < count; i++) {
                const __m256 xv = _mm256_loadu_ps(x + i * K + b * BLOCK + j);
                acc0[i] = _mm256_fmadd_ps(w0, xv, acc0[i]);
                acc1[i] = _mm256_fmadd_ps(w1, xv, acc1[i]);
            }
        }
    }
    for (int i = 0; i < count; i++) {
        out0[i] = hsum(acc0[i]);
        out1[i] = hsum(acc1[i]);
    }
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
   K is a multiple of 32. Returns 0, or -1 when memory for the block sums of x ran out. One row of
   x (decoding one sequence) is bound by reading W; several rows (a batch decoding together) share
   each widened weight. */
int block_matmul(const float *x, long M, long K, const int8_t *codes, const float *scales,
                 const float *offsets, const float *bias, float *y, long N, int threads) {
    const long blocks = K / BLOCK;
    if (M == 1) { /* decoding one sequence: sum_b d (sum_j q x) + sum_b m (sum_j x), the loop kept simple */
        float *xsum = NULL;
        if (offsets != NULL) {
            xsum = malloc(sizeof(float) * (size_t)blocks);
            if (xsum == NULL) return -1;
            for (long b = 0; b < blocks; b++) {
                float s = 0.0f;
                for (int j = 0; j < BLOCK; j++) s += x[b * BLOCK + j];
                xsum[b] = s;
            }
        }
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
        for (long n = 0; n < N; n++) {
            const int8_t *c = codes + n * K;
            const float *d = scales + n * blocks;
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            long b = 0;
            for (; b + 1 < blocks; b += 2) { /* two chains, added at the end */
                acc0 = add_block(acc0, c + b * BLOCK, d[b], x + b * BLOCK);
                acc1 = add_block(acc1, c + (b + 1) * BLOCK, d[b + 1], x + (b + 1) * BLOCK);
            }
            if (b < blocks) acc0 = add_block(acc0, c + b * BLOCK, d[b], x + b * BLOCK);
            float v = hsum(_mm256_add_ps(acc0, acc1)) + (bias != NULL ? bias[n] : 0.0f);
            if (offsets != NULL) v += offset_term(offsets + n * blocks, xsum, blocks);
            y[n] = v;
        }
        free(xsum);
        return 0;
    }
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long pair = 0; pair < (N + 1) / 2; pair++) {
        const long n0 = 2 * pair, n1 = n0 + 1 < N ? n0 + 1 : n0; /* an odd last row: computed twice */
        const int8_t *c0 = codes + n0 * K, *c1 = codes + n1 * K;
        const float *d0 = scales + n0 * blocks, *d1 = scales + n1 * blocks;
        const float *m0 = offsets != NULL ? offsets + n0 * blocks : NULL;
        const float *m1 = offsets != NULL ? offsets + n1 * blocks : NULL;
        float out0[ROWS], out1[ROWS];
        for (long i0 = 0; i0 < M; i0 += ROWS) {
            const long count = M - i0 < ROWS ? M - i0 : ROWS;
            const float *xi = x + i0 * K;
            switch (count) { /* constant counts: the loops over rows unroll */
                case 1: weight_pair(xi, K, 1, c0, c1, d0, d1, m0, m1, out0, out1); break;
                case 2: weight_pair(xi, K, 2, c0, c1, d0, d1, m0, m1, out0, out1); break;
                case 3: weight_pair(xi, K, 3, c0, c1, d0, d1, m0, m1, out0, out1); break;
                default: weight_pair(xi, K, 4, c0, c1, d0, d1, m0, m1, out0, out1); break;
            }
            for (long i = 0; i < count; i++) {
                y[(i0 + i) * N + n0] = out0[i] + (bias != NULL ? bias[n0] : 0.0f);
                y[(i0 + i) * N + n1] = out1[i] + (bias != NULL ? bias[n1] : 0.0f);
            }
        }
    }
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
            for (int j = 0; j < BLOCK; j += 8) _mm256_storeu_ps(out + j, widen8(c + j, scale, shift));
        }
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

/* 2. Dense rows. y (N) = x (K) Wt + bias over the columns [n0, n1), Wt (K, N) with rows `ldw`
   values apart (a view of some columns of a wider weight is one too), float32 or, `half`,
   bfloat16 (widened to float32 as read: the same arithmetic on half the bytes). Eight rows of Wt
   are streamed at a time, each from n0 to n1, while y stays in cache: a one-row product is bound
   by reading Wt, and eight long streams read it faster than the BLAS's one-row kernel here. */
static inline __m256 weights8(const void *w, long i, int half) {
    if (half)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i))), 16));
    return _mm256_loadu_ps((const float *)w + i);
}

static inline float weight1(const void *w, long i, int half) {
    if (!half) return ((const float *)w)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)w)[i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline void dense_columns(const float *x, long K, const void *wt, long ldw, const float *bias, float *y,
                                 long n0, long n1, int half) {
    if (bias != NULL)
        memcpy(y + n0, bias + n0, sizeof(float) * (size_t)(n1 - n0));
    else
        memset(y + n0, 0, sizeof(float) * (size_t)(n1 - n0));
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        const long r = k * ldw; /* row k of Wt */
        __m256 xk[8];
        for (int j = 0; j < 8; j++) xk[j] = _mm256_set1_ps(x[k + j]);
        long n = n0;
        for (; n + 8 <= n1; n += 8) { /* two chains of four, added at the end */
            __m256 a = _mm256_fmadd_ps(weights8(wt, r + n, half), xk[0], _mm256_loadu_ps(y + n));
            __m256 b = _mm256_mul_ps(weights8(wt, r + 4 * ldw + n, half), xk[4]);
            a = _mm256_fmadd_ps(weights8(wt, r + ldw + n, half), xk[1], a);
            b = _mm256_fmadd_ps(weights8(wt, r + 5 * ldw + n, half), xk[5], b);
            a = _mm256_fmadd_ps(weights8(wt, r + 2 * ldw + n, half), xk[2], a);
            b = _mm256_fmadd_ps(weights8(wt, r + 6 * ldw + n, half), xk[6], b);
            a = _mm256_fmadd_ps(weights8(wt, r + 3 * ldw + n, half), xk[3], a);
            b = _mm256_fmadd_ps(weights8(wt, r + 7 * ldw + n, half), xk[7], b);
            _mm256_storeu_ps(y + n, _mm256_add_ps(a, b));
        }
        for (; n < n1; n++) {
            float a = y[n], b = 0.0f;
            for (int j = 0; j < 4; j++) {
                a += weight1(wt, r + j * ldw + n, half) * x[k + j];
                b += weight1(wt, r + (j + 4) * ldw + n, half) * x[k + j + 4];
            }
            y[n] = a + b;
        }
    }
    for (; k < K; k++) {
        const long r = k * ldw;
        const __m256 xk = _mm256_set1_ps(x[k]);
        long n = n0;
        for (; n + 8 <= n1; n += 8) _mm256_storeu_ps(y + n, _mm256_fmadd_ps(weights8(wt, r + n, half), xk, _mm256_loadu_ps(y + n)));
        for (; n < n1; n++) y[n] += weight1(wt, r + n, half) * x[k];
    }
}

static inline void dense_rows(const float *x, long K, const void *wt, long ldw, const float *bias, float *y, long N,
                              int threads, int half) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int t = 0, count = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        count = omp_get_num_threads();
#endif
        const long share = ((N + count - 1) / count + 15) / 16 * 16; /* whole cache lines each */
        const long n0 = t * share, n1 = n0 + share < N ? n0 + share : N;
        if (n0 < n1 && half) /* two inlined copies, each with its loads fixed */
            dense_columns(x, K, wt, ldw, bias, y, n0, n1, 1);
        else if (n0 < n1)
            dense_columns(x, K, wt, ldw, bias, y, n0, n1, 0);
    }
}

/* y (N) = x (K) Wt (K, N) + bias (bias may be NULL); with threads, each takes a range of columns. */
void dense_row(const float *x, long K, const float *wt, long ldw, const float *bias, float *y, long N, int threads) {
    dense_rows(x, K, wt, ldw, bias, y, N, threads, 0);
}

/* The same with Wt in bfloat16. */
void dense_row_bf16(const float *x, long K, const uint16_t *wt, long ldw, const float *bias, float *y, long N,
                    int threads) {
    dense_rows(x, K, wt, ldw, bias, y, N, threads, 1);
}

/* 3. RMSNorm (Llama's), y = x / sqrt(mean(x^2) + eps) * w for each of `rows` rows of `dim`, in
   fp32: one call instead of PyTorch's six small operators (a one-token step of a 30-layer model
   pays for 61 norms). */
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

/* Vectors for the exponential and what uses it (sections 4 to 7): 16 floats with AVX-512 (F, DQ,
   BW), else 8 with AVX2. The same operations in either width: the values do not depend on it (the float32
   kernels' last n % LANES values take scalar formulas). */
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__)
#define LANES 16
typedef __m512 vec;
typedef __mmask16 vmask;
#define vset _mm512_set1_ps
#define vload _mm512_loadu_ps
#define vstore _mm512_storeu_ps
#define vadd _mm512_add_ps
#define vsub _mm512_sub_ps
#define vmul _mm512_mul_ps
#define vfmadd _mm512_fmadd_ps
#define vfnmadd _mm512_fnmadd_ps
#define vround(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vpow2(n) /* 2^n for whole n in float form, through the exponent bits */ \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
#define vmax _mm512_max_ps
#define vdiv _mm512_div_ps
#define vor _mm512_or_ps
#define vandnot _mm512_andnot_ps
#define vsign(x) _mm512_movepi32_mask(_mm512_castps_si512(x)) /* the lanes whose sign bit is set */
#define vless(a, b) _mm512_cmp_ps_mask((a), (b), _CMP_LT_OQ)
#define vat_least(a, b) _mm512_cmp_ps_mask((a), (b), _CMP_GE_OQ)
#define vpick(m, a, b) _mm512_mask_blend_ps((m), (a), (b)) /* b in the lanes of m, else a */
#define vzero_unless(x, m) _mm512_maskz_mov_ps((m), (x))
#define vhmax _mm512_reduce_max_ps
#define vhsum _mm512_reduce_add_ps
static inline vmask vbelow(long k) { /* the lanes whose index is below k */
    return k >= LANES ? (vmask)0xffff : (vmask)((1u << (k > 0 ? k : 0)) - 1);
}

/* LANES bfloat16 values (the upper halves of float32s) widened to float32, exactly. */
static inline vec load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* LANES float32 values rounded to the nearest bfloat16, ties to even (a NaN to the quiet NaN 0x7fc0). */
static inline void store_bf16(uint16_t *p, vec v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                          _mm512_set1_epi32(0x7fff));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(r));
}
#else
#define LANES 8
typedef __m256 vec;
typedef __m256 vmask;
#define vset _mm256_set1_ps
#define vload _mm256_loadu_ps
#define vstore _mm256_storeu_ps
#define vadd _mm256_add_ps
#define vsub _mm256_sub_ps
#define vmul _mm256_mul_ps
#define vfmadd _mm256_fmadd_ps
#define vfnmadd _mm256_fnmadd_ps
#define vround(x) _mm256_round_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vpow2(n) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#define vmax _mm256_max_ps
#define vdiv _mm256_div_ps
#define vor _mm256_or_ps
#define vandnot _mm256_andnot_ps
#define vsign(x) (x) /* blendv reads the sign bits */
#define vless(a, b) _mm256_cmp_ps((a), (b), _CMP_LT_OQ)
#define vat_least(a, b) _mm256_cmp_ps((a), (b), _CMP_GE_OQ)
#define vpick(m, a, b) _mm256_blendv_ps((a), (b), (m))
#define vzero_unless(x, m) _mm256_and_ps((x), (m))
#define vhmax hmax
#define vhsum hsum
static inline vmask vbelow(long k) { /* the lanes whose index is below k */
    return _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)k), _CMP_LT_OQ);
}

static inline vec load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline void store_bf16(uint16_t *p, vec v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                          _mm256_set1_epi32(0x7fff));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
#endif

/* e^x for x <= 0 (softmax's shifted scores), to about 2 ulp: x = n ln2 + r, e^r by its Taylor
   polynomial on |r| <= ln2 / 2 (Cephes' coefficients), 2^n in the exponent bits. Below -87 the
   result is 0 to float precision beside the row's largest term, 1. */
static inline vec exp_nonpositive(vec x) {
    x = vmax(x, vset(-87.0f));
    const vec n = vround(vmul(x, vset(1.44269504088896341f)));
    vec r = vfnmadd(n, vset(0.693359375f), x);
    r = vfnmadd(n, vset(-2.12194440e-4f), r);
    vec p = vset(1.9875691500e-4f);
    p = vfmadd(p, r, vset(1.3981999507e-3f));
    p = vfmadd(p, r, vset(8.3334519073e-3f));
    p = vfmadd(p, r, vset(4.1665795894e-2f));
    p = vfmadd(p, r, vset(1.6666665459e-1f));
    p = vfmadd(p, r, vset(5.0000001201e-1f));
    p = vfmadd(p, vmul(r, r), vadd(r, vset(1.0f)));
    return vmul(p, vpow2(n));
}

/* Rotate the first R dimensions of a head by its position's angles, as lmforge's apply_rotary
   does (pairs i and i + R/2: x1 cos - x2 sin, x2 cos + x1 sin; cos and sin hold R values). */
static void rotate(float *x, const float *cos, const float *sin, long R) {
    const long half = R / 2;
    for (long i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
    }
}

/* One row of decode_attention: its qkv, its angles, its caches, its position. */
static int attend_row(float *qkv, long H, long Hkv, long D, const float *cos, const float *sin, long R,
                      float *keys, float *values, long capacity, long pos, float scale, float *out) {
    float *q = qkv, *k = qkv + H * D, *v = k + Hkv * D;
    const long S = pos + 1, group = H / Hkv;
    for (long h = 0; h < H && R > 0; h++) rotate(q + h * D, cos, sin, R);
    for (long g = 0; g < Hkv; g++) {
        if (R > 0) rotate(k + g * D, cos, sin, R);
        memcpy(keys + (g * capacity + pos) * D, k + g * D, sizeof(float) * (size_t)D);
        memcpy(values + (g * capacity + pos) * D, v + g * D, sizeof(float) * (size_t)D);
    }
    float *p = malloc(sizeof(float) * (size_t)(S + 8));
    if (p == NULL) return -1;
    for (long h = 0; h < H; h++) {
        const float *qh = q + h * D, *K = keys + (h / group) * capacity * D, *V = values + (h / group) * capacity * D;
        float largest = -INFINITY;
        for (long j = 0; j < S; j++) { /* scores: scale q . k_j */
            __m256 acc = _mm256_setzero_ps();
            for (long d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(K + j * D + d), acc);
            p[j] = hsum(acc) * scale;
            largest = p[j] > largest ? p[j] : largest;
        }
        const vec top = vset(largest);
        vec total = vset(0.0f);
        long j = 0;
        for (; j + LANES <= S; j += LANES) {
            const vec e = exp_nonpositive(vsub(vload(p + j), top));
            vstore(p + j, e);
            total = vadd(total, e);
        }
        float sum = vhsum(total);
        for (; j < S; j++) {
            p[j] = expf(p[j] - largest);
            sum += p[j];
        }
        const float inverse = 1.0f / sum;
        for (long d0 = 0; d0 < D; d0 += 64) { /* out_h = sum_j p_j v_j / sum, 64 columns in registers */
            const long width = D - d0 < 64 ? D - d0 : 64;
            __m256 acc[8];
            for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
            for (long t = 0; t < S; t++) {
                const __m256 pt = _mm256_set1_ps(p[t]);
                const float *vt = V + t * D + d0;
                for (int c = 0; c < width / 8; c++) acc[c] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vt + 8 * c), acc[c]);
            }
            for (int c = 0; c < width / 8; c++)
                _mm256_storeu_ps(out + h * D + d0 + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inverse)));
        }
    }
    free(p);
    return 0;
}

/* 4. Attention for one new token of each of B sequences, with their key/value caches (lmforge's
   SelfAttention while decoding). Row b's qkv (B rows of (H + 2 Hkv) * D floats) holds its token's
   fused projection, [q | k | v]: H query heads, then Hkv key and value heads, D wide each (D a
   multiple of 8); the first R dimensions of q's and k's heads rotate by the row's cos/sin (at
   cos + b * rope_stride: 0 when every row shares them; R = 0: no rotation). The rotated k and v
   go into the row's caches (Hkv, capacity, D) at its position (positions[b], or `position` for
   every row when positions is NULL); each query head h attends to positions 0..that of key/value
   head h / (H / Hkv):

       out_h = sum_j softmax_j(scale q_h . k_j) v_j

   written to row b of out (B rows of H * D). Returns 0, or -1 when memory for the scores ran out. */
int decode_attention(float *qkv, long B, long H, long Hkv, long D, const float *cos, const float *sin, long R,
                     long rope_stride, float *keys, float *values, long capacity, const int64_t *positions,
                     long position, float scale, float *out, int threads) {
    const long width = (H + 2 * Hkv) * D, cache = Hkv * capacity * D;
    int failed = 0;
#pragma omp parallel for num_threads(threads) if (threads > 1 && B > 1) schedule(static)
    for (long b = 0; b < B; b++) {
        const long pos = positions != NULL ? (long)positions[b] : position;
        if (attend_row(qkv + b * width, H, Hkv, D, cos != NULL ? cos + b * rope_stride : NULL,
                       sin != NULL ? sin + b * rope_stride : NULL, R, keys + b * cache, values + b * cache,
                       capacity, pos, scale, out + b * H * D) != 0)
            failed = 1;
    }
    return failed ? -1 : 0;
}

/* 5. One pre-norm Transformer block's step for one new token (lmforge's TransformerBlock while
   decoding one sequence), in one call instead of some twenty small operators and module calls:

       h = norm1(x);  [q | k | v] = h Wqkv + bqkv;  a = attention (section 4, one row)
       x = x + a Wo + bo
       h = norm2(x);  u = act(h Wup + bup)   (gated: act(h Wgate + bgate) * (h Wup + bup))
       y = x + u Wdown + bdown

   Every product is section 2's (weights stored transposed, float32 or bfloat16) or section 1's
   (blocks); a norm is LayerNorm (with or without its bias) or RMSNorm; the activation GELU (erf
   or tanh form), ReLU or SiLU. */
typedef struct { /* one product: a float32 or bfloat16 weight stored transposed, or GGUF-style blocks */
    const float *w;                             /* dense: (K, N), rows `ld` values apart */
    long ld;
    const int8_t *codes;                        /* blocks (when not NULL): (N, K), section 1 */
    const float *scales, *offsets;
    const float *bias;                          /* NULL: none */
    const uint16_t *w16;                        /* dense in bfloat16 (when not NULL), as w */
} Product;

typedef struct {
    long width, heads, kv_heads, head_dim, hidden; /* E, H, Hkv, D, F (the MLP's inner width) */
    int norm;                                      /* 0: LayerNorm, 1: RMSNorm */
    int activation;                                /* 0: GELU (erf), 1: GELU (tanh), 2: ReLU, 3: SiLU */
    int gated;                                     /* up holds [gate | up], 2 F columns */
    float eps, scale;                              /* the norms' epsilon, the attention's scale */
    const float *norm1_w, *norm1_b, *norm2_w, *norm2_b; /* a NULL bias: none */
    Product qkv, out, up, down;
} Block;

/* y (N) = x (K) times the product's weight, plus its bias: section 2 or section 1's one row. */
static int product(const Product *p, const float *x, long K, float *y, long N, int threads) {
    if (p->codes != NULL) return block_matmul(x, 1, K, p->codes, p->scales, p->offsets, p->bias, y, N, threads);
    if (p->w16 != NULL)
        dense_row_bf16(x, K, p->w16, p->ld, p->bias, y, N, threads);
    else
        dense_row(x, K, p->w, p->ld, p->bias, y, N, threads);
    return 0;
}

/* LayerNorm (mean and variance in two passes) or RMSNorm of one row of n. */
static void norm_row(const Block *blk, const float *x, const float *w, const float *b, float *y, long n) {
    if (blk->norm == 1) {
        rms_norm(x, w, y, 1, n, blk->eps);
        return;
    }
    float mean = 0.0f, var = 0.0f;
    for (long j = 0; j < n; j++) mean += x[j];
    mean /= (float)n;
    for (long j = 0; j < n; j++) var += (x[j] - mean) * (x[j] - mean);
    const float r = 1.0f / sqrtf(var / (float)n + blk->eps);
    for (long j = 0; j < n; j++) y[j] = (x[j] - mean) * r * w[j] + (b != NULL ? b[j] : 0.0f);
}

/* exp_nonpositive, but 0 where x < -87 (or is NaN) rather than e^-87: for the activations, where
   the exponential multiplies x itself and e^-87 times a huge x would not vanish. */
static inline vec exp_or_zero(vec x) {
    return vzero_unless(exp_nonpositive(x), vat_least(x, vset(-87.0f)));
}

/* 1 / (1 + e^-x) through section 4's exp of a nonpositive number: e = e^-|x|, then 1 / (1 + e)
   or e / (1 + e) (no cancellation on either side). */
static inline vec sigmoid(vec x) {
    const vec e = exp_or_zero(vor(x, vset(-0.0f))); /* e^-|x| */
    const vec one = vset(1.0f), inverse = vdiv(one, vadd(one, e));
    return vpick(vsign(x), inverse, vmul(e, inverse)); /* x's sign bit picks e / (1 + e) */
}

/* GELU's erf form, x Phi(x), with Phi(x) = erfc(-x / sqrt 2) / 2. Abramowitz and Stegun's 7.1.26
   (the formula PyTorch's own vectorized erf uses; |error| <= 1.5e-7), written for Phi directly:
   with z = |x| / sqrt 2, t = 1 / (1 + p z) and e = exp(-z^2) = exp(-x^2 / 2),

       Phi(-|x|) = tail = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e / 2,  Phi(|x|) = 1 - tail

   so the negative side is never 1 minus almost 1. The slope Phi(x) + x phi(x) needs the normal
   density phi(x) = e / sqrt(2 pi), the same e: the backward pass takes one exp where PyTorch's
   takes two. Returns Phi(x); *gauss gets e. */
static inline vec normal_cdf(vec x, vec *gauss) {
    const vec one = vset(1.0f);
    const vec z = vandnot(vset(-0.0f), vmul(x, vset(0.70710678118654752f)));
    const vec t = vdiv(one, vfmadd(vset(0.3275911f), z, one));
    vec poly = vfmadd(vset(1.061405429f), t, vset(-1.453152027f));
    poly = vfmadd(poly, t, vset(1.421413741f));
    poly = vfmadd(poly, t, vset(-0.284496736f));
    poly = vfmadd(poly, t, vset(0.254829592f));
    const vec e = exp_or_zero(vmul(vmul(x, x), vset(-0.5f)));
    *gauss = e;
    const vec tail = vmul(vmul(poly, t), vmul(e, vset(0.5f)));
    return vpick(vsign(x), vsub(one, tail), tail); /* x's sign bit picks the tail */
}

/* GELU, the tanh form x sigmoid(2u) (section 6) and the erf form x Phi(x). */
static inline vec gelu_tanh(vec x) {
    const vec inner = vfmadd(vmul(x, x), vset(0.044715f), vset(1.0f));
    return vmul(x, sigmoid(vmul(vmul(x, vset(1.5957691216057308f)), inner)));
}

static inline vec gelu_erf(vec x) {
    vec e;
    return vmul(x, normal_cdf(x, &e));
}

/* The activation of n values in place (LANES at a time, then one by one). GELU's tanh form is
   x (1 + tanh u) / 2 = x sigmoid(2 u), u = sqrt(2 / pi) (x + 0.044715 x^3); its erf form
   x Phi(x) by normal_cdf (the C library's erfc for the last n % LANES values). */
static void activate(int activation, float *u, long n) {
    long j = 0;
    for (; j + LANES <= n; j += LANES) {
        const vec x = vload(u + j);
        vec y;
        if (activation == 0) {
            y = gelu_erf(x);
        } else if (activation == 1) {
            y = gelu_tanh(x);
        } else if (activation == 2) {
            y = vmax(x, vset(0.0f));
        } else {
            y = vmul(x, sigmoid(x));
        }
        vstore(u + j, y);
    }
    for (; j < n; j++) {
        const float x = u[j];
        if (activation == 0) u[j] = 0.5f * x * erfcf(-0.70710678118654752f * x);
        else if (activation == 1) u[j] = x / (1.0f + expf(-1.5957691216057308f * x * (1.0f + 0.044715f * x * x)));
        else if (activation == 2) u[j] = x > 0.0f ? x : 0.0f;
        else u[j] = x / (1.0f + expf(-x));
    }
}

/* y (E) = the block's step for x (E), the new token at `position` of one sequence: its key and
   value go into keys/values (Hkv, capacity, D) there; cos/sin hold its R rotary angles (R = 0:
   none). Returns 0, or -1 when memory for the intermediate values ran out. */
int decode_block(const Block *blk, const float *x, float *y, const float *cos, const float *sin, long R,
                 float *keys, float *values, long capacity, long position, int threads) {
    const long E = blk->width, H = blk->heads, Hkv = blk->kv_heads, D = blk->head_dim;
    const long F = blk->hidden, up_width = blk->gated ? 2 * F : F, qkv_width = (H + 2 * Hkv) * D;
    float *h = malloc(sizeof(float) * (size_t)(E + qkv_width + H * D + E + up_width));
    if (h == NULL) return -1;
    float *qkv = h + E, *attended = qkv + qkv_width, *sum = attended + H * D, *u = sum + E;

    int failed = 0;
    norm_row(blk, x, blk->norm1_w, blk->norm1_b, h, E);
    failed |= product(&blk->qkv, h, E, qkv, qkv_width, threads);
    failed |= attend_row(qkv, H, Hkv, D, cos, sin, R, keys, values, capacity, position, blk->scale, attended);
    failed |= product(&blk->out, attended, H * D, sum, E, threads);
    for (long j = 0; j < E; j++) y[j] = x[j] + sum[j];

    norm_row(blk, y, blk->norm2_w, blk->norm2_b, h, E);
    failed |= product(&blk->up, h, E, u, up_width, threads);
    activate(blk->activation, u, F);
    if (blk->gated)
        for (long j = 0; j < F; j++) u[j] *= u[F + j];
    failed |= product(&blk->down, u, F, sum, E, threads);
    for (long j = 0; j < E; j++) y[j] += sum[j];
    free(h);
    return failed ? -1 : 0;
}

/* 6. GELU over many values, both forms, forward and backward, for training and whole-prompt
   passes (lmforge.kernels.activation): PyTorch's tanh is its slowest elementwise kernel on an
   AVX2 build (its GELU 3-5 times as slow as this one), its erf form's backward pass takes two
   exponentials a value where one will do, and its bfloat16 GELU (autocast's) converts in and out
   around the float32 formula. LANES values a step (16 with AVX-512); with threads, each takes a
   contiguous range. The tanh form by section 5's identity:

       y = x s,  s = sigmoid(2u),  2u = a x (1 + 0.044715 x^2),  a = 2 sqrt(2 / pi)
       dy/dx = s + x s (1 - s) a (1 + 3 * 0.044715 x^2)

   with s (1 - s) = e / (1 + e)^2, e = exp(-|2u|), so neither side cancels. The erf form by
   section 5's normal_cdf, the slope Phi(x) + x phi(x) with the density from the same exponential.
   bfloat16 values are widened to float32 (exactly), the formulas run in float32, and the results
   are rounded to the nearest bfloat16, ties to even, as PyTorch rounds. */
static inline vec gelu_tanh_slope(vec x) {
    const vec one = vset(1.0f), a = vset(1.5957691216057308f), x2 = vmul(x, x);
    const vec u2 = vmul(vmul(x, a), vfmadd(x2, vset(0.044715f), one));
    const vec minus = vor(u2, vset(-0.0f)); /* -|2u| */
    const vec e = exp_or_zero(minus);
    const vec inverse = vdiv(one, vadd(one, e));
    const vec s = vpick(vsign(u2), inverse, vmul(e, inverse)); /* 2u's sign bit: e / (1 + e) */
    const vec spread = vmul(vmul(e, inverse), inverse);         /* s (1 - s) */
    const vec du = vmul(a, vfmadd(x2, vset(0.134145f), one));
    const vec slope = vfmadd(vmul(x, spread), du, s);
    /* far out (e = 0) the slope is s, 1 or 0: not 0 times an overflowed du (a NaN stays NaN) */
    return vpick(vless(minus, vset(-87.0f)), slope, s);
}

static inline vec gelu_erf_slope(vec x) {
    vec e;
    const vec cdf = normal_cdf(x, &e);
    return vfmadd(vmul(x, vset(0.39894228040143268f)), e, cdf); /* phi = e / sqrt(2 pi) */
}

void gelu_tanh_forward(const float *x, float *y, long n, int threads) {
    const long vectors = n / LANES;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long v = 0; v < vectors; v++) vstore(y + LANES * v, gelu_tanh(vload(x + LANES * v)));
    for (long j = LANES * vectors; j < n; j++)
        y[j] = x[j] / (1.0f + expf(-1.5957691216057308f * x[j] * (1.0f + 0.044715f * x[j] * x[j])));
}

/* dx = dy * GELU'(x) over n values (the tanh form). */
void gelu_tanh_backward(const float *dy, const float *x, float *dx, long n, int threads) {
    const long vectors = n / LANES;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long v = 0; v < vectors; v++)
        vstore(dx + LANES * v, vmul(vload(dy + LANES * v), gelu_tanh_slope(vload(x + LANES * v))));
    for (long j = LANES * vectors; j < n; j++) {
        const float u = x[j], s = 1.0f / (1.0f + expf(-1.5957691216057308f * u * (1.0f + 0.044715f * u * u)));
        const float spread = s * (1.0f - s);
        dx[j] = dy[j] * (spread == 0.0f ? s : s + u * spread * 1.5957691216057308f * (1.0f + 0.134145f * u * u));
    }
}

void gelu_erf_forward(const float *x, float *y, long n, int threads) {
    const long vectors = n / LANES;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long v = 0; v < vectors; v++) vstore(y + LANES * v, gelu_erf(vload(x + LANES * v)));
    for (long j = LANES * vectors; j < n; j++) y[j] = 0.5f * x[j] * erfcf(-0.70710678118654752f * x[j]);
}

/* dx = dy * (Phi(x) + x phi(x)) over n values (the erf form). */
void gelu_erf_backward(const float *dy, const float *x, float *dx, long n, int threads) {
    const long vectors = n / LANES;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long v = 0; v < vectors; v++)
        vstore(dx + LANES * v, vmul(vload(dy + LANES * v), gelu_erf_slope(vload(x + LANES * v))));
    for (long j = LANES * vectors; j < n; j++) {
        const float u = x[j];
        dx[j] = dy[j] * (0.5f * erfcf(-0.70710678118654752f * u) + u * 0.39894228040143268f * expf(-0.5f * u * u));
    }
}

static inline vec gelu_bf16(const uint16_t *x, int tanh_form) {
    const vec xv = load_bf16(x);
    return tanh_form ? gelu_tanh(xv) : gelu_erf(xv);
}

static inline vec gelu_bf16_grad(const uint16_t *dy, const uint16_t *x, int tanh_form) {
    const vec xv = load_bf16(x);
    return vmul(load_bf16(dy), tanh_form ? gelu_tanh_slope(xv) : gelu_erf_slope(xv));
}

#if LANES == 16
/* With AVX-512 a bfloat16 GELU looks its values up: a bfloat16 input has 65,536 possible values,
   so each form's result (rounded) and slope (float32) are tabulated once, by the formulas above,
   and a pass gathers 16 at a time (the table entries a layer's inputs touch stay in L1): the same
   values as the formulas give, at about the memory's speed rather than theirs. */
static uint16_t gelu_values[2][65536 + 2]; /* + 2: a 32-bit gather at the last entry reads past it */
static float gelu_slopes[2][65536];
static int gelu_tabled = 0;

/* Fill the tables (section 6's formulas, every bfloat16 bit pattern); called once when the
   library is loaded, before any pass reads them. */
void gelu_tables(void) {
    for (int form = 0; form < 2; form++)
        for (long u = 0; u < 65536; u += LANES) {
            uint16_t x[LANES];
            for (int l = 0; l < LANES; l++) x[l] = (uint16_t)(u + l);
            store_bf16(gelu_values[form] + u, gelu_bf16(x, form));
            vstore(gelu_slopes[form] + u, form ? gelu_tanh_slope(load_bf16(x)) : gelu_erf_slope(load_bf16(x)));
        }
    gelu_tabled = 1;
}

static inline __m512i bf16_index(const uint16_t *x) { return _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)); }
#else
void gelu_tables(void) {}
#endif

/* y = GELU(x) over n bfloat16 values, the tanh form if tanh_form, else the erf form. */
void gelu_bf16_forward(const uint16_t *x, uint16_t *y, long n, int tanh_form, int threads) {
    const long vectors = n / LANES, rest = n % LANES;
#if LANES == 16
    if (gelu_tabled) {
        const uint16_t *table = gelu_values[tanh_form != 0];
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
        for (long v = 0; v < vectors; v++)
            _mm256_storeu_si256((__m256i *)(y + 16 * v),
                                _mm512_cvtepi32_epi16(_mm512_i32gather_epi32(bf16_index(x + 16 * v), (const void *)table, 2)));
        for (long i = n - rest; i < n; i++) y[i] = table[x[i]];
        return;
    }
#endif
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long v = 0; v < vectors; v++) store_bf16(y + LANES * v, gelu_bf16(x + LANES * v, tanh_form));
    if (rest) { /* the last n % LANES values through the same formulas, from a zero-padded copy */
        uint16_t in[LANES] = {0}, out[LANES];
        memcpy(in, x + LANES * vectors, rest * sizeof *in);
        store_bf16(out, gelu_bf16(in, tanh_form));
        memcpy(y + LANES * vectors, out, rest * sizeof *out);
    }
}

/* dx = dy * GELU'(x) over n bfloat16 values. */
void gelu_bf16_backward(const uint16_t *dy, const uint16_t *x, uint16_t *dx, long n, int tanh_form, int threads) {
    const long vectors = n / LANES, rest = n % LANES;
#if LANES == 16
    if (gelu_tabled) {
        const float *table = gelu_slopes[tanh_form != 0];
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
        for (long v = 0; v < vectors; v++)
            store_bf16(dx + 16 * v, vmul(load_bf16(dy + 16 * v), _mm512_i32gather_ps(bf16_index(x + 16 * v), table, 4)));
        if (rest) {
            uint16_t g[LANES] = {0}, in[LANES] = {0}, out[LANES];
            memcpy(g, dy + LANES * vectors, rest * sizeof *g);
            memcpy(in, x + LANES * vectors, rest * sizeof *in);
            store_bf16(out, vmul(load_bf16(g), _mm512_i32gather_ps(bf16_index(in), table, 4)));
            memcpy(dx + LANES * vectors, out, rest * sizeof *out);
        }
        return;
    }
#endif
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long v = 0; v < vectors; v++) store_bf16(dx + LANES * v, gelu_bf16_grad(dy + LANES * v, x + LANES * v, tanh_form));
    if (rest) {
        uint16_t g[LANES] = {0}, in[LANES] = {0}, out[LANES];
        memcpy(g, dy + LANES * vectors, rest * sizeof *g);
        memcpy(in, x + LANES * vectors, rest * sizeof *in);
        store_bf16(out, gelu_bf16_grad(g, in, tanh_form));
        memcpy(dx + LANES * vectors, out, rest * sizeof *out);
    }
}

/* 6b. LayerNorm for training (lmforge.kernels.norm), optionally with the residual sum before it
   (s = x + h, the pre-norm block's "add & norm"): float32 rows in, the normalized rows written in
   float32 or in bfloat16 for the projection that reads them under autocast (which would write
   float32 and cast it in a second pass), and back in one pass a row: the gradient read in either
   dtype, dx in float32 for the residual stream with the residual sum's own gradient ds added, and
   for a bfloat16 branch h its gradient rounded to bfloat16 in the same pass (autograd would add
   the two gradients in one pass and cast in another). Per row, in float32:
       s = x (+ h), mean, var = the row's (two passes, in cache), rstd = 1 / sqrt(var + eps),
       shat = (s - mean) rstd, y = shat w + b;
       g = dy w, dx = (ds +) rstd (g - mean(g) - shat mean(g shat)), dw += dy shat, db += dy. */
static inline float row_mean(const float *x, long n) { /* n a multiple of LANES */
    vec sums = vset(0.0f);
    for (long i = 0; i < n; i += LANES) sums = vadd(sums, vload(x + i));
    return vhsum(sums) / (float)n;
}

static inline float row_variance(const float *x, long n, float mean) {
    const vec m = vset(mean);
    vec sums = vset(0.0f);
    for (long i = 0; i < n; i += LANES) {
        const vec d = vsub(vload(x + i), m);
        sums = vfmadd(d, d, sums);
    }
    return vhsum(sums) / (float)n;
}

/* LANES values of a row held as float32 (half 0) or bfloat16 (half 1). */
static inline vec load_as(const void *p, int half, long i) {
    return half ? load_bf16((const uint16_t *)p + i) : vload((const float *)p + i);
}

static inline void store_as(void *p, int half, long i, vec v) {
    if (half)
        store_bf16((uint16_t *)p + i, v);
    else
        vstore((float *)p + i, v);
}

/* y (rows x dim, float32 or bfloat16: y_half) = LayerNorm(s) with weight w and bias b (either may
   be NULL), where s = x + h (+ hb, the bias of the projection that gave h, when not NULL) written to
   `sum` when h is given (float32 or bfloat16: h_half), else s = x (sum unused); mean and rstd
   (rows) kept for the backward pass. dim a multiple of LANES. */
void layer_norm_forward(const float *x, const void *h, int h_half, const float *hb, const float *w, const float *b,
                        float *sum, void *y, int y_half, float *mean, float *rstd, long rows, long dim, float eps,
                        int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long r = 0; r < rows; r++) {
        const float *sr = x + r * dim;
        if (h != NULL) {
            float *out = sum + r * dim;
            const char *hr = (const char *)h + (size_t)(r * dim) * (h_half ? 2 : 4);
            for (long i = 0; i < dim; i += LANES) {
                const vec v = vadd(vload(sr + i), load_as(hr, h_half, i));
                vstore(out + i, hb != NULL ? vadd(v, vload(hb + i)) : v);
            }
            sr = out;
        }
        const float mu = row_mean(sr, dim), sd = 1.0f / sqrtf(row_variance(sr, dim, mu) + eps);
        mean[r] = mu, rstd[r] = sd;
        const vec m = vset(mu), sv = vset(sd);
        char *yr = (char *)y + (size_t)(r * dim) * (y_half ? 2 : 4);
        for (long i = 0; i < dim; i += LANES) {
            vec v = vmul(vsub(vload(sr + i), m), sv);
            if (w != NULL) v = vmul(v, vload(w + i));
            if (b != NULL) v = vadd(v, vload(b + i));
            store_as(yr, y_half, i, v);
        }
    }
}

/* dx (rows x dim, float32) from dy (float32 or bfloat16: dy_half) and the forward pass's s (its
   input, or the residual sum), w, mean, rstd, plus ds (the sum's own gradient) when given; dh, when
   given, gets dx again in bfloat16. dw, db and dhb (dim, any may be NULL) get the sums over the
   rows added (each thread's own sums first): the norm's weight and bias gradients, and dx's
   column sums (the gradient of the bias hb added into s). dim a multiple of LANES. Returns -1
   when memory ran out. */
int layer_norm_backward(const void *dy, int dy_half, const float *ds, const float *s, const float *w,
                        const float *mean, const float *rstd, float *dx, uint16_t *dh, float *dw, float *db,
                        float *dhb, long rows, long dim, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    float *own = calloc((size_t)(3 * dim), sizeof(float)); /* this thread's sums for dw, db, dhb */
    if (own == NULL) failed = 1;
#pragma omp for schedule(static)
    for (long r = 0; r < rows; r++) {
        if (own == NULL) continue;
        const float *sr = s + r * dim;
        const char *dr = (const char *)dy + (size_t)(r * dim) * (dy_half ? 2 : 4);
        const vec m = vset(mean[r]), sv = vset(rstd[r]);
        vec sums_g = vset(0.0f), sums_gx = vset(0.0f);
        for (long i = 0; i < dim; i += LANES) {
            const vec d = load_as(dr, dy_half, i), shat = vmul(vsub(vload(sr + i), m), sv);
            const vec g = w != NULL ? vmul(d, vload(w + i)) : d;
            sums_g = vadd(sums_g, g), sums_gx = vfmadd(g, shat, sums_gx);
            vstore(own + i, vfmadd(d, shat, vload(own + i)));
            vstore(own + dim + i, vadd(d, vload(own + dim + i)));
        }
        const vec mg = vset(vhsum(sums_g) / (float)dim), mgx = vset(vhsum(sums_gx) / (float)dim);
        float *out = dx + r * dim;
        for (long i = 0; i < dim; i += LANES) {
            const vec d = load_as(dr, dy_half, i), shat = vmul(vsub(vload(sr + i), m), sv);
            const vec g = w != NULL ? vmul(d, vload(w + i)) : d;
            vec v = vmul(sv, vsub(vsub(g, mg), vmul(shat, mgx)));
            if (ds != NULL) v = vadd(v, vload(ds + r * dim + i));
            vstore(out + i, v);
            if (dhb != NULL) vstore(own + 2 * dim + i, vadd(v, vload(own + 2 * dim + i)));
            if (dh != NULL) store_bf16(dh + r * dim + i, v);
        }
    }
    if (own != NULL) {
#pragma omp critical
        for (long i = 0; i < dim; i++) {
            if (dw != NULL) dw[i] += own[i];
            if (db != NULL) db[i] += own[dim + i];
            if (dhb != NULL) dhb[i] += own[2 * dim + i];
        }
    }
    free(own);
  }
    return failed ? -1 : 0;
}

#if LANES == 16
/* 16 x 16 32-bit values in 16 registers transposed: four rounds, each pairing registers i and
   i + b and swapping their lane blocks of b (b = 1, 2, 4, 8). */
static inline void transpose_block(__m512i v[16]) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#pragma GCC unroll 4
    for (int b = 1; b < 16; b *= 2) {
        const __mmask16 upper = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(b)); /* lanes with bit b */
        const __m512i low = _mm512_mask_add_epi32(lane, upper, lane, _mm512_set1_epi32(16 - b));
        const __m512i high = _mm512_mask_add_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(b)), upper, lane, _mm512_set1_epi32(16));
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++)
            if (!(i & b)) {
                const __m512i x = v[i], y = v[i | b];
                v[i] = _mm512_permutex2var_epi32(x, low, y);
                v[i | b] = _mm512_permutex2var_epi32(x, high, y);
            }
    }
}

/* dst[c][r] = src[r][c] for 32-bit values, r < rows and c < cols both multiples of 16 (row
   strides lds, ldd). */
static void transpose_words(const uint32_t *src, long rows, long cols, long lds, uint32_t *dst, long ldd) {
    for (long r0 = 0; r0 < rows; r0 += 16)
        for (long c0 = 0; c0 < cols; c0 += 16) {
            __m512i v[16];
            for (int i = 0; i < 16; i++) v[i] = _mm512_loadu_si512(src + (r0 + i) * lds + c0);
            transpose_block(v);
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(dst + (c0 + i) * ldd + r0, v[i]);
        }
}
#endif

/* 7. Causal self-attention over whole sequences, forward and backward, for training
   (lmforge.kernels.causal). The input is the fused projection qkv (B, T, (H + 2 Hkv) D), row t of
   sequence b holding every head's query, then the Hkv keys, then the Hkv values; query head h
   reads key/value head h / (H / Hkv). The output is (B, T, H D), the heads joined as the output
   projection reads them, and the backward pass writes the gradient of qkv in qkv's own layout.

   Per sequence and key/value head (one task; threads take tasks), per query head, per block of 6
   query rows: the scores of the block against keys 0 .. i (register tiles of 6 rows by 16 keys),
   the causal softmax of each row (its log-sum-exp kept for the backward pass), then the block's
   output rows as the weighted sums of value rows (tiles of 6 rows by 16 dimensions). Everything a
   head touches (T x T scores at most) stays in this core's caches for the lengths it is used for.

   Backward, with P recomputed from the scores and the kept log-sum-exp (s = scale q . k):
       dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),
       dQ = scale dS K,  dK = dS^T (scale Q),  dV = P^T dO
   dK and dV summed over the query heads that share a key/value head. With rotary positions, Q and
   K are rotated as they are read, and dQ and dK turned back by the rotation's transpose. */
#define KEYS 16 /* keys per score tile */
#define QROWS 6 /* query rows per block */

static inline long round_up(long n, long m) { return (n + m - 1) / m * m; }

/* Row stride of the score buffers: T rounded up to a tile, plus one tile so that a column walked
   down the rows does not fall into a handful of cache sets (a stride of a power of two, 1 KB at
   T = 256, spreads 64 rows over 4 of L1's 64 sets). */
static inline long score_stride(long T) { return round_up(T, KEYS) + KEYS; }

/* s[r][0 .. 16) = sum_d x[r][d] panel[d][0 .. 16) for the 6 rows r of x (row stride D): one tile
   of scores, s row stride lds; the panel holds 16 keys' D values, key fastest. Twelve
   accumulators, two loads and a broadcast: the 16 vector registers (6 x 16 runs at about 60
   GFLOP/s on one core here where 4 x 16 ran at 45). */
static inline void scores_6x16(const float *x, long D, const float *panel, float *s, long lds) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
    __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    for (long d = 0; d < D; d++) {
        const __m256 y0 = _mm256_loadu_ps(panel + d * KEYS), y1 = _mm256_loadu_ps(panel + d * KEYS + 8);
        __m256 w = _mm256_broadcast_ss(x + d);
        a00 = _mm256_fmadd_ps(w, y0, a00), a01 = _mm256_fmadd_ps(w, y1, a01);
        w = _mm256_broadcast_ss(x + D + d);
        a10 = _mm256_fmadd_ps(w, y0, a10), a11 = _mm256_fmadd_ps(w, y1, a11);
        w = _mm256_broadcast_ss(x + 2 * D + d);
        a20 = _mm256_fmadd_ps(w, y0, a20), a21 = _mm256_fmadd_ps(w, y1, a21);
        w = _mm256_broadcast_ss(x + 3 * D + d);
        a30 = _mm256_fmadd_ps(w, y0, a30), a31 = _mm256_fmadd_ps(w, y1, a31);
        w = _mm256_broadcast_ss(x + 4 * D + d);
        a40 = _mm256_fmadd_ps(w, y0, a40), a41 = _mm256_fmadd_ps(w, y1, a41);
        w = _mm256_broadcast_ss(x + 5 * D + d);
        a50 = _mm256_fmadd_ps(w, y0, a50), a51 = _mm256_fmadd_ps(w, y1, a51);
    }
    _mm256_storeu_ps(s, a00), _mm256_storeu_ps(s + 8, a01);
    _mm256_storeu_ps(s + lds, a10), _mm256_storeu_ps(s + lds + 8, a11);
    _mm256_storeu_ps(s + 2 * lds, a20), _mm256_storeu_ps(s + 2 * lds + 8, a21);
    _mm256_storeu_ps(s + 3 * lds, a30), _mm256_storeu_ps(s + 3 * lds + 8, a31);
    _mm256_storeu_ps(s + 4 * lds, a40), _mm256_storeu_ps(s + 4 * lds + 8, a41);
    _mm256_storeu_ps(s + 5 * lds, a50), _mm256_storeu_ps(s + 5 * lds + 8, a51);
}

static inline void put8(float *o, __m256 v, __m256 alpha, int add) {
    v = _mm256_mul_ps(v, alpha);
    _mm256_storeu_ps(o, add ? _mm256_add_ps(v, _mm256_loadu_ps(o)) : v);
}

#if LANES == 16
static inline void put16(float *o, __m512 v, __m512 alpha, int add) {
    v = _mm512_mul_ps(v, alpha);
    _mm512_storeu_ps(o, add ? _mm512_add_ps(v, _mm512_loadu_ps(o)) : v);
}
#endif

/* For the 6 rows r of a (element (r, j) at a[r ar + j aj]) and every d < D (a multiple of 8):
   out[r][d] (+)= alpha sum_{lo <= j < hi} a(r, j) b[j][d]  (b row stride ldb, out row stride ldo),
   added to out when add, else stored; only the first `rows` rows are written. 32 columns of d at a
   time with AVX-512, then 16 (12 accumulators either way), then 8 for what is left. */
static void weighted_rows(const float *a, long ar, long aj, const float *b, long ldb, long lo, long hi, long D,
                          float alpha, float *out, long ldo, long rows, int add) {
    const __m256 scale = _mm256_set1_ps(alpha);
    long d0 = 0;
#if LANES == 16
    const __m512 wide = _mm512_set1_ps(alpha);
    for (; d0 + 32 <= D; d0 += 32) { /* AVX-512: 32 columns (twelve accumulators) */
        __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
        __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
        for (long j = lo; j < hi; j++) {
            const float *bj = b + j * ldb + d0, *w = a + j * aj;
            const __m512 b0 = _mm512_loadu_ps(bj), b1 = _mm512_loadu_ps(bj + 16);
            __m512 v = _mm512_set1_ps(w[0]);
            c00 = _mm512_fmadd_ps(v, b0, c00), c01 = _mm512_fmadd_ps(v, b1, c01);
            v = _mm512_set1_ps(w[ar]);
            c10 = _mm512_fmadd_ps(v, b0, c10), c11 = _mm512_fmadd_ps(v, b1, c11);
            v = _mm512_set1_ps(w[2 * ar]);
            c20 = _mm512_fmadd_ps(v, b0, c20), c21 = _mm512_fmadd_ps(v, b1, c21);
            v = _mm512_set1_ps(w[3 * ar]);
            c30 = _mm512_fmadd_ps(v, b0, c30), c31 = _mm512_fmadd_ps(v, b1, c31);
            v = _mm512_set1_ps(w[4 * ar]);
            c40 = _mm512_fmadd_ps(v, b0, c40), c41 = _mm512_fmadd_ps(v, b1, c41);
            v = _mm512_set1_ps(w[5 * ar]);
            c50 = _mm512_fmadd_ps(v, b0, c50), c51 = _mm512_fmadd_ps(v, b1, c51);
        }
        float *o = out + d0;
        put16(o, c00, wide, add), put16(o + 16, c01, wide, add);
        if (rows > 1) put16(o + ldo, c10, wide, add), put16(o + ldo + 16, c11, wide, add);
        if (rows > 2) put16(o + 2 * ldo, c20, wide, add), put16(o + 2 * ldo + 16, c21, wide, add);
        if (rows > 3) put16(o + 3 * ldo, c30, wide, add), put16(o + 3 * ldo + 16, c31, wide, add);
        if (rows > 4) put16(o + 4 * ldo, c40, wide, add), put16(o + 4 * ldo + 16, c41, wide, add);
        if (rows > 5) put16(o + 5 * ldo, c50, wide, add), put16(o + 5 * ldo + 16, c51, wide, add);
    }
#endif
    for (; d0 + 16 <= D; d0 += 16) {
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
        __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
        for (long j = lo; j < hi; j++) {
            const float *bj = b + j * ldb + d0, *w = a + j * aj;
            const __m256 b0 = _mm256_loadu_ps(bj), b1 = _mm256_loadu_ps(bj + 8);
            __m256 v = _mm256_broadcast_ss(w);
            c00 = _mm256_fmadd_ps(v, b0, c00), c01 = _mm256_fmadd_ps(v, b1, c01);
            v = _mm256_broadcast_ss(w + ar);
            c10 = _mm256_fmadd_ps(v, b0, c10), c11 = _mm256_fmadd_ps(v, b1, c11);
            v = _mm256_broadcast_ss(w + 2 * ar);
            c20 = _mm256_fmadd_ps(v, b0, c20), c21 = _mm256_fmadd_ps(v, b1, c21);
            v = _mm256_broadcast_ss(w + 3 * ar);
            c30 = _mm256_fmadd_ps(v, b0, c30), c31 = _mm256_fmadd_ps(v, b1, c31);
            v = _mm256_broadcast_ss(w + 4 * ar);
            c40 = _mm256_fmadd_ps(v, b0, c40), c41 = _mm256_fmadd_ps(v, b1, c41);
            v = _mm256_broadcast_ss(w + 5 * ar);
            c50 = _mm256_fmadd_ps(v, b0, c50), c51 = _mm256_fmadd_ps(v, b1, c51);
        }
        float *o = out + d0;
        put8(o, c00, scale, add), put8(o + 8, c01, scale, add);
        if (rows > 1) put8(o + ldo, c10, scale, add), put8(o + ldo + 8, c11, scale, add);
        if (rows > 2) put8(o + 2 * ldo, c20, scale, add), put8(o + 2 * ldo + 8, c21, scale, add);
        if (rows > 3) put8(o + 3 * ldo, c30, scale, add), put8(o + 3 * ldo + 8, c31, scale, add);
        if (rows > 4) put8(o + 4 * ldo, c40, scale, add), put8(o + 4 * ldo + 8, c41, scale, add);
        if (rows > 5) put8(o + 5 * ldo, c50, scale, add), put8(o + 5 * ldo + 8, c51, scale, add);
    }
    if (d0 < D) {
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
        for (long j = lo; j < hi; j++) {
            const float *w = a + j * aj;
            const __m256 b0 = _mm256_loadu_ps(b + j * ldb + d0);
            c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w), b0, c0);
            c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + ar), b0, c1);
            c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + 2 * ar), b0, c2);
            c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + 3 * ar), b0, c3);
            c4 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + 4 * ar), b0, c4);
            c5 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + 5 * ar), b0, c5);
        }
        float *o = out + d0;
        put8(o, c0, scale, add);
        if (rows > 1) put8(o + ldo, c1, scale, add);
        if (rows > 2) put8(o + 2 * ldo, c2, scale, add);
        if (rows > 3) put8(o + 3 * ldo, c3, scale, add);
        if (rows > 4) put8(o + 4 * ldo, c4, scale, add);
        if (rows > 5) put8(o + 5 * ldo, c5, scale, add);
    }
}

/* The T rows of src (row stride lds, D values each) as panels of 16 rows, panel[d][0 .. 16) per
   panel (rows past T zero): what scores_4x16 reads. */
static void panels(const float *src, long lds, long T, long D, float *dst) {
    long j0 = 0;
#if LANES == 16
    if (D % 16 == 0) /* whole panels 16 x 16 at a time in registers */
        for (; j0 + KEYS <= T; j0 += KEYS)
            transpose_words((const uint32_t *)(src + j0 * lds), KEYS, D, lds, (uint32_t *)(dst + j0 * D), KEYS);
#endif
    for (; j0 < T; j0 += KEYS) {
        float *panel = dst + j0 * D;
        for (long d = 0; d < D; d++)
            for (long t = 0; t < KEYS; t++) panel[d * KEYS + t] = j0 + t < T ? src[(j0 + t) * lds + d] : 0.0f;
    }
}

/* dst[t][d] = alpha src[t][d] for t < T (src row stride lds), zero rows T <= t < rows. */
static void copy_rows(const float *src, long lds, long T, long rows, long D, float alpha, float *dst) {
    for (long t = 0; t < T; t++)
        for (long d = 0; d < D; d++) dst[t * D + d] = alpha * src[t * lds + d];
    memset(dst + T * D, 0, sizeof(float) * (size_t)((rows - T) * D));
}

/* Rotate rows t < T of x (row stride D) by their positions' angles (section 4's rotate; angles
   R values a position). */
static void rotate_rows(float *x, long T, long D, const float *cos, const float *sin, long R) {
    for (long t = 0; t < T; t++) rotate(x + t * D, cos + t * R, sin + t * R, R);
}

/* g, a gradient with respect to a rotated head, brought back to the head before rotate (rotate's
   transpose). */
static void rotate_back(float *g, const float *cos, const float *sin, long R) {
    const long half = R / 2;
    for (long i = 0; i < half; i++) {
        const float g1 = g[i], g2 = g[i + half];
        g[i] = g1 * cos[i] + g2 * sin[i + half];
        g[i + half] = g2 * cos[i + half] - g1 * sin[i];
    }
}

#if LANES == 16
/* scores_6x16 for two adjacent panels (32 keys) with AVX-512: a row's 16 keys in one register,
   twelve accumulators as above. */
static inline void scores_6x32(const float *x, long D, const float *panel, float *s, long lds) {
    const float *next = panel + KEYS * D;
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
    __m512 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
    for (long d = 0; d < D; d++) {
        const __m512 y0 = _mm512_loadu_ps(panel + d * KEYS), y1 = _mm512_loadu_ps(next + d * KEYS);
        __m512 w = _mm512_set1_ps(x[d]);
        a00 = _mm512_fmadd_ps(w, y0, a00), a01 = _mm512_fmadd_ps(w, y1, a01);
        w = _mm512_set1_ps(x[D + d]);
        a10 = _mm512_fmadd_ps(w, y0, a10), a11 = _mm512_fmadd_ps(w, y1, a11);
        w = _mm512_set1_ps(x[2 * D + d]);
        a20 = _mm512_fmadd_ps(w, y0, a20), a21 = _mm512_fmadd_ps(w, y1, a21);
        w = _mm512_set1_ps(x[3 * D + d]);
        a30 = _mm512_fmadd_ps(w, y0, a30), a31 = _mm512_fmadd_ps(w, y1, a31);
        w = _mm512_set1_ps(x[4 * D + d]);
        a40 = _mm512_fmadd_ps(w, y0, a40), a41 = _mm512_fmadd_ps(w, y1, a41);
        w = _mm512_set1_ps(x[5 * D + d]);
        a50 = _mm512_fmadd_ps(w, y0, a50), a51 = _mm512_fmadd_ps(w, y1, a51);
    }
    _mm512_storeu_ps(s, a00), _mm512_storeu_ps(s + 16, a01);
    _mm512_storeu_ps(s + lds, a10), _mm512_storeu_ps(s + lds + 16, a11);
    _mm512_storeu_ps(s + 2 * lds, a20), _mm512_storeu_ps(s + 2 * lds + 16, a21);
    _mm512_storeu_ps(s + 3 * lds, a30), _mm512_storeu_ps(s + 3 * lds + 16, a31);
    _mm512_storeu_ps(s + 4 * lds, a40), _mm512_storeu_ps(s + 4 * lds + 16, a41);
    _mm512_storeu_ps(s + 5 * lds, a50), _mm512_storeu_ps(s + 5 * lds + 16, a51);
}
#endif

/* The scores of query rows i0 .. i0+5 against keys 0 .. hi (tiles of 16 keys, two at a time with
   AVX-512 while the second holds a key needed; s row stride ldt, which has room for it). */
static void score_block(const float *x, long D, const float *keys, long i0, long hi, float *s, long ldt) {
    long j0 = 0;
#if LANES == 16
    for (; j0 + KEYS < hi; j0 += 2 * KEYS) scores_6x32(x + i0 * D, D, keys + j0 * D, s + i0 * ldt + j0, ldt);
#endif
    for (; j0 < hi; j0 += KEYS) scores_6x16(x + i0 * D, D, keys + j0 * D, s + i0 * ldt + j0, ldt);
}

/* out (B, T, H D) and lse (B, H, T) of causal attention over qkv, queries and keys rotated first
   when R > 0 (the angles of sequence b, position t at cos/sin + b rope_stride + t R: a stride of 0
   shares one table); returns -1 when memory ran out. */
int causal_attention_forward(const float *qkv, long B, long T, long H, long Hkv, long D, float scale,
                             const float *cos, const float *sin, long R, long rope_stride,
                             float *out, float *lse, int threads) {
    const long W = (H + 2 * Hkv) * D, group = H / Hkv, rows = round_up(T, QROWS), ldt = score_stride(T);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const unsigned int mode = flush_denormals();
    float *buffer = malloc(sizeof(float) * (size_t)(2 * rows * D + D * round_up(T, KEYS) + rows * ldt)); /* each thread's */
    if (buffer == NULL) failed = 1;
#pragma omp for schedule(dynamic)
    for (long task = 0; task < B * Hkv; task++) {
        if (buffer == NULL) continue;
        const long b = task / Hkv, g = task % Hkv;
        float *qs = buffer, *keys = qs + rows * D, *kt = keys + rows * D;
        float *s = kt + D * round_up(T, KEYS);
        const float *base = qkv + b * T * W, *c = R > 0 ? cos + b * rope_stride : NULL, *n = R > 0 ? sin + b * rope_stride : NULL;
        if (R > 0) { /* rotated keys, then their panels */
            copy_rows(base + (H + g) * D, W, T, rows, D, 1.0f, keys);
            rotate_rows(keys, T, D, c, n, R);
            panels(keys, D, T, D, kt);
        } else {
            panels(base + (H + g) * D, W, T, D, kt);
        }
        const float *values = base + (H + Hkv + g) * D; /* read in place, row stride W */
        for (long h = g * group; h < (g + 1) * group; h++) {
            copy_rows(base + h * D, W, T, rows, D, scale, qs);
            if (R > 0) rotate_rows(qs, T, D, c, n, R);
            float *head_lse = lse + (b * H + h) * T;
            for (long i0 = 0; i0 < T; i0 += QROWS) {
                const long hi = i0 + QROWS < T ? i0 + QROWS : T;
                score_block(qs, D, kt, i0, hi, s, ldt);
                for (long i = i0; i < i0 + QROWS; i++) {
                    float *row = s + i * ldt;
                    if (i >= T) {
                        memset(row, 0, sizeof(float) * (size_t)hi);
                        continue;
                    }
                    /* whole vectors over keys 0 .. i; in the last one the lanes past i (scores
                       the tiles computed for later keys) are left out, then zeroed */
                    long j = 0;
                    const long full = (i + 1) / LANES * LANES;
                    const vmask last = vbelow(i + 1 - full);
                    vec tops = vset(row[0]);
                    for (; j < full; j += LANES) tops = vmax(tops, vload(row + j));
                    if (full <= i) tops = vmax(tops, vpick(last, tops, vload(row + full)));
                    const float top = vhmax(tops);
                    const vec shift = vset(top);
                    vec sums = vset(0.0f);
                    for (j = 0; j < full; j += LANES) {
                        const vec e = exp_nonpositive(vsub(vload(row + j), shift));
                        vstore(row + j, e);
                        sums = vadd(sums, e);
                    }
                    if (full <= i) {
                        const vec e = vzero_unless(exp_nonpositive(vsub(vload(row + full), shift)), last);
                        vstore(row + full, e);
                        sums = vadd(sums, e);
                        j += LANES;
                    }
                    const float sum = vhsum(sums);
                    const vec inverse = vset(1.0f / sum);
                    for (long k = 0; k < j; k += LANES) vstore(row + k, vmul(vload(row + k), inverse));
                    for (; j < hi; j++) row[j] = 0.0f;
                    head_lse[i] = top + logf(sum);
                }
                weighted_rows(s + i0 * ldt, ldt, 1, values, W, 0, hi, D, 1.0f, out + (b * T + i0) * H * D + h * D,
                              H * D, hi - i0, 0);
            }
        }
    }
    free(buffer);
    _mm_setcsr(mode);
  }
    return failed ? -1 : 0;
}

/* dqkv (B, T, (H + 2 Hkv) D), every element written, from the forward pass's qkv, angles, out and
   lse and the output's gradient dout (B, T, H D); returns -1 when memory ran out. */
int causal_attention_backward(const float *qkv, const float *out, const float *dout, const float *lse, long B,
                              long T, long H, long Hkv, long D, float scale, const float *cos, const float *sin,
                              long R, long rope_stride, float *dqkv, int threads) {
    const long W = (H + 2 * Hkv) * D, group = H / Hkv, rows = round_up(T, QROWS), ldt = score_stride(T);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const unsigned int mode = flush_denormals();
    float *buffer = malloc(sizeof(float) * (size_t)(3 * rows * D + 2 * D * round_up(T, KEYS) + 2 * rows * ldt + rows)); /* each thread's */
    if (buffer == NULL) failed = 1;
#pragma omp for schedule(dynamic)
    for (long task = 0; task < B * Hkv; task++) {
        if (buffer == NULL) continue;
        const long b = task / Hkv, g = task % Hkv;
        float *qs = buffer, *gs = qs + rows * D, *keys = gs + rows * D;
        float *kt = keys + rows * D, *vt = kt + D * round_up(T, KEYS), *p = vt + D * round_up(T, KEYS);
        float *ds = p + rows * ldt, *dot = ds + rows * ldt;
        const float *base = qkv + b * T * W, *c = R > 0 ? cos + b * rope_stride : NULL, *n = R > 0 ? sin + b * rope_stride : NULL;
        /* the gradients go straight into dqkv's rows (stride W): dq per query head, dk and dv
           summed over the group's query heads */
        float *dbase = dqkv + b * T * W, *dk = dbase + (H + g) * D, *dv = dbase + (H + Hkv + g) * D;
        copy_rows(base + (H + g) * D, W, T, rows, D, 1.0f, keys);
        if (R > 0) rotate_rows(keys, T, D, c, n, R);
        panels(keys, D, T, D, kt);
        panels(base + (H + Hkv + g) * D, W, T, D, vt);
        for (long h = g * group; h < (g + 1) * group; h++) {
            const float *head_lse = lse + (b * H + h) * T, *o = out + b * T * H * D + h * D;
            copy_rows(base + h * D, W, T, rows, D, scale, qs);
            if (R > 0) rotate_rows(qs, T, D, c, n, R);
            copy_rows(dout + b * T * H * D + h * D, H * D, T, rows, D, 1.0f, gs);
            for (long i = 0; i < T; i++) {
                __m256 sum = _mm256_setzero_ps();
                for (long d = 0; d < D; d += 8)
                    sum = _mm256_fmadd_ps(_mm256_loadu_ps(gs + i * D + d), _mm256_loadu_ps(o + i * H * D + d), sum);
                dot[i] = hsum(sum);
            }
            for (long i0 = 0; i0 < T; i0 += QROWS) {
                const long hi = i0 + QROWS < T ? i0 + QROWS : T;
                score_block(qs, D, kt, i0, hi, p, ldt);
                score_block(gs, D, vt, i0, hi, ds, ldt);
                for (long i = i0; i < i0 + QROWS; i++) {
                    float *prow = p + i * ldt, *drow = ds + i * ldt;
                    if (i >= T) {
                        memset(prow, 0, sizeof(float) * (size_t)hi), memset(drow, 0, sizeof(float) * (size_t)hi);
                        continue;
                    }
                    const vec shift = vset(head_lse[i]), di = vset(dot[i]);
                    const long full = (i + 1) / LANES * LANES;
                    long j = 0;
                    for (; j < full; j += LANES) {
                        const vec pv = exp_nonpositive(vsub(vload(prow + j), shift));
                        vstore(prow + j, pv);
                        vstore(drow + j, vmul(pv, vsub(vload(drow + j), di)));
                    }
                    if (full <= i) { /* the last vector's lanes past i zeroed, as in the forward pass */
                        const vmask last = vbelow(i + 1 - full);
                        const vec pv = vzero_unless(exp_nonpositive(vsub(vload(prow + j), shift)), last);
                        vstore(prow + j, pv);
                        vstore(drow + j, vzero_unless(vmul(pv, vsub(vload(drow + j), di)), last));
                        j += LANES;
                    }
                    for (; j < hi; j++) prow[j] = drow[j] = 0.0f;
                }
                float *dq = dbase + h * D;
                weighted_rows(ds + i0 * ldt, ldt, 1, keys, D, 0, hi, D, scale, dq + i0 * W, W, hi - i0, 0);
                if (R > 0)
                    for (long i = i0; i < hi; i++) rotate_back(dq + i * W, c + i * R, n + i * R, R);
            }
            for (long j0 = 0; j0 < T; j0 += QROWS) {
                const long count = j0 + QROWS < T ? QROWS : T - j0;
                weighted_rows(ds + j0, 1, ldt, qs, D, j0, T, D, 1.0f, dk + j0 * W, W, count, h > g * group);
                weighted_rows(p + j0, 1, ldt, gs, D, j0, T, D, 1.0f, dv + j0 * W, W, count, h > g * group);
            }
        }
        if (R > 0)
            for (long t = 0; t < T; t++) rotate_back(dk + t * W, c + t * R, n + t * R, R);
    }
    free(buffer);
    _mm_setcsr(mode);
  }
    return failed ? -1 : 0;
}

/* 8. Causal self-attention in bfloat16 on AMX tiles (Intel's matrix units), forward and backward:
   section 7's computation for autocast's bfloat16 projection where the CPU has AMX. The products
   (Q K^T, P V, dO V^T, dS K, Q^T dS, dO^T P) run on the tiles in bfloat16 with float32 sums; the
   scores, softmax and log-sum-exp stay float32 between them, and P and dS are rounded to bfloat16
   for the products that take them, as GPU flash attention does.

   A tile product C (16 x 16 float32) += A (16 x 32 bfloat16, row-major) B, where B (32 x 16) is
   stored as 16 rows of 16 pairs: pair (k, n) holds B[2k][n] and B[2k+1][n] side by side (VNNI).
   Every operand is first copied into such a layout, padded with zeros to T and D rounded up to 32
   (Tp, Dp): the copies cost T x D a head, the products T x T x D. The layouts, as 32-bit pairs:
       kb[p][j]  = (K[j][2p], K[j][2p+1])      K^T for Q K^T (and V^T for dO V^T)
       vb[jp][d] = (V[2jp][d], V[2jp+1][d])    V for P V (and K for dS K)
       pb[ip][j] = (P[2ip][j], P[2ip+1][j])    P and dS for dO^T P and Q^T dS
   Blocks of 16 query rows: their scores against keys 0 .. nk (the block's last row rounded up to
   32), the softmax of each row over keys 0 .. i, the rows' products. dK and dV come out transposed
   (D x T, summed over the query heads of a key/value head) and are turned as they are written. */
#if LANES == 16 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes[16]; /* per row of each tile */
    uint8_t rows[16];
} TileConfig;

/* Every tile 16 rows of 64 bytes: C (16 float32), A (32 bfloat16), B (16 pairs). A constant in
   memory: GCC does not see that ldtilecfg reads its operand, and may drop the stores that fill a
   local one (a fault at -O1). */
static const TileConfig TILES = {
    .palette = 1, .bytes = {64, 64, 64, 64, 64, 64, 64, 64}, .rows = {16, 16, 16, 16, 16, 16, 16, 16}};

static void tiles_on(void) { _tile_loadconfig(&TILES); }

/* c (16 x 32 float32, row stride ldc) = (c +) sum over `chunks` of 32 columns of a (16 rows, row
   stride lda) times the same rows of pairs of b (16 pair rows a chunk, row stride ldb pairs). */
static inline void tile_16x32(const uint16_t *a, long lda, const uint32_t *b, long ldb, long chunks, float *c,
                              long ldc, int add) {
    if (add) {
        _tile_loadd(0, c, ldc * 4);
        _tile_loadd(1, c + 16, ldc * 4);
    } else {
        _tile_zero(0);
        _tile_zero(1);
    }
    for (long k = 0; k < chunks; k++) {
        _tile_loadd(2, a + k * 32, lda * 2);
        _tile_loadd(3, b + k * 16 * ldb, ldb * 4);
        _tile_loadd(4, b + k * 16 * ldb + 16, ldb * 4);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
    }
    _tile_stored(0, c, ldc * 4);
    _tile_stored(1, c + 16, ldc * 4);
}

static inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); } /* nearest, ties even */

static inline __m512 from_bf16(const uint16_t *x, __mmask16 lanes) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, x)), 16));
}

/* dst (Tp x Dp bfloat16, zero padded) from T rows of D values at src (row stride ld), the first R
   rotated by their positions' angles (R > 0; float32 between). */
static void head_rows(const uint16_t *src, long ld, long T, long D, long Tp, long Dp, const float *cos,
                      const float *sin, long R, uint16_t *dst) {
    float row[Dp];
    for (long t = 0; t < T; t++) {
        uint16_t *out = dst + t * Dp;
        if (R > 0) {
            for (long d = 0; d < D; d += 16) _mm512_storeu_ps(row + d, from_bf16(src + t * ld + d, vbelow(D - d)));
            rotate(row, cos + t * R, sin + t * R, R);
            for (long d = 0; d < D; d += 16)
                _mm256_mask_storeu_epi16(out + d, vbelow(D - d), to_bf16(_mm512_loadu_ps(row + d)));
        } else {
            memcpy(out, src + t * ld, sizeof(uint16_t) * (size_t)D);
        }
        memset(out + D, 0, sizeof(uint16_t) * (size_t)(Dp - D));
    }
    memset(dst + T * Dp, 0, sizeof(uint16_t) * (size_t)((Tp - T) * Dp));
}

/* 16 values of rows t and t + 1 of x (row stride ld; a row at or past `rows` reads as zeros) from
   column d, paired: (x[t][d + l], x[t + 1][d + l]) in lane l. */
static inline __m512i row_pairs(const uint16_t *x, long ld, long t, long rows, long d) {
    const __m256i zero = _mm256_setzero_si256();
    const __m512i lo = _mm512_cvtepu16_epi32(t < rows ? _mm256_loadu_si256((const __m256i *)(x + t * ld + d)) : zero);
    const __m512i hi = _mm512_cvtepu16_epi32(t + 1 < rows ? _mm256_loadu_si256((const __m256i *)(x + (t + 1) * ld + d)) : zero);
    return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
}

/* kb[p][j] = (x[j][2p], x[j][2p+1]) for x (Tp x Dp): K^T's pairs, the 32-bit transpose of x. */
static void pairs_across(const uint16_t *x, long Tp, long Dp, uint32_t *kb) {
    transpose_words((const uint32_t *)x, Tp, Dp / 2, Dp / 2, kb, Tp);
}

/* vb[jp][d] = (x[2jp][d], x[2jp+1][d]) for x (Tp x Dp): pairs of rows side by side. */
static void pairs_down(const uint16_t *x, long Tp, long Dp, uint32_t *vb) {
    for (long jp = 0; jp < Tp / 2; jp++)
        for (long d = 0; d < Dp; d += 16) _mm512_storeu_si512(vb + jp * Dp + d, row_pairs(x, Dp, 2 * jp, Tp, d));
}

/* dst (16 x 32-bit pairs, row stride Tp pairs: rows i0/2 .. of a pair layout) from 16 rows of
   float32 x (row stride Tp) over columns 0 .. nk: rows 2r and 2r+1 rounded and paired. */
static void pair_block(const float *x, long Tp, long nk, uint32_t *dst) {
    for (long r = 0; r < 8; r++)
        for (long j = 0; j < nk; j += 16) {
            const __m512i lo = _mm512_cvtepu16_epi32(to_bf16(_mm512_loadu_ps(x + 2 * r * Tp + j)));
            const __m512i hi = _mm512_cvtepu16_epi32(to_bf16(_mm512_loadu_ps(x + (2 * r + 1) * Tp + j)));
            _mm512_storeu_si512(dst + r * Tp + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
}

/* dst (cols x rows) = src (rows x cols) transposed, bfloat16: blocks of 32 rows by 16 columns as
   pairs of rows turned 16 x 16 in registers, the edges one value at a time. For a linear layer's
   weight gradient (lmforge.kernels.linear: PyTorch's bf16 product runs about 1.7x as fast with its
   narrower operand transposed first, and this turns it at about the memory's speed), and for Q^T
   and dO^T in the attention's backward pass below. */
void transpose_bf16(const uint16_t *src, long rows, long cols, uint16_t *dst, int threads) {
    const long full_rows = rows / 32 * 32, full_cols = cols / 16 * 16;
    /* 256 columns (rows of dst) at a time, so that their pages stay in the TLB while the rows
       of src go by */
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long c1 = 0; c1 < full_cols; c1 += 256)
        for (long r0 = 0; r0 < full_rows; r0 += 32)
            for (long c0 = c1; c0 < c1 + 256 && c0 < full_cols; c0 += 16) {
                __m512i v[16];
                for (int i = 0; i < 16; i++) v[i] = row_pairs(src, cols, r0 + 2 * i, rows, c0);
                transpose_block(v);
                for (int i = 0; i < 16; i++) _mm512_storeu_si512(dst + (c0 + i) * rows + r0, v[i]);
            }
    for (long c = 0; c < cols; c++)
        for (long r = c < full_cols ? full_rows : 0; r < rows; r++) dst[c * rows + r] = src[r * cols + c];
}

/* Whether the tiles may be used here: asks Linux for them (once; 1 when granted). */
int amx_ready(void) {
    static int ready = -1;
    if (ready < 0) ready = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return ready;
}

/* out (B, T, H D) bfloat16 and lse (B, H, T) float32 from qkv (B, T, (H + 2 Hkv) D) bfloat16, as
   section 7's causal_attention_forward; returns -1 when memory ran out. */
int causal_attention_forward_bf16(const uint16_t *qkv, long B, long T, long H, long Hkv, long D, float scale,
                                  const float *cos, const float *sin, long R, long rope_stride, uint16_t *out,
                                  float *lse, int threads) {
    const long W = (H + 2 * Hkv) * D, group = H / Hkv, Tp = round_up(T, 32), Dp = round_up(D, 32);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const unsigned int mode = flush_denormals();
    tiles_on();
    /* q, k, v rows (Tp x Dp each), kb, vb (as many pairs), P (16 x Tp); scores (16 x Tp float32),
       the block's output (16 x Dp float32) */
    uint16_t *buffer = malloc(sizeof(uint16_t) * (size_t)(5 * Tp * Dp + 16 * Tp) + sizeof(float) * (size_t)(16 * (Tp + Dp)));
    if (buffer == NULL) failed = 1;
#pragma omp for schedule(dynamic)
    for (long task = 0; task < B * Hkv; task++) {
        if (buffer == NULL) continue;
        const long b = task / Hkv, g = task % Hkv;
        uint16_t *q = buffer, *k = q + Tp * Dp, *v = k + Tp * Dp, *p = v + 3 * Tp * Dp;
        uint32_t *kb = (uint32_t *)(v + Tp * Dp), *vb = kb + Tp * Dp / 2;
        float *s = (float *)(p + 16 * Tp), *o = s + 16 * Tp;
        const uint16_t *base = qkv + b * T * W;
        const float *c = R > 0 ? cos + b * rope_stride : NULL, *n = R > 0 ? sin + b * rope_stride : NULL;
        head_rows(base + (H + g) * D, W, T, D, Tp, Dp, c, n, R, k);
        pairs_across(k, Tp, Dp, kb);
        head_rows(base + (H + Hkv + g) * D, W, T, D, Tp, Dp, NULL, NULL, 0, v);
        pairs_down(v, Tp, Dp, vb);
        for (long h = g * group; h < (g + 1) * group; h++) {
            head_rows(base + h * D, W, T, D, Tp, Dp, c, n, R, q);
            float *head_lse = lse + (b * H + h) * T;
            for (long i0 = 0; i0 < T; i0 += 16) {
                const long nk = round_up(i0 + 16 < T ? i0 + 16 : T, 32);
                for (long j0 = 0; j0 < nk; j0 += 32) tile_16x32(q + i0 * Dp, Dp, kb + j0, Tp, Dp / 32, s + j0, Tp, 0);
                const __m512 times = _mm512_set1_ps(scale);
                float inverse[16];
                for (long r = 0; r < 16; r++) { /* P unnormalized, e^(s - top), in bfloat16; O divided by the sum below */
                    const long i = i0 + r;
                    const float *row = s + r * Tp;
                    uint16_t *prow = p + r * Tp;
                    if (i >= T) {
                        memset(prow, 0, sizeof(uint16_t) * (size_t)nk);
                        inverse[r] = 0.0f;
                        continue;
                    }
                    __m512 tops = _mm512_set1_ps(-INFINITY);
                    for (long j = 0; j <= i; j += 16)
                        tops = _mm512_mask_max_ps(tops, vbelow(i + 1 - j), tops, _mm512_mul_ps(_mm512_loadu_ps(row + j), times));
                    const float top = _mm512_reduce_max_ps(tops);
                    const __m512 shift = _mm512_set1_ps(top);
                    __m512 sums = _mm512_setzero_ps();
                    long j = 0;
                    for (; j <= i; j += 16) {
                        const __m512 e = _mm512_maskz_mov_ps(vbelow(i + 1 - j),
                                                             exp_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(row + j), times, shift)));
                        _mm256_storeu_si256((__m256i *)(prow + j), to_bf16(e));
                        sums = _mm512_add_ps(sums, e);
                    }
                    memset(prow + j, 0, sizeof(uint16_t) * (size_t)(nk - j));
                    const float sum = _mm512_reduce_add_ps(sums);
                    inverse[r] = 1.0f / sum;
                    head_lse[i] = top + logf(sum);
                }
                for (long d0 = 0; d0 < Dp; d0 += 32) tile_16x32(p, Tp, vb + d0, Dp, nk / 32, o + d0, Dp, 0);
                for (long i = i0; i < i0 + 16 && i < T; i++) {
                    uint16_t *dst = out + (b * T + i) * H * D + h * D;
                    const __m512 norm = _mm512_set1_ps(inverse[i - i0]);
                    for (long d = 0; d < D; d += 16)
                        _mm256_mask_storeu_epi16(dst + d, vbelow(D - d), to_bf16(_mm512_mul_ps(_mm512_loadu_ps(o + (i - i0) * Dp + d), norm)));
                }
            }
        }
    }
    free(buffer);
    _tile_release();
    _mm_setcsr(mode);
  }
    return failed ? -1 : 0;
}

/* dqkv (B, T, (H + 2 Hkv) D) bfloat16, every element written, from the forward pass's qkv, out and
   lse and the output's gradient dout (bfloat16), as section 7's causal_attention_backward; returns
   -1 when memory ran out. */
int causal_attention_backward_bf16(const uint16_t *qkv, const uint16_t *out, const uint16_t *dout, const float *lse,
                                   long B, long T, long H, long Hkv, long D, float scale, const float *cos,
                                   const float *sin, long R, long rope_stride, uint16_t *dqkv, int threads) {
    const long W = (H + 2 * Hkv) * D, group = H / Hkv, Tp = round_up(T, 32), Dp = round_up(D, 32);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    const unsigned int mode = flush_denormals();
    tiles_on();
    /* bfloat16: q, dO, k, v rows, q and dO transposed (Tp x Dp each), the block's dS rows (16 x Tp),
       pairs of K^T, V^T, K (Tp x Dp each), of P and dS (Tp x Tp each); float32: the block's P and
       dP/dS (16 x Tp each), dQ (16 x Dp), dK^T and dV^T (Dp x Tp each), rowsum(dO O) (Tp), either
       turned (Tp x Dp) */
    const size_t halves = (size_t)(9 * Tp * Dp + 16 * Tp + 2 * Tp * Tp);
    const size_t floats = (size_t)(32 * Tp + 16 * Dp + 3 * Dp * Tp + Tp);
    uint16_t *buffer = malloc(sizeof(uint16_t) * halves + sizeof(float) * floats);
    if (buffer == NULL) failed = 1;
#pragma omp for schedule(dynamic)
    for (long task = 0; task < B * Hkv; task++) {
        if (buffer == NULL) continue;
        const long b = task / Hkv, g = task % Hkv;
        uint16_t *q = buffer, *go = q + Tp * Dp, *k = go + Tp * Dp, *v = k + Tp * Dp, *qt = v + Tp * Dp;
        uint16_t *gt = qt + Tp * Dp, *ds = gt + Tp * Dp;
        uint32_t *kb = (uint32_t *)(ds + 16 * Tp), *vt = kb + Tp * Dp / 2, *kk = vt + Tp * Dp / 2;
        uint32_t *pb = kk + Tp * Dp / 2, *sb = pb + Tp * Tp / 2;
        float *s = (float *)(sb + Tp * Tp / 2), *dp = s + 16 * Tp, *dq = dp + 16 * Tp, *dkt = dq + 16 * Dp;
        float *dvt = dkt + Dp * Tp, *delta = dvt + Dp * Tp, *turned = delta + Tp;
        const uint16_t *base = qkv + b * T * W;
        const float *c = R > 0 ? cos + b * rope_stride : NULL, *n = R > 0 ? sin + b * rope_stride : NULL;
        uint16_t *dbase = dqkv + b * T * W;
        head_rows(base + (H + g) * D, W, T, D, Tp, Dp, c, n, R, k);
        head_rows(base + (H + Hkv + g) * D, W, T, D, Tp, Dp, NULL, NULL, 0, v);
        pairs_across(k, Tp, Dp, kb);
        pairs_across(v, Tp, Dp, vt);
        pairs_down(k, Tp, Dp, kk);
        const long filled = round_up(T, 16); /* pair rows past the last block stay zero */
        memset(pb + filled / 2 * Tp, 0, sizeof(uint32_t) * (size_t)((Tp - filled) / 2 * Tp));
        memset(sb + filled / 2 * Tp, 0, sizeof(uint32_t) * (size_t)((Tp - filled) / 2 * Tp));
        for (long h = g * group; h < (g + 1) * group; h++) {
            const float *head_lse = lse + (b * H + h) * T;
            head_rows(base + h * D, W, T, D, Tp, Dp, c, n, R, q);
            head_rows(dout + b * T * H * D + h * D, H * D, T, D, Tp, Dp, NULL, NULL, 0, go);
            transpose_bf16(q, Tp, Dp, qt, 1); /* the rows past T are zeros already */
            transpose_bf16(go, Tp, Dp, gt, 1);
            for (long i = 0; i < T; i++) {
                const uint16_t *o = out + (b * T + i) * H * D + h * D;
                __m512 sum = _mm512_setzero_ps();
                for (long d = 0; d < D; d += 16) {
                    const __mmask16 lanes = vbelow(D - d);
                    sum = _mm512_fmadd_ps(from_bf16(go + i * Dp + d, lanes), from_bf16(o + d, lanes), sum);
                }
                delta[i] = _mm512_reduce_add_ps(sum);
            }
            for (long i0 = 0; i0 < T; i0 += 16) {
                const long nk = round_up(i0 + 16 < T ? i0 + 16 : T, 32);
                for (long j0 = 0; j0 < nk; j0 += 32) {
                    tile_16x32(q + i0 * Dp, Dp, kb + j0, Tp, Dp / 32, s + j0, Tp, 0);
                    tile_16x32(go + i0 * Dp, Dp, vt + j0, Tp, Dp / 32, dp + j0, Tp, 0);
                }
                const __m512 times = _mm512_set1_ps(scale);
                for (long r = 0; r < 16; r++) {
                    const long i = i0 + r;
                    float *prow = s + r * Tp, *drow = dp + r * Tp;
                    const __m512 shift = _mm512_set1_ps(i < T ? head_lse[i] : 0.0f), di = _mm512_set1_ps(i < T ? delta[i] : 0.0f);
                    for (long j = 0; j < nk; j += 16) { /* P and dS: zero past the diagonal and past T */
                        const __mmask16 lanes = vbelow(i < T ? i + 1 - j : 0);
                        const __m512 pv = _mm512_maskz_mov_ps(lanes, exp_nonpositive(
                            _mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(prow + j), times), shift)));
                        _mm512_storeu_ps(prow + j, pv);
                        _mm512_storeu_ps(drow + j, _mm512_mul_ps(pv, _mm512_sub_ps(_mm512_loadu_ps(drow + j), di)));
                    }
                    for (long j = 0; j < nk; j += 16)
                        _mm256_storeu_si256((__m256i *)(ds + r * Tp + j), to_bf16(_mm512_loadu_ps(drow + j)));
                }
                pair_block(s, Tp, nk, pb + i0 / 2 * Tp);
                pair_block(dp, Tp, nk, sb + i0 / 2 * Tp);
                for (long d0 = 0; d0 < Dp; d0 += 32) tile_16x32(ds, Tp, kk + d0, Dp, nk / 32, dq + d0, Dp, 0);
                for (long i = i0; i < i0 + 16 && i < T; i++) {
                    float *x = dq + (i - i0) * Dp;
                    for (long d = 0; d < D; d += 16) _mm512_storeu_ps(x + d, _mm512_mul_ps(_mm512_loadu_ps(x + d), times));
                    if (R > 0) rotate_back(x, c + i * R, n + i * R, R);
                    uint16_t *dst = dbase + i * W + h * D;
                    for (long d = 0; d < D; d += 16) _mm256_mask_storeu_epi16(dst + d, vbelow(D - d), to_bf16(_mm512_loadu_ps(x + d)));
                }
            }
            const int add = h > g * group;
            for (long m0 = 0; m0 < Dp; m0 += 16)
                for (long j0 = 0; j0 < Tp; j0 += 32) {
                    tile_16x32(qt + m0 * Tp + j0, Tp, sb + j0 / 2 * Tp + j0, Tp, (Tp - j0) / 32, dkt + m0 * Tp + j0, Tp, add);
                    tile_16x32(gt + m0 * Tp + j0, Tp, pb + j0 / 2 * Tp + j0, Tp, (Tp - j0) / 32, dvt + m0 * Tp + j0, Tp, add);
                }
        }
        /* dK = scale (Q^T dS)^T turned back, dV = (dO^T P)^T */
        transpose_words((const uint32_t *)dkt, Dp, Tp, Tp, (uint32_t *)turned, Dp);
        for (long t = 0; t < T; t++) {
            float *x = turned + t * Dp;
            for (long d = 0; d < D; d += 16) _mm512_storeu_ps(x + d, _mm512_mul_ps(_mm512_loadu_ps(x + d), _mm512_set1_ps(scale)));
            if (R > 0) rotate_back(x, c + t * R, n + t * R, R);
            uint16_t *dk = dbase + t * W + (H + g) * D;
            for (long d = 0; d < D; d += 16) _mm256_mask_storeu_epi16(dk + d, vbelow(D - d), to_bf16(_mm512_loadu_ps(x + d)));
        }
        transpose_words((const uint32_t *)dvt, Dp, Tp, Tp, (uint32_t *)turned, Dp);
        for (long t = 0; t < T; t++) {
            uint16_t *dv = dbase + t * W + (H + Hkv + g) * D;
            for (long d = 0; d < D; d += 16) _mm256_mask_storeu_epi16(dv + d, vbelow(D - d), to_bf16(_mm512_loadu_ps(turned + t * Dp + d)));
        }
    }
    free(buffer);
    _tile_release();
    _mm_setcsr(mode);
  }
    return failed ? -1 : 0;
}

#else
int amx_ready(void) { return 0; }
#endif
