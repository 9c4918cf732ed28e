/* Decode attention that reads the paged K/V cache in place (CPU).
 *
 * One query token per pair; pair i attends tokens 0..lens[i]-1 of its block list idx[i]. The cache of
 * one layer is [blocks, block_size, kv_heads, head_dim]; q and out are [pairs, q_heads, head_dim], and
 * q head g reads kv head g / (q_heads / kv_heads) (grouped-query attention). Scores, softmax and the
 * weighted sum are computed in fp32 as a two-pass softmax: s = q.k * scale, p = exp(s - max s),
 * out = sum p v / sum p. Each (pair, kv head) has its own fixed summation order, so a pair's output
 * depends neither on the other pairs of the batch nor on the thread count: a task is one (pair, kv
 * head), or on AVX2 with enough pairs one pair with all its kv heads (attend_pair256: the same sums).
 *
 * On AVX-512 (groups of up to 8 query heads) a task runs as code specialised for its group size (and
 * for head_dim 64 or 128), so the G queries and the G output accumulators stay in registers and each K
 * and V row is read once for all G:
 * - rows are widened to fp32 without shuffles (bf16: the even elements shifted up, the odd ones
 *   masked; the accumulators keep the even and odd dimensions apart until the end), so q.k and p v
 *   are plain FMAs on exact values;
 * - K pass: per token, one 16-lane partial dot product per query head; the partials of 16 tokens are
 *   reduced together by a transpose-and-add tree (15 shuffle+add steps for 16 scores, where a
 *   horizontal sum takes 4 per score), then scaled by scale * log2(e);
 * - softmax: 2^(s - max) by a degree-7 polynomial and vscalefps, 16 tokens per instruction, summed in
 *   16 lanes;
 * - the next block's rows are prefetched, one row per token read (the last K block prefetches the
 *   first V block): a pair's blocks are scattered over the cache, out of the hardware prefetchers' view.
 * On AVX2 + FMA without AVX-512, groups of up to 8 query heads at head_dim 64 or 128 take the same
 * method in 8 lanes (below: 1.7x the portable code with the blocks in cache, 1.3-1.8x on cold blocks,
 * where it is bound by memory). Larger groups, other head sizes there, and other machines take the portable code (same
 * method, scalar loops that the compiler vectorises). The paths round differently (within fp32 rounding
 * of each other).
 *
 * Built on first use by colm_runtime/model/cpu_kernels.py (gcc -O3 -march=native -fopenmp, compiled
 * with fast-math for vectorised expf and reductions, linked without it so the process keeps IEEE
 * denormals).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define MAX_HD 256
#define MAX_G 64
#define MAX_PAIR_HEADS 64 /* query heads of one pair task (attend_pair256) */

/* One token row of head_dim values as fp32: storage is fp32 or bf16 (the high half of an fp32). */
static inline __attribute__((always_inline)) void load_row(const void *base, int64_t at, int bf16, int64_t hd,
                                                           float *restrict dst) {
    if (bf16) {
        const uint16_t *p = (const uint16_t *)base + at;
        for (int64_t d = 0; d < hd; d++) dst[d] = bf16_to_f32(p[d]);
    } else {
        memcpy(dst, (const float *)base + at, hd * sizeof(float));
    }
}

static inline void store_row(void *base, int64_t at, int bf16, int64_t hd, const float *src, float mul) {
    if (bf16) {
        uint16_t *p = (uint16_t *)base + at;
        for (int64_t d = 0; d < hd; d++) p[d] = f32_to_bf16(src[d] * mul);
    } else {
        float *p = (float *)base + at;
        for (int64_t d = 0; d < hd; d++) p[d] = src[d] * mul;
    }
}

/* Portable path, one (pair, kv head): G query heads over L tokens. hd is a compile-time constant in the
 * callers below, so the dot products and the weighted sums unroll and vectorise. */
