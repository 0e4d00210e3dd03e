/* Weight-only quantized matrix-vector products for x86-64 CPUs with AVX2.

   y[m, n] = sum_k x[m, k] * w[n, k] for a few rows m (decode: one token per sequence),
   with w in Strato's portable formats (kernels/quantized_linear.py):
     int8: q int8 [N, K], w = (q - z[n]) * s[n]            (z NULL: symmetric)
     int4: q uint8 [N, Kp / 2], even column in the low nibble, groups of g columns,
           w = (u - z[n, G]) * s[n, G]                      (z NULL: z = 8)
   At small M the product is bound by reading and widening the weights. Each row of x is
   rounded once to 16-bit fixed point with its own scale (error at most 2^-16 of the row's
   largest magnitude, far below the bf16 cast aten's packed kernels need), so codes widen
   to int16 and multiply-add in pairs (vpmaddwd): 16 weights per two instructions. The
   int32 sums go to fp32 at least every 256 columns (int4: every group), so they never
   overflow. Output rows are split over OpenMP threads. Built by kernels/cpu_gemv.py.

   `blocked` selects the layout of q. 0: the portable [N, row bytes] above. 1: ROWS rows
   at a time, 16 bytes of each row in turn (int8: 16 columns, int4: 32), rows padded with
   zeros to a multiple of ROWS and int8 rows to a multiple of 16 columns
   (cpu_gemv.block_codes builds it). A block is then one sequential stream, which the
   hardware prefetcher follows: 2x the bandwidth of ROWS interleaved rows from DRAM. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Output rows per block (read together, sharing each load of x), and how far ahead (in
   whole blocks) their weights are prefetched: without it the kernels ran 20-30% slower
   on an AVX2-only AMD EPYC, 1 thread; the hardware prefetcher ramps up too late on rows
   this short. */
#ifndef ROWS
#define ROWS 4
#endif
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 16384
#endif
#ifndef BLOCKED_PREFETCH_BYTES /* 0: just the next block; the hardware follows the stream */
#define BLOCKED_PREFETCH_BYTES 0
#endif
#define PREFETCH_HINT _MM_HINT_T0

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Bytes from block b's rows to those prefetched with them: whole blocks, about
   PREFETCH_BYTES ahead (blocked layout: BLOCKED_PREFETCH_BYTES), none past the last. */
static inline int64_t prefetch_distance(int64_t b, int64_t blocks, int64_t block_bytes,
                                        int blocked) {
    int64_t ahead = (blocked ? BLOCKED_PREFETCH_BYTES : PREFETCH_BYTES) / block_bytes;
    if (ahead < 1) ahead = 1;
    if (b + ahead >= blocks) ahead = blocks - 1 - b;
    return ahead * block_bytes;
}

