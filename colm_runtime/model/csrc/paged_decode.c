/* Decode attention that reads the paged K/V cache in place (CPU).
 *
 * One query token per pair; pair i attends tokens 0..lens[i]-1 of its block list idx[i]. The cache of
 * one layer is [blocks, block_size, kv_heads, head_dim]; q and out are [pairs, q_heads, head_dim], and
 * q head g reads kv head g / (q_heads / kv_heads) (grouped-query attention). Scores, softmax and the
 * weighted sum are computed in fp32 as a two-pass softmax: s = q.k * scale, p = exp(s - max s),
 * out = sum p v / sum p. Each (pair, kv head) is one task with its own fixed summation order, so a
 * pair's output depends neither on the other pairs of the batch nor on the thread count.
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

/* One (pair, kv head): G query heads over L tokens. hd is a compile-time constant in the callers below,
 * so the dot products and the weighted sums unroll and vectorise. */
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

/* q, out: [pairs, q_heads, head_dim]; k, v: [blocks, block_size, kv_heads, head_dim]; idx: [pairs, nb];
 * lens: [pairs], each <= max_len. bf16: storage is bf16 (else fp32). Returns 0, or -1 if head_dim or
 * the group size exceeds the kernel's limits (nothing written). */
int paged_decode(const void *q, const void *k, const void *v, void *out, const int64_t *idx, const int64_t *lens,
                 int64_t pairs, int64_t nb, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                 int64_t block_size, int64_t max_len, float scale, int bf16, int threads) {
    const int64_t G = q_heads / kv_heads, tok_stride = kv_heads * head_dim, tasks = pairs * kv_heads;
    if (head_dim > MAX_HD || G > MAX_G || G * kv_heads != q_heads) return -1;
#pragma omp parallel num_threads(threads)
    {
        float *s = malloc(sizeof(float) * G * (max_len > 0 ? max_len : 1));
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t i = task / kv_heads, h = task % kv_heads;
            const int64_t *blocks = idx + i * nb;
            switch (head_dim) { /* the common head sizes get their own unrolled code */
            case 64:
                attend(q, k, v, out, blocks, lens[i], i, h, G, q_heads, tok_stride, block_size, scale, bf16, 64, s);
                break;
            case 128:
                attend(q, k, v, out, blocks, lens[i], i, h, G, q_heads, tok_stride, block_size, scale, bf16, 128, s);
                break;
            default:
                attend(q, k, v, out, blocks, lens[i], i, h, G, q_heads, tok_stride, block_size, scale, bf16,
                       head_dim, s);
            }
        }
        free(s);
    }
    return 0;
}