static inline __attribute__((always_inline)) void attend(
        const void *q, const void *k, const void *v, void *out, const int64_t *blocks, int64_t L,
        int64_t i, int64_t h, int64_t G, int64_t q_heads, int64_t tok_stride, int64_t block_size, float scale,
        int bf16, const int64_t hd, float *restrict s) {
    float qf[MAX_G][MAX_HD], acc[MAX_G][MAX_HD], row[MAX_HD], m[MAX_G], l[MAX_G];
    for (int64_t g = 0; g < G; g++) {
        load_row(q, (i * q_heads + h * G + g) * hd, bf16, hd, qf[g]);
        for (int64_t d = 0; d < hd; d++) qf[g][d] *= scale;
        m[g] = -FLT_MAX;
    }
    for (int64_t b = 0, t = 0; t < L; b++) {
        const int64_t base = blocks[b] * block_size * tok_stride + h * hd;
        for (int64_t j = 0; j < block_size && t < L; j++, t++) {
            load_row(k, base + j * tok_stride, bf16, hd, row);
            for (int64_t g = 0; g < G; g++) {
                float dot = 0.f;
                for (int64_t d = 0; d < hd; d++) dot += qf[g][d] * row[d];
                s[g * L + t] = dot;
                m[g] = dot > m[g] ? dot : m[g];
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float sum = 0.f, mg = m[g], *sg = s + g * L;
        for (int64_t t = 0; t < L; t++) {
            sg[t] = expf(sg[t] - mg);
            sum += sg[t];
        }
        l[g] = sum;
        for (int64_t d = 0; d < hd; d++) acc[g][d] = 0.f;
    }
    for (int64_t b = 0, t = 0; t < L; b++) {
        const int64_t base = blocks[b] * block_size * tok_stride + h * hd;
        for (int64_t j = 0; j < block_size && t < L; j++, t++) {
            load_row(v, base + j * tok_stride, bf16, hd, row);
            for (int64_t g = 0; g < G; g++) {
                const float p = s[g * L + t];
                for (int64_t d = 0; d < hd; d++) acc[g][d] += p * row[d];
            }
        }
    }
    for (int64_t g = 0; g < G; g++) store_row(out, (i * q_heads + h * G + g) * hd, bf16, hd, acc[g], 1.f / l[g]);
}

static void attend_portable(const void *q, const void *k, const void *v, void *out, const int64_t *blocks, int64_t L,
                            int64_t i, int64_t h, int64_t G, int64_t q_heads, int64_t tok_stride, int64_t block_size,
                            float scale, int bf16, int64_t head_dim, float *restrict s) {
    switch (head_dim) { /* the common head sizes get their own unrolled code */
    case 64:
        attend(q, k, v, out, blocks, L, i, h, G, q_heads, tok_stride, block_size, scale, bf16, 64, s);
        break;
    case 128:
        attend(q, k, v, out, blocks, L, i, h, G, q_heads, tok_stride, block_size, scale, bf16, 128, s);
        break;
    default:
        attend(q, k, v, out, blocks, L, i, h, G, q_heads, tok_stride, block_size, scale, bf16, head_dim, s);
    }
}

/* 2^f for |f| <= 1/2 on vectors of either width (fma, set1: that width's intrinsics): its Taylor
 * polynomial of degree 7, error below 1e-8 relative. */
#define EXP2_POLY(fma, set1, f)                                                                             \
    fma(fma(fma(fma(fma(fma(fma(set1(1.5252733804059838e-05f), f, set1(1.5403530393381606e-04f)), f,        \
                            set1(1.3333558146428441e-03f)), f, set1(9.6181291076284772e-03f)), f,           \
                    set1(5.5504108664821576e-02f)), f, set1(2.4022650695910071e-01f)), f,                   \
            set1(6.9314718055994531e-01f)), f, set1(1.f))

/* The vector paths' attend functions: DEF(G, bf16, head_dim, name) defines one; DEFINE_GROUPS defines
 * them for groups of 1-8 at head_dim 64 and 128 in both storages, ATTEND_TABLE indexes them as
 * attend_table[bf16][head_dim == 128][G - 1]. */
#define DEF_G(G) \
    DEF(G, 0, 64, f32_64_##G) DEF(G, 0, 128, f32_128_##G) DEF(G, 1, 64, bf16_64_##G) DEF(G, 1, 128, bf16_128_##G)
#define DEFINE_GROUPS DEF_G(1) DEF_G(2) DEF_G(3) DEF_G(4) DEF_G(5) DEF_G(6) DEF_G(7) DEF_G(8)
#define ROW(P) {P##1, P##2, P##3, P##4, P##5, P##6, P##7, P##8}
#define ATTEND_TABLE \
    static attend_fn *const attend_table[2][2][VEC_G] = {{ROW(f32_64_), ROW(f32_128_)}, {ROW(bf16_64_), ROW(bf16_128_)}};

#if (defined(__AVX512F__) && defined(__AVX512BW__)) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>

/* Where block b of a pair's list starts in one layer's K or V (base: that tensor, offset to the task's
 * head where it reads one): the vector paths' walks, with their blocks, block_size and stride_bytes. */
#define BLOCK(base, b) ((const char *)(base) + blocks[b] * block_size * stride_bytes)

/* Software prefetch, one block ahead, one row per token read: a pair's blocks are scattered over the
 * cache, so the hardware prefetchers cannot guess the next one. (Measured on AVX-512: prefetching the whole next
 * block at once stalls on the fill buffers; two blocks ahead, or into L2 only, is no better; on the AVX2 EPYC the distance made no difference.) */
static inline __attribute__((always_inline)) void prefetch_row(const char *p, int64_t bytes) {
    if (p)
        for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

#define VEC_G 8 /* group sizes with their own code; larger groups take the portable path */
#define MAX_U 16 /* fp32 vectors per row: head_dim up to 256 */

/* 2^x for x <= 0: x = n + f with |f| <= 1/2, 2^f by its Taylor polynomial of degree 7 (error below
 * 1e-8 relative, under an fp32 rounding), times 2^n by vscalefps. Below 2^-126 the weight is 0: it
 * cannot change an fp32 sum that holds the maximum's 1, and denormals would only cost time later. */
static inline __m512 exp2_neg(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    const __m512 p = EXP2_POLY(_mm512_fmadd_ps, _mm512_set1_ps, f);
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
    return _mm512_maskz_scalef_ps(live, p, n);
}

/* a[0..15]: 16 vectors of partial sums -> one vector whose lane t is the sum of a[t]'s lanes. Halving
 * the width at each level takes 8 + 4 + 2 + 1 shuffle pairs and adds for all 16, where a horizontal sum
 * takes 4 levels for each. The tree leaves lane 4k+e holding a[4e+k]; one permute puts it back. */
static inline __m512 reduce16(const __m512 *a) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++) /* 256-bit halves: a[2i] in lanes 0-7, a[2i+1] in lanes 8-15 */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++) /* 128-bit quarters: a[4i+k] in quarter k */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        d[i] = _mm512_add_ps(_mm512_unpacklo_ps(c[2 * i], c[2 * i + 1]), _mm512_unpackhi_ps(c[2 * i], c[2 * i + 1]));
    const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), e);
}