/* Row m of x as int16 into xq (length `stride`, a multiple of 32, zero past K) with
   xq * scale[m] ~ x; `order` 32 puts each run of 32 columns as its 16 even then 16 odd
   columns (the order of the nibbles of 16 packed bytes). sums[m] = sum_k xq[k] * scale[m]. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t stride, int order,
                          int16_t *xq, float *scale, float *sums) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i low16 = _mm256_set1_epi32(0xFFFF), ones = _mm256_set1_epi16(1);
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        int16_t *qm = xq + m * stride;
        __m256 vmax = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8)
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(xm + k), abs_mask));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h);
        for (; k < K; k++) amax = fmaxf(amax, fabsf(xm[k]));
        const float s = amax > 0.0f ? amax / 32767.0f : 1.0f;
        const __m256 inv = _mm256_set1_ps(1.0f / s);
        __m256i total = _mm256_setzero_si256();
        for (k = 0; k < stride; k += 16) {
            __m256i v;
            if (k + 16 <= K) { /* round to nearest even, as lrintf */
                const __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(xm + k), inv);
                const __m256 hi = _mm256_mul_ps(_mm256_loadu_ps(xm + k + 8), inv);
                const __m256i a = _mm256_cvtps_epi32(lo), b = _mm256_cvtps_epi32(hi);
                v = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
            } else {
                int16_t tmp[16];
                for (int j = 0; j < 16; j++)
                    tmp[j] = k + j < K ? (int16_t)lrintf(xm[k + j] * (1.0f / s)) : 0;
                v = _mm256_loadu_si256((const __m256i *)tmp);
            }
            total = _mm256_add_epi32(total, _mm256_madd_epi16(v, ones));
            _mm256_store_si256((__m256i *)(qm + k), v);
        }
        if (order == 32) /* evens then odds of each 32 columns, in place */
            for (k = 0; k < stride; k += 32) {
                const __m256i a = _mm256_load_si256((const __m256i *)(qm + k));
                const __m256i b = _mm256_load_si256((const __m256i *)(qm + k + 16));
                const __m256i even = _mm256_packus_epi32(_mm256_and_si256(a, low16),
                                                         _mm256_and_si256(b, low16));
                const __m256i odd = _mm256_packs_epi32(_mm256_srai_epi32(a, 16),
                                                       _mm256_srai_epi32(b, 16));
                _mm256_store_si256((__m256i *)(qm + k), _mm256_permute4x64_epi64(even, 0xD8));
                _mm256_store_si256((__m256i *)(qm + k + 16), _mm256_permute4x64_epi64(odd, 0xD8));
            }
        int32_t t[8];
        _mm256_storeu_si256((__m256i *)t, total);
        scale[m] = s;
        sums[m] = (float)(t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7]) * s;
    }
}

/* y [M, N] = x [M, K] @ ((q - z) * s).T */
void strato_int8_gemv(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N,
                      const float *s, const float *z, float *y, int blocked, int threads) {
    /* Columns the vector loop covers (blocked rows are zero-padded to whole chunks). */
    const int64_t K16 = blocked ? (K + 15) & ~(int64_t)15 : K & ~(int64_t)15;
    const int64_t stride = (K + 31) & ~(int64_t)31;
    const int64_t step = blocked ? ROWS * 16 : 16; /* bytes from a row's chunk to its next */
    int16_t *xq = aligned_alloc(32, (size_t)(M * stride * 2 + 32));
    float *xs = malloc(sizeof(float) * (size_t)(2 * M));
    quantize_rows(x, M, K, stride, 0, xq, xs, xs + M);
    const int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        const int8_t *w[ROWS];
        for (int r = 0; r < ROWS; r++)
            w[r] = blocked ? q + b * ROWS * K16 + r * 16 : q + (n0 + (r < rows ? r : 0)) * K;
        const int64_t ahead = prefetch_distance(b, blocks, ROWS * (blocked ? K16 : K), blocked);
        for (int64_t m = 0; m < M; m++) {
            const int16_t *xm = xq + m * stride;
            __m256 f[ROWS];
            for (int r = 0; r < ROWS; r++) f[r] = _mm256_setzero_ps();
            for (int64_t k0 = 0; k0 < K16; k0 += 256) {
                const int64_t k1 = k0 + 256 < K16 ? k0 + 256 : K16;
                __m256i a[ROWS];
                for (int r = 0; r < ROWS; r++) a[r] = _mm256_setzero_si256();
                for (int64_t k = k0; k < k1; k += 16) {
                    const __m256i xv = _mm256_load_si256((const __m256i *)(xm + k));
                    const int64_t at = (k >> 4) * step;
                    for (int r = 0; r < ROWS; r++) {
                        if (blocked ? r == 0 : !(k & 63)) /* once a cache line */
                            _mm_prefetch((const char *)(w[r] + ahead + at), PREFETCH_HINT);
                        const __m256i wv = _mm256_cvtepi8_epi16(
                            _mm_loadu_si128((const __m128i *)(w[r] + at)));
                        a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(wv, xv));
                    }
                }
                for (int r = 0; r < ROWS; r++) f[r] = _mm256_add_ps(f[r], _mm256_cvtepi32_ps(a[r]));
            }
            for (int r = 0; r < rows; r++) {
                int32_t tail = 0;
                for (int64_t k = K16; k < K; k++) tail += (int32_t)xm[k] * w[r][k];
                const int64_t n = n0 + r;
                float dot = (hsum_ps(f[r]) + (float)tail) * xs[m];
                if (z) dot -= z[n] * xs[M + m];
                y[m * N + n] = dot * s[n];
            }
        }
    }
    free(xs);
    free(xq);
}