/* A row as fp32 vectors: fp32 storage in NU = hd/16 loads; bf16 storage in NU = hd/32 loads of 32, each
 * widened into its even elements (shifted up) and its odd ones (masked): no shuffles, and the products
 * of bf16 values are exact in fp32. The accumulators then hold the even and odd dimensions apart,
 * interleaved once at the end. (vdpbf16ps takes bf16 pairs as they are, but measured slower here than
 * the widening and twice the FMAs.) hd is a constant in the hot instances, so the masks fold away. */
static inline __attribute__((always_inline)) int64_t row_units(int64_t hd, int bf16) {
    return bf16 ? (hd + 31) / 32 : (hd + 15) / 16;
}

/* Whole units are plain loads: gcc treats a masked load as reading any memory, and then stores every
 * accumulator back to the stack after each token instead of keeping them in registers. */
static inline __attribute__((always_inline)) void load_vecs(const char *row, int64_t hd, int bf16, __m512 *dst) {
    for (int64_t u = 0; u < row_units(hd, bf16); u++) {
        if (bf16) {
            const int64_t rest = hd - 32 * u;
            const __m512i x = rest >= 32 ? _mm512_loadu_si512(row + 64 * u)
                                         : _mm512_maskz_loadu_epi16((__mmask32)((1u << rest) - 1), row + 64 * u);
            dst[2 * u] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
            dst[2 * u + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xFFFF0000u)));
        } else {
            const int64_t rest = hd - 16 * u;
            dst[u] = rest >= 16 ? _mm512_loadu_ps(row + 64 * u)
                                : _mm512_maskz_loadu_ps((__mmask16)((1u << rest) - 1), row + 64 * u);
        }
    }
}