/* y [M, N] = x [M, Kp] @ W.T for int4 group-wise W; g is a multiple of 32. */
void strato_int4_gemv(const float *x, int64_t M, int64_t Kp, const uint8_t *q, int64_t N,
                      const float *s, const float *z, int64_t g, float *y, int blocked,
                      int threads) {
    const int64_t groups = Kp / g, half = Kp / 2;
    const int64_t step = blocked ? ROWS * 16 : 16; /* bytes from a row's chunk to its next */
    int16_t *xq = aligned_alloc(32, (size_t)(M * Kp * 2 + 32));
    float *xs = malloc(sizeof(float) * (size_t)(2 * M + M * groups));
    float *gsum = xs + 2 * M; /* [M, groups]: per-group sums of the rounded x */
    quantize_rows(x, M, Kp, Kp, 32, xq, xs, xs + M);
    for (int64_t m = 0; m < M; m++)
        for (int64_t G = 0; G < groups; G++) {
            int64_t total = 0;
            for (int64_t k = G * g; k < (G + 1) * g; k++) total += xq[m * Kp + k];
            gsum[m * groups + G] = (float)total * xs[m];
        }
    const __m256i low = _mm256_set1_epi16(0xF);
    const int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        int64_t nr[ROWS];
        const uint8_t *w[ROWS];
        for (int r = 0; r < ROWS; r++) {
            nr[r] = n0 + (r < rows ? r : 0);
            w[r] = blocked ? q + b * ROWS * half + r * 16 : q + nr[r] * half;
        }
        const int64_t ahead = prefetch_distance(b, blocks, ROWS * half, blocked);
        for (int64_t m = 0; m < M; m++) {
            const int16_t *xm = xq + m * Kp;
            __m256 f[ROWS];
            for (int r = 0; r < ROWS; r++) f[r] = _mm256_setzero_ps();
            float zero_term[ROWS] = {0};
            for (int64_t G = 0; G < groups; G++) {
                __m256i a[ROWS];
                for (int r = 0; r < ROWS; r++) a[r] = _mm256_setzero_si256();
                for (int64_t k = G * g; k < (G + 1) * g; k += 32) {
                    const __m256i xe = _mm256_load_si256((const __m256i *)(xm + k));
                    const __m256i xo = _mm256_load_si256((const __m256i *)(xm + k + 16));
                    const int64_t at = (k >> 5) * step;
                    for (int r = 0; r < ROWS; r++) {
                        if (blocked ? r == 0 : !(k & 127)) /* once a cache line */
                            _mm_prefetch((const char *)(w[r] + ahead + at), PREFETCH_HINT);
                        const __m256i bytes = _mm256_cvtepu8_epi16(
                            _mm_loadu_si128((const __m128i *)(w[r] + at)));
                        const __m256i lo = _mm256_and_si256(bytes, low);
                        const __m256i hi = _mm256_srli_epi16(bytes, 4);
                        a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(lo, xe));
                        a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(hi, xo));
                    }
                }
                for (int r = 0; r < ROWS; r++) {
                    const float sc = s[nr[r] * groups + G];
                    const float zp = z ? z[nr[r] * groups + G] : 8.0f;
                    f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r]), _mm256_set1_ps(sc), f[r]);
                    zero_term[r] += sc * zp * gsum[m * groups + G];
                }
            }
            for (int r = 0; r < rows; r++)
                y[m * N + n0 + r] = hsum_ps(f[r]) * xs[m] - zero_term[r];
        }
    }
    free(xs);
    free(xq);
}