/* One (pair, kv head) with G (a constant, <= VEC_G) query heads over L tokens. s: G * round16(L) floats. */
static inline __attribute__((always_inline)) void attend512(
        const void *q, const void *k, const void *v, void *out, const int64_t *blocks, int64_t L, int64_t i,
        int64_t h, const int G, int64_t q_heads, int64_t tok_stride, int64_t block_size, float scale, const int bf16,
        const int64_t hd, float *restrict s) {
    const int64_t NU = row_units(hd, bf16), NV = bf16 ? 2 * NU : NU, esz = bf16 ? 2 : 4;
    const int64_t Lp = (L + 15) & ~(int64_t)15, nblk = (L + block_size - 1) / block_size;
    const int64_t row_bytes = hd * esz, stride_bytes = tok_stride * esz;
    /* the score is (q.k) scale log2(e), so that the softmax's exp is a 2^x */
    const __m512 sc = _mm512_set1_ps(scale * 1.4426950408889634f);
    const char *kc = (const char *)k + h * row_bytes, *vc = (const char *)v + h * row_bytes;

    __m512 qf[VEC_G][MAX_U];
    for (int g = 0; g < G; g++) load_vecs((const char *)q + (i * q_heads + h * G + g) * row_bytes, hd, bf16, qf[g]);

    /* K pass: scores of 16 tokens at a time, their running maximum per query head. The last K block
     * prefetches the first V block. */
    __m512 part[VEC_G][16], mx[VEC_G];
    for (int g = 0; g < G; g++) mx[g] = _mm512_set1_ps(-FLT_MAX);
    int n = 0;
    int64_t t = 0;
    for (int64_t b = 0; b < nblk; b++) {
        const char *base = BLOCK(kc, b), *next = b + 1 < nblk ? BLOCK(kc, b + 1) : BLOCK(vc, 0);
        const int64_t jn = L - t < block_size ? L - t : block_size;
        for (int64_t j = 0; j < jn; j++, t++) {
            prefetch_row(next + j * stride_bytes, row_bytes);
            __m512 kf[MAX_U];
            load_vecs(base + j * stride_bytes, hd, bf16, kf);
            for (int g = 0; g < G; g++) {
                __m512 acc = _mm512_mul_ps(qf[g][0], kf[0]);
                for (int64_t u = 1; u < NV; u++) acc = _mm512_fmadd_ps(qf[g][u], kf[u], acc);
                part[g][n] = acc;
            }
            if (++n == 16 || t + 1 == L) { /* the last chunk may be short: its idle lanes stay out */
                const int64_t t0 = t + 1 - n;
                const __mmask16 live = (__mmask16)((1u << n) - 1);
                for (int g = 0; g < G; g++) {
                    for (int r = n; r < 16; r++) part[g][r] = _mm512_setzero_ps();
                    const __m512 x = _mm512_mul_ps(reduce16(part[g]), sc);
                    _mm512_store_ps(s + g * Lp + t0, x);
                    mx[g] = _mm512_mask_max_ps(mx[g], live, mx[g], x);
                }
                n = 0;
            }
        }
    }

    /* softmax weights in place, their sums in 16 lanes (the idle lanes of the last chunk are 0) */
    float inv[VEC_G];
    for (int g = 0; g < G; g++) {
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx[g]));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t t0 = 0; t0 < L; t0 += 16) {
            const __mmask16 live = L - t0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - t0)) - 1);
            const __m512 p = _mm512_maskz_mov_ps(live, exp2_neg(_mm512_sub_ps(_mm512_load_ps(s + g * Lp + t0), m)));
            _mm512_store_ps(s + g * Lp + t0, p);
            sum = _mm512_add_ps(sum, p);
        }
        inv[g] = 1.f / _mm512_reduce_add_ps(sum);
    }

    /* V pass: out_g = sum_t p_g,t v_t */
    __m512 acc[VEC_G][MAX_U];
    for (int g = 0; g < G; g++)
        for (int64_t u = 0; u < NV; u++) acc[g][u] = _mm512_setzero_ps();
    t = 0;
    for (int64_t b = 0; b < nblk; b++) {
        const char *base = BLOCK(vc, b), *next = b + 1 < nblk ? BLOCK(vc, b + 1) : NULL;
        const int64_t jn = L - t < block_size ? L - t : block_size;
        for (int64_t j = 0; j < jn; j++, t++) {
            prefetch_row(next ? next + j * stride_bytes : NULL, row_bytes);
            __m512 vf[MAX_U];
            load_vecs(base + j * stride_bytes, hd, bf16, vf);
            for (int g = 0; g < G; g++) {
                const __m512 p = _mm512_set1_ps(s[g * Lp + t]);
                for (int64_t u = 0; u < NV; u++) acc[g][u] = _mm512_fmadd_ps(p, vf[u], acc[g][u]);
            }
        }
    }

    for (int g = 0; g < G; g++) {
        float o[MAX_HD + 32] __attribute__((aligned(64)));
        for (int64_t u = 0; u < NU; u++) {
            if (bf16) { /* even and odd dimensions back in order */
                const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
                const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
                _mm512_store_ps(o + 32 * u, _mm512_permutex2var_ps(acc[g][2 * u], lo, acc[g][2 * u + 1]));
                _mm512_store_ps(o + 32 * u + 16, _mm512_permutex2var_ps(acc[g][2 * u], hi, acc[g][2 * u + 1]));
            } else {
                _mm512_store_ps(o + 16 * u, acc[g][u]);
            }
        }
        store_row(out, (i * q_heads + h * G + g) * hd, bf16, hd, o, inv[g]);
    }
}

/* The common head sizes get one function per group size and storage, where the group's q and
 * accumulators live in registers; other head sizes one function per storage. (Separate functions, not
 * one switch: a single function holding every instance took gcc 20 s to build.) */
typedef void attend_fn(const void *, const void *, const void *, void *, const int64_t *, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, float, int64_t, float *restrict);
#define DEF(G, BF16, HD, NAME)                                                                                      \
    static void NAME(const void *q, const void *k, const void *v, void *out, const int64_t *blocks, int64_t L,      \
                     int64_t i, int64_t h, int64_t g, int64_t q_heads, int64_t tok_stride, int64_t block_size,       \
                     float scale, int64_t hd, float *restrict s) {                                                   \
        attend512(q, k, v, out, blocks, L, i, h, G, q_heads, tok_stride, block_size, scale, BF16, HD, s);           \
    }
DEFINE_GROUPS
DEF(g, 0, hd, f32_any) DEF(g, 1, hd, bf16_any)
ATTEND_TABLE
#undef DEF

static void attend_vec(const void *q, const void *k, const void *v, void *out, const int64_t *blocks, int64_t L,
                       int64_t i, int64_t h, int64_t G, int64_t q_heads, int64_t tok_stride, int64_t block_size,
                       float scale, int bf16, int64_t head_dim, float *restrict s) {
    attend_fn *f = head_dim == 64 || head_dim == 128 ? attend_table[bf16 != 0][head_dim == 128][G - 1]
                   : bf16                            ? bf16_any
                                                     : f32_any;
    f(q, k, v, out, blocks, L, i, h, G, q_heads, tok_stride, block_size, scale, head_dim, s);
}
#define HAVE_VEC 1
#define VEC_HD(hd) 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* AVX2 + FMA without AVX-512 (AMD EPYC): the same method in 8 lanes, for head_dim 64 and 128 and groups
 * of up to 8 query heads; other shapes take the portable code. The group's queries stay in L1 (16 ymm
 * registers cannot hold them), each K and V row is read once per token for all G, and the V pass runs
 * over column slices of the row small enough for G x slice accumulators to stay in registers. */
#define VEC_G 8
#define MAX_U8 16 /* 8-wide vectors per row: head_dim up to 128 */

/* 2^x for x <= 0, as exp2_neg above: Taylor polynomial of degree 7 on the fraction, 2^n put into the
 * exponent; below 2^-126 the weight is 0. */
static inline __m256 exp2_neg8(__m256 x) {
    const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_GE_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    const __m256 p = EXP2_POLY(_mm256_fmadd_ps, _mm256_set1_ps, f);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
}

/* a[0..7] -> one vector whose lane t is the sum of a[t]'s lanes: two levels of horizontal adds within
 * 128-bit halves, then the halves added across. */
static inline __m256 reduce8(const __m256 *a) {
    const __m256 b0 = _mm256_hadd_ps(a[0], a[1]), b1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 b2 = _mm256_hadd_ps(a[4], a[5]), b3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 c0 = _mm256_hadd_ps(b0, b1), c1 = _mm256_hadd_ps(b2, b3);
    return _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
}

static inline float hmax8(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

static inline float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

/* 8 values of a row as fp32 (bf16: widened exactly, the high half of an fp32) */
static inline __attribute__((always_inline)) __m256 load8(const char *p, const int bf16) {
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    return _mm256_loadu_ps((const float *)p);
}

/* One query head's partial dot product with a K row of NV vectors: two chains of FMAs (one chain of NV
 * waits on FMA latency), added at the end. */
static inline __attribute__((always_inline)) __m256 dot_part8(const __m256 *qf, const __m256 *kf, const int64_t NV) {
    __m256 a0 = _mm256_mul_ps(qf[0], kf[0]), a1 = _mm256_mul_ps(qf[1], kf[1]);
    for (int64_t u = 2; u < NV; u += 2) {
        a0 = _mm256_fmadd_ps(qf[u], kf[u], a0);
        a1 = _mm256_fmadd_ps(qf[u + 1], kf[u + 1], a1);
    }
    return _mm256_add_ps(a0, a1);
}

/* A chunk of n <= 8 tokens' partial dot products (part[0..n-1]; the rest are zeroed) -> their scores at
 * s (scaled by sc) and the running maximum mx; the last chunk may be short: its idle lanes stay out of
 * the max. */
static inline __attribute__((always_inline)) void flush_scores8(__m256 *part, int n, __m256 sc, float *s, __m256 *mx) {
    const __m256 live = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)n), _CMP_LT_OQ);
    for (int r = n; r < 8; r++) part[r] = _mm256_setzero_ps();
    const __m256 x = _mm256_mul_ps(reduce8(part), sc);
    _mm256_storeu_ps(s, x);
    *mx = _mm256_max_ps(*mx, _mm256_blendv_ps(_mm256_set1_ps(-FLT_MAX), x, live));
}

/* One query head's L scores (log2 units) -> softmax weights in place (lanes past L: 0); returns 1 / their
 * sum. */
static inline __attribute__((always_inline)) float softmax8(float *s, int64_t L, __m256 mx) {
    const __m256 m = _mm256_set1_ps(hmax8(mx));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t t0 = 0; t0 < L; t0 += 8) {
        const __m256 live = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps((float)(L - t0)),
                                          _CMP_LT_OQ);
        const __m256 p = _mm256_and_ps(exp2_neg8(_mm256_sub_ps(_mm256_loadu_ps(s + t0), m)), live);
        _mm256_storeu_ps(s + t0, p);
        sum = _mm256_add_ps(sum, p);
    }
    return 1.f / hsum8(sum);
}

/* One (pair, kv head) with G (a constant, <= VEC_G) query heads over L tokens; hd 64 or 128 (a constant).
 * s: G * round16(L) floats. */