/* ------------------------------------------------------------------ int8 activations
   The fast kernels below round x per block of 32 columns to int8 (scale amax / 127, as
   llama.cpp's Q8 blocks), once per call, shared by every output row. Codes and activations
   then multiply-add as u8 x s8 pairs (vpmaddubsw: 32 products an instruction, int16 sums
   that cannot saturate: 2 * 128 * 127 < 2^15), widened to int32 and scaled in fp32 once a
   block. Error of y[m, n]: at most sum_k |w[n, k]| * amax(x's block of k) / 254. */

/* Row m of x as int8 blocks of 32 into xq [M, stride] (stride a multiple of 32, zeros past
   K), scale dx [M, stride / 32] and sum of codes times scale bsum [M, stride / 32].
   `order` 32 puts each block as its 16 even then 16 odd columns (the nibbles of 16 int4
   bytes). */
static void quantize_blocks(const float *x, int64_t M, int64_t K, int64_t stride, int order,
                            int8_t *xq, float *dx, float *bsum) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    /* within each 16-byte lane: even bytes, then odd bytes */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const int64_t blocks = stride / 32;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t j = 0; j < blocks; j++) {
            const int64_t k = j * 32;
            float tmp[32];
            const float *src = x + m * K + k;
            if (k + 32 > K) { /* the last, partial block: zero-padded */
                for (int i = 0; i < 32; i++) tmp[i] = k + i < K ? src[i] : 0.0f;
                src = tmp;
            }
            __m256 v[4], vmax = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_loadu_ps(src + 8 * i);
                vmax = _mm256_max_ps(vmax, _mm256_and_ps(v[i], abs_mask));
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h);
            const float d = amax / 127.0f;
            const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            __m256i q[4]; /* round to nearest even, as lrintf */
            for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
            const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]),
                                                   _mm256_add_epi32(q[2], q[3]));
            /* packs interleave the 128-bit lanes: [0-3 8-11 | 4-7 12-15], then bytes
               [0-3 8-11 16-19 24-27 | 4-7 12-15 20-23 28-31]; the permute restores order */
            const __m256i w16a = _mm256_packs_epi32(q[0], q[1]);
            const __m256i w16b = _mm256_packs_epi32(q[2], q[3]);
            __m256i bytes = _mm256_packs_epi16(w16a, w16b);
            bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            if (order == 32) /* evens of both lanes, then odds */
                bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(bytes, split), 0xD8);
            _mm256_store_si256((__m256i *)(xq + m * stride + k), bytes);
            __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total),
                                      _mm256_extracti128_si256(total, 1));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
            dx[m * blocks + j] = d;
            bsum[m * blocks + j] = (float)_mm_cvtsi128_si32(t) * d;
        }
    }
}

/* Sum of the 8 int32 lanes of u8 x s8 products of a and b, in fp32 lanes. */
static inline __m256i dot_u8s8(__m256i a, __m256i b, __m256i ones) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones);
}