static inline __attribute__((always_inline)) void attend256(
        const void *q, const void *k, const void *v, void *out, const int64_t *blocks, int64_t L, int64_t i,
        int64_t h, const int G, int64_t q_heads, int64_t tok_stride, int64_t block_size, float scale, const int bf16,
        const int64_t hd, float *restrict s) {
    const int64_t NV = hd / 8, esz = bf16 ? 2 : 4, Lp = (L + 7) & ~(int64_t)7;
    const int64_t nblk = (L + block_size - 1) / block_size, row_bytes = hd * esz, stride_bytes = tok_stride * esz;
    const __m256 sc = _mm256_set1_ps(scale * 1.4426950408889634f); /* scores in log2 units: 2^x below */
    const char *kc = (const char *)k + h * row_bytes, *vc = (const char *)v + h * row_bytes;
    __m256 qf[VEC_G][MAX_U8];
    for (int g = 0; g < G; g++)
        for (int64_t u = 0; u < NV; u++) qf[g][u] = load8((const char *)q + (i * q_heads + h * G + g) * row_bytes + 8 * u * esz, bf16);

    /* K pass: 8 tokens' partial dot products per query head, reduced together */
    __m256 part[VEC_G][8], mx[VEC_G];
    for (int g = 0; g < G; g++) mx[g] = _mm256_set1_ps(-FLT_MAX);
    int n = 0;
    int64_t t = 0;
    for (int64_t b = 0; b < nblk; b++) {
        const char *base = BLOCK(kc, b), *next = b + 1 < nblk ? BLOCK(kc, b + 1) : BLOCK(vc, 0);
        const int64_t jn = L - t < block_size ? L - t : block_size;
        for (int64_t j = 0; j < jn; j++, t++) {
            prefetch_row(next + j * stride_bytes, row_bytes);
            __m256 kf[MAX_U8];
            for (int64_t u = 0; u < NV; u++) kf[u] = load8(base + j * stride_bytes + 8 * u * esz, bf16);
            for (int g = 0; g < G; g++) part[g][n] = dot_part8(qf[g], kf, NV);
            if (++n == 8 || t + 1 == L) {
                for (int g = 0; g < G; g++) flush_scores8(part[g], n, sc, s + g * Lp + t + 1 - n, &mx[g]);
                n = 0;
            }
        }
    }

    /* softmax weights in place (lanes past L: 0), their sums */
    float inv[VEC_G];
    for (int g = 0; g < G; g++) inv[g] = softmax8(s + g * Lp, L, mx[g]);

    /* V pass over column slices of UC vectors: G x UC accumulators (at most 12) in registers. UC is a
     * constant power of two (so it divides NV): a variable slice width kept the accumulators on the
     * stack, 4x slower. */
    const int64_t UC = G == 1 ? 8 : G <= 3 ? 4 : G <= 6 ? 2 : 1, nu = UC;
    float o[VEC_G][MAX_HD] __attribute__((aligned(32)));
    for (int64_t u0 = 0; u0 < NV; u0 += UC) {
        __m256 acc[VEC_G][8];
        for (int g = 0; g < G; g++)
            for (int64_t u = 0; u < nu; u++) acc[g][u] = _mm256_setzero_ps();
        t = 0;
        for (int64_t b = 0; b < nblk; b++) {
            const char *base = BLOCK(vc, b) + 8 * u0 * esz;
            const char *next = u0 == 0 && b + 1 < nblk ? BLOCK(vc, b + 1) : NULL;
            const int64_t jn = L - t < block_size ? L - t : block_size;
            for (int64_t j = 0; j < jn; j++, t++) {
                prefetch_row(next ? next + j * stride_bytes : NULL, row_bytes);
                __m256 vf[8];
                for (int64_t u = 0; u < nu; u++) vf[u] = load8(base + j * stride_bytes + 8 * u * esz, bf16);
                for (int g = 0; g < G; g++) {
                    const __m256 p = _mm256_broadcast_ss(s + g * Lp + t);
                    for (int64_t u = 0; u < nu; u++) acc[g][u] = _mm256_fmadd_ps(p, vf[u], acc[g][u]);
                }
            }
        }
        for (int g = 0; g < G; g++)
            for (int64_t u = 0; u < nu; u++) _mm256_store_ps(o[g] + 8 * (u0 + u), acc[g][u]);
    }
    for (int g = 0; g < G; g++) store_row(out, (i * q_heads + h * G + g) * hd, bf16, hd, o[g], inv[g]);
}

/* One pair with ALL its kv heads (H of them, G query heads each; H * G <= MAX_PAIR_HEADS), reading each
 * token's K and V row of every head at once. The cache holds a token's heads side by side, so a task per
 * (pair, head) reads head_dim values out of every H * head_dim: a strided walk that the 2-core EPYC
 * streams at ~12 GB/s where whole rows stream at ~19 (a C read loop over the same bytes). Each head's
 * sums run in attend256's order with its operations, so its outputs are attend256's, bit for bit; the V
 * pass keeps each head's accumulators in L1 between blocks (ob) and walks a block's rows once per
 * column slice, the block in cache after the first. Scratch, per thread: s H*G*round8(L) floats, qb and
 * ob H*G*head_dim floats each, part 9*H*G vectors (8 partial sums and a running maximum per query head). */
static inline __attribute__((always_inline)) void attend_pair256(
        const void *q, const void *k, const void *v, void *out, const int64_t *blocks, int64_t L, int64_t i,
        const int64_t H, const int G, int64_t q_heads, int64_t block_size, float scale, const int bf16,
        const int64_t hd, float *restrict s, __m256 *restrict qb, float *restrict ob, __m256 *restrict part) {
    const int64_t NV = hd / 8, esz = bf16 ? 2 : 4, Lp = (L + 7) & ~(int64_t)7, HG = H * G;
    const int64_t nblk = (L + block_size - 1) / block_size, row_bytes = hd * esz, stride_bytes = H * row_bytes;
    const __m256 sc = _mm256_set1_ps(scale * 1.4426950408889634f);
    __m256 *mx = part + 8 * HG;
    for (int64_t hg = 0; hg < HG; hg++) {
        for (int64_t u = 0; u < NV; u++) qb[hg * NV + u] = load8((const char *)q + (i * q_heads + hg) * row_bytes + 8 * u * esz, bf16);
        mx[hg] = _mm256_set1_ps(-FLT_MAX);
    }
    int n = 0;
    int64_t t = 0;
    for (int64_t b = 0; b < nblk; b++) {
        const char *base = BLOCK(k, b), *next = b + 1 < nblk ? BLOCK(k, b + 1) : BLOCK(v, 0);
        const int64_t jn = L - t < block_size ? L - t : block_size;
        for (int64_t j = 0; j < jn; j++, t++) {
            prefetch_row(next + j * stride_bytes, stride_bytes);
            for (int64_t h = 0; h < H; h++) {
                __m256 kf[MAX_U8];
                for (int64_t u = 0; u < NV; u++) kf[u] = load8(base + j * stride_bytes + h * row_bytes + 8 * u * esz, bf16);
                for (int g = 0; g < G; g++) part[(h * G + g) * 8 + n] = dot_part8(qb + (h * G + g) * NV, kf, NV);
            }
            if (++n == 8 || t + 1 == L) {
                for (int64_t hg = 0; hg < HG; hg++) flush_scores8(part + hg * 8, n, sc, s + hg * Lp + t + 1 - n, &mx[hg]);
                n = 0;
            }
        }
    }
    float inv[MAX_PAIR_HEADS];
    for (int64_t hg = 0; hg < HG; hg++) {
        inv[hg] = softmax8(s + hg * Lp, L, mx[hg]);
        for (int64_t d = 0; d < hd; d += 8) _mm256_store_ps(ob + hg * hd + d, _mm256_setzero_ps());
    }
    const int64_t UC = G == 1 ? 8 : G <= 3 ? 4 : G <= 6 ? 2 : 1, nu = UC;
    t = 0;
    for (int64_t b = 0; b < nblk; b++) {
        const char *base = BLOCK(v, b), *next = b + 1 < nblk ? BLOCK(v, b + 1) : NULL;
        const int64_t jn = L - t < block_size ? L - t : block_size;
        for (int64_t h = 0; h < H; h++)
            for (int64_t u0 = 0; u0 < NV; u0 += UC) {
                __m256 acc[VEC_G][8];
                for (int g = 0; g < G; g++)
                    for (int64_t u = 0; u < nu; u++) acc[g][u] = _mm256_load_ps(ob + (h * G + g) * hd + 8 * (u0 + u));
                const char *hb = base + h * row_bytes + 8 * u0 * esz;
                const int pf = h == 0 && u0 == 0 && next;
                for (int64_t j = 0; j < jn; j++) {
                    if (pf) prefetch_row(next + j * stride_bytes, stride_bytes);
                    __m256 vf[8];
                    for (int64_t u = 0; u < nu; u++) vf[u] = load8(hb + j * stride_bytes + 8 * u * esz, bf16);
                    for (int g = 0; g < G; g++) {
                        const __m256 p = _mm256_broadcast_ss(s + (h * G + g) * Lp + t + j);
                        for (int64_t u = 0; u < nu; u++) acc[g][u] = _mm256_fmadd_ps(p, vf[u], acc[g][u]);
                    }
                }
                for (int g = 0; g < G; g++)
                    for (int64_t u = 0; u < nu; u++) _mm256_store_ps(ob + (h * G + g) * hd + 8 * (u0 + u), acc[g][u]);
            }
        t += jn;
    }
    for (int64_t hg = 0; hg < HG; hg++) store_row(out, (i * q_heads + hg) * hd, bf16, hd, ob + hg * hd, inv[hg]);
}

typedef void pair_fn(const void *, const void *, const void *, void *, const int64_t *, int64_t, int64_t, int64_t,
                     int64_t, int64_t, float, float *restrict, __m256 *restrict, float *restrict, __m256 *restrict);
#define DEF(G, BF16, HD, NAME)                                                                                      \
    static void pair_##NAME(const void *q, const void *k, const void *v, void *out, const int64_t *blocks, int64_t L, \
                            int64_t i, int64_t H, int64_t q_heads, int64_t block_size, float scale, float *restrict s, \
                            __m256 *restrict qb, float *restrict ob, __m256 *restrict part) {                       \
        attend_pair256(q, k, v, out, blocks, L, i, H, G, q_heads, block_size, scale, BF16, HD, s, qb, ob, part);    \
    }
DEFINE_GROUPS
#undef DEF
#define PROW(P) {pair_##P##1, pair_##P##2, pair_##P##3, pair_##P##4, pair_##P##5, pair_##P##6, pair_##P##7, pair_##P##8}
static pair_fn *const pair_table[2][2][VEC_G] = {{PROW(f32_64_), PROW(f32_128_)}, {PROW(bf16_64_), PROW(bf16_128_)}};
#define HAVE_PAIR 1

typedef void attend_fn(const void *, const void *, const void *, void *, const int64_t *, int64_t, int64_t, int64_t,
                       float, int64_t, int64_t, float *restrict, int64_t);