/* strato_int8_gemv with int8 activations. */
void strato_int8_gemv_q8(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N,
                         const float *s, const float *z, float *y, int blocked, int threads) {
    const int64_t K16 = blocked ? (K + 15) & ~(int64_t)15 : K; /* columns of a row's codes */
    const int64_t stride = (K + 31) & ~(int64_t)31, nb = stride / 32;
    /* blocks the vector loop reads whole: blocked rows are padded to 16, not 32 */
    const int64_t full = blocked ? K16 / 32 : K / 32;
    const int64_t step = blocked ? ROWS * 16 : 16; /* bytes from a row's chunk to its next */
    int8_t *xq = aligned_alloc(32, (size_t)(M * stride + 32));
    float *dx = malloc(sizeof(float) * (size_t)(2 * M * nb + M));
    float *bsum = dx + M * nb, *xsum = bsum + M * nb;
    quantize_blocks(x, M, K, stride, 0, xq, dx, bsum);
    for (int64_t m = 0; m < M; m++) {
        float t = 0.0f;
        for (int64_t j = 0; j < nb; j++) t += bsum[m * nb + j];
        xsum[m] = t;
    }
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        const int8_t *w[ROWS];
        for (int r = 0; r < ROWS; r++)
            w[r] = blocked ? q + b * ROWS * K16 + r * 16 : q + (n0 + (r < rows ? r : 0)) * K;
        const int64_t ahead = prefetch_distance(b, blocks, ROWS * K16, blocked);
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * stride;
            const float *dm = dx + m * nb;
            __m256 f[ROWS];
            for (int r = 0; r < ROWS; r++) f[r] = _mm256_setzero_ps();
            for (int64_t j = 0; j < full; j++) {
                const __m256i xv = _mm256_load_si256((const __m256i *)(xm + 32 * j));
                const __m256 d = _mm256_set1_ps(dm[j]);
                const int64_t at = 2 * j * step;
                for (int r = 0; r < ROWS; r++) {
                    if (blocked ? r == 0 : !(j & 1)) { /* once a cache line */
                        _mm_prefetch((const char *)(w[r] + ahead + at), PREFETCH_HINT);
                        if (blocked)
                            _mm_prefetch((const char *)(w[r] + ahead + at + step), PREFETCH_HINT);
                    }
                    const __m256i wv =
                        blocked ? _mm256_loadu2_m128i((const __m128i *)(w[r] + at + step),
                                                      (const __m128i *)(w[r] + at))
                                : _mm256_loadu_si256((const __m256i *)(w[r] + at));
                    const __m256i p =
                        dot_u8s8(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv), ones);
                    f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, f[r]);
                }
            }
            for (int r = 0; r < rows; r++) {
                const int64_t n = n0 + r;
                float dot = hsum_ps(f[r]);
                /* the rest, scalar: a blocked row's last 16 columns, a portable row's tail */
                const int64_t end = blocked ? K16 : K;
                for (int64_t k = 32 * full; k < end && k < stride; k++) {
                    const int64_t at = blocked ? (k >> 4) * step + (k & 15) : k;
                    dot += (float)((int32_t)xm[k] * w[r][at]) * dm[k >> 5];
                }
                if (z) dot -= z[n] * xsum[m];
                y[m * N + n] = dot * s[n];
            }
        }
    }
    free(dx);
    free(xq);
}