#define DEF(G, BF16, HD, NAME)                                                                                      \
    static void NAME(const void *q, const void *k, const void *v, void *out, const int64_t *blocks, int64_t L,      \
                     int64_t i, int64_t h, float scale, int64_t q_heads, int64_t tok_stride, float *restrict s,     \
                     int64_t block_size) {                                                                           \
        attend256(q, k, v, out, blocks, L, i, h, G, q_heads, tok_stride, block_size, scale, BF16, HD, s);           \
    }
DEFINE_GROUPS
ATTEND_TABLE
#undef DEF

static void attend_vec(const void *q, const void *k, const void *v, void *out, const int64_t *blocks, int64_t L,
                       int64_t i, int64_t h, int64_t G, int64_t q_heads, int64_t tok_stride, int64_t block_size,
                       float scale, int bf16, int64_t head_dim, float *restrict s) {
    attend_table[bf16 != 0][head_dim == 128][G - 1](q, k, v, out, blocks, L, i, h, scale, q_heads, tok_stride, s,
                                                     block_size);
}
#define HAVE_VEC 1
#define VEC_HD(hd) ((hd) == 64 || (hd) == 128)
#else
#define VEC_G 0
#define HAVE_VEC 0
#define VEC_HD(hd) 0
static void attend_vec(const void *q, const void *k, const void *v, void *out, const int64_t *blocks, int64_t L,
                       int64_t i, int64_t h, int64_t G, int64_t q_heads, int64_t tok_stride, int64_t block_size,
                       float scale, int bf16, int64_t head_dim, float *restrict s) {}
#endif

/* q, out: [pairs, q_heads, head_dim]; k, v: [blocks, block_size, kv_heads, head_dim]; idx: [pairs, nb];
 * lens: [pairs], each <= max_len. bf16: storage is bf16 (else fp32). Returns 0, or -1 if head_dim or
 * the group size exceeds the kernel's limits (nothing written), or if the pair tasks' scratch could not
 * be allocated. */
int paged_decode(const void *q, const void *k, const void *v, void *out, const int64_t *idx, const int64_t *lens,
                 int64_t pairs, int64_t nb, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                 int64_t block_size, int64_t max_len, float scale, int bf16, int threads) {
    const int64_t G = q_heads / kv_heads, tok_stride = kv_heads * head_dim, tasks = pairs * kv_heads;
    if (head_dim > MAX_HD || G > MAX_G || G * kv_heads != q_heads) return -1;
    const int vec = HAVE_VEC && G <= VEC_G && VEC_HD(head_dim);
#ifdef HAVE_PAIR
    /* Several kv heads and enough pairs to share out (4 per thread): one task per pair, every head at once
     * (the same outputs, bit for bit). Fewer pairs keep a task per head, so that a lone sequence still
     * splits its heads over the threads. Interleaved A/B (SmolLM2's 3 kv heads, 32 pairs): 1.14-1.21x at
     * 128 tokens, 1.14-1.37x at 512; its decode steps at batch 32 1.04-1.07x at 128 tokens, 1.08-1.13x at
     * 512. */
    if (vec && kv_heads > 1 && q_heads <= MAX_PAIR_HEADS && pairs >= 4 * threads) {
        int rc = 0;
#pragma omp parallel num_threads(threads)
        {
            const int64_t len = ((max_len > 0 ? max_len : 1) + 15) & ~(int64_t)15;
#define LINES(bytes) (((size_t)(bytes) + 63) & ~(size_t)63) /* aligned_alloc takes whole multiples of 64 */
            float *s = aligned_alloc(64, LINES(sizeof(float) * q_heads * len)),
                  *ob = aligned_alloc(64, LINES(sizeof(float) * q_heads * head_dim));
            __m256 *qb = aligned_alloc(64, LINES(sizeof(float) * q_heads * head_dim)),
                   *part = aligned_alloc(64, LINES(sizeof(__m256) * 9 * q_heads));
#undef LINES
            if (!s || !qb || !ob || !part) {
#pragma omp atomic write
                rc = -1;
            }
#pragma omp barrier
            if (rc == 0) {
#pragma omp for schedule(static)
                for (int64_t i = 0; i < pairs; i++)
                    pair_table[bf16 != 0][head_dim == 128][G - 1](q, k, v, out, idx + i * nb, lens[i], i, kv_heads,
                                                                    q_heads, block_size, scale, s, qb, ob, part);
            }
            free(s), free(qb), free(ob), free(part);
        }
        return rc;
    }
#endif
#pragma omp parallel num_threads(threads)
    {
        /* scores: the vector path pads each query head's row to whole 16-token chunks */
        const int64_t len = ((max_len > 0 ? max_len : 1) + 15) & ~(int64_t)15;
        float *s = aligned_alloc(64, sizeof(float) * G * len);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t i = task / kv_heads, h = task % kv_heads;
            if (vec)
                attend_vec(q, k, v, out, idx + i * nb, lens[i], i, h, G, q_heads, tok_stride, block_size, scale, bf16,
                           head_dim, s);
            else
                attend_portable(q, k, v, out, idx + i * nb, lens[i], i, h, G, q_heads, tok_stride, block_size, scale,
                                bf16, head_dim, s);
        }
        free(s);
    }
    return 0;
}