/* strato_int4_gemv with int8 activations. */
void strato_int4_gemv_q8(const float *x, int64_t M, int64_t Kp, const uint8_t *q, int64_t N,
                         const float *s, const float *z, int64_t g, float *y, int blocked,
                         int threads) {
    const int64_t groups = Kp / g, half = Kp / 2, nb = Kp / 32, per = g / 32;
    const int64_t step = blocked ? ROWS * 16 : 16; /* bytes from a row's chunk to its next */
    int8_t *xq = aligned_alloc(32, (size_t)(M * Kp + 32));
    float *dx = malloc(sizeof(float) * (size_t)(2 * M * nb + M * groups + 8));
    float *bsum = dx + M * nb, *gsum = bsum + M * nb; /* gsum [M, groups] */
    quantize_blocks(x, M, Kp, Kp, 32, xq, dx, bsum);
    for (int64_t m = 0; m < M; m++)
        for (int64_t G = 0; G < groups; G++) {
            float t = 0.0f;
            for (int64_t j = G * per; j < (G + 1) * per; j++) t += bsum[m * nb + j];
            gsum[m * groups + G] = t;
        }
    const __m256i low = _mm256_set1_epi8(0xF), ones = _mm256_set1_epi16(1);
    /* the 16 code bytes in both lanes, the high lane shifted to its high nibbles */
    const __m256i nibble_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    const int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        const float *sr[ROWS], *zr[ROWS];
        const uint8_t *w[ROWS];
        for (int r = 0; r < ROWS; r++) {
            const int64_t n = n0 + (r < rows ? r : 0);
            sr[r] = s + n * groups;
            zr[r] = z ? z + n * groups : NULL;
            w[r] = blocked ? q + b * ROWS * half + r * 16 : q + n * half;
        }
        const int64_t ahead = prefetch_distance(b, blocks, ROWS * half, blocked);
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * Kp;
            const float *dm = dx + m * nb;
            __m256 f[ROWS];
            for (int r = 0; r < ROWS; r++) f[r] = _mm256_setzero_ps();
            if (per == 1) /* groups of 32: the weights' scale joins the block's */
                for (int64_t j = 0; j < nb; j++) {
                    const __m256i xv = _mm256_load_si256((const __m256i *)(xm + 32 * j));
                    const __m256 d = _mm256_broadcast_ss(dm + j);
                    const int64_t at = j * step;
                    if (blocked) _mm_prefetch((const char *)(w[0] + ahead + at), PREFETCH_HINT);
                    for (int r = 0; r < ROWS; r++) {
                        if (!blocked && !(j & 3))
                            _mm_prefetch((const char *)(w[r] + ahead + at), PREFETCH_HINT);
                        const __m256i packed = _mm256_broadcastsi128_si256(
                            _mm_loadu_si128((const __m128i *)(w[r] + at)));
                        const __m256i codes =
                            _mm256_and_si256(_mm256_srlv_epi32(packed, nibble_shift), low);
                        const __m256i p = dot_u8s8(codes, xv, ones);
                        const __m256 ds = _mm256_mul_ps(d, _mm256_broadcast_ss(sr[r] + j));
                        f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), ds, f[r]);
                    }
                }
            for (int64_t G = 0; G < groups && per > 1; G++) {
                __m256 acc[ROWS];
                for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
                for (int64_t j = G * per; j < (G + 1) * per; j++) {
                    const __m256i xv = _mm256_load_si256((const __m256i *)(xm + 32 * j));
                    const __m256 d = _mm256_broadcast_ss(dm + j);
                    const int64_t at = j * step;
                    for (int r = 0; r < ROWS; r++) {
                        if (blocked ? r == 0 : !(j & 3)) /* once a cache line */
                            _mm_prefetch((const char *)(w[r] + ahead + at), PREFETCH_HINT);
                        const __m256i packed = _mm256_broadcastsi128_si256(
                            _mm_loadu_si128((const __m128i *)(w[r] + at)));
                        const __m256i codes =
                            _mm256_and_si256(_mm256_srlv_epi32(packed, nibble_shift), low);
                        const __m256i p = dot_u8s8(codes, xv, ones);
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc[r]);
                    }
                }
                for (int r = 0; r < ROWS; r++)
                    f[r] = _mm256_fmadd_ps(acc[r], _mm256_broadcast_ss(sr[r] + G), f[r]);
            }
            const float *gm = gsum + m * groups;
            for (int r = 0; r < rows; r++) { /* sum_G s z gsum: the zero points' part */
                __m256 zt = _mm256_setzero_ps();
                int64_t G = 0;
                for (; G + 8 <= groups; G += 8) {
                    const __m256 sz = zr[r] ? _mm256_mul_ps(_mm256_loadu_ps(sr[r] + G),
                                                            _mm256_loadu_ps(zr[r] + G))
                                            : _mm256_mul_ps(_mm256_loadu_ps(sr[r] + G),
                                                            _mm256_set1_ps(8.0f));
                    zt = _mm256_fmadd_ps(sz, _mm256_loadu_ps(gm + G), zt);
                }
                float zero_term = hsum_ps(zt);
                for (; G < groups; G++) zero_term += sr[r][G] * (zr[r] ? zr[r][G] : 8.0f) * gm[G];
                y[m * N + n0 + r] = hsum_ps(f[r]) - zero_term;
            }
        }
    }
    free(dx);
    free(xq);
}
