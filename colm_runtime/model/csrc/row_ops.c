/* Row-wise ops of a step, one C pass each instead of several torch ops: RMSNorm, SwiGLU and rope + K/V
 * store, each in bf16 and fp32 (the Python path and layers_cpu.c's one-call layers run the same ones).
 *
 * RMSNorm of bf16 rows, rounded as transformers' LlamaRMSNorm rounds (and as layers.py's torch path):
 * per segment of c values, y = bf16(x * rsqrt(mean(x^2) + eps)) computed in fp32, then
 * out = bf16(y * w) with the product in fp32. A row of n * c values is n segments (one per chain),
 * segment j scaled by w[j*c : (j+1)*c]. One pass per row instead of torch's cast, square, mean, rsqrt,
 * multiply, cast and weight multiply as separate ops.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

/* x: rows of n*c bf16 values, row stride ldx; w: n*c bf16; out: rows x n*c, contiguous. */
void rms_norm_bf16(const uint16_t *x, int64_t rows, int64_t ldx, const uint16_t *w, int64_t n, int64_t c,
                   float eps, uint16_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n * c >= 16384)
    for (int64_t r = 0; r < rows * n; r++) {
        const uint16_t *xs = x + (r / n) * ldx + (r % n) * c;
        const uint16_t *ws = w + (r % n) * c;
        uint16_t *os = out + r * c;
        float ss = 0.f;
        for (int64_t i = 0; i < c; i++) {
            const float v = bf16_to_f32(xs[i]);
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(ss / (float)c + eps);
        for (int64_t i = 0; i < c; i++) os[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(bf16_to_f32(xs[i]) * inv)) * bf16_to_f32(ws[i]));
    }
}

/* The same in fp32 (F.rms_norm's y = x * rsqrt(mean(x^2) + eps) * w, the sum in another order): one pass
 * over a decode step's rows instead of the ~6 ops F.rms_norm dispatches on the CPU. */
void rms_norm_f32(const float *x, int64_t rows, int64_t ldx, const float *w, int64_t n, int64_t c, float eps,
                  float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n * c >= 16384)
    for (int64_t r = 0; r < rows * n; r++) {
        const float *xs = x + (r / n) * ldx + (r % n) * c;
        const float *ws = w + (r % n) * c;
        float *os = out + r * c;
        float ss = 0.f;
        for (int64_t i = 0; i < c; i++) ss += xs[i] * xs[i];
        const float inv = 1.f / sqrtf(ss / (float)c + eps);
        for (int64_t i = 0; i < c; i++) os[i] = xs[i] * inv * ws[i];
    }
}

/* SwiGLU of fp32 rows: gu rows hold, per chain, F gate values then F up values; out[t, j*F + i] =
 * silu(g) * u = g * u / (1 + exp(-g)) of chain j. One pass instead of unflatten, unbind, silu, multiply
 * and flatten (expf vectorised under fast-math). */
void swiglu_f32(const float *gu, int64_t rows, int64_t ldgu, int64_t chains, int64_t F, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * chains * F >= 32768)
    for (int64_t r = 0; r < rows * chains; r++) {
        const float *g = gu + (r / chains) * ldgu + (r % chains) * 2 * F, *u = g + F;
        float *o = out + r * F;
        for (int64_t i = 0; i < F; i++) o[i] = g[i] * u[i] / (1.f + expf(-g[i]));
    }
}

/* The same of bf16 rows, rounded as torch's F.silu(g) * u rounds in bf16: silu in fp32 rounded to bf16,
 * then the product in fp32 rounded to bf16. */
void swiglu_bf16(const uint16_t *gu, int64_t rows, int64_t ldgu, int64_t chains, int64_t F, uint16_t *out,
                 int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * chains * F >= 32768)
    for (int64_t r = 0; r < rows * chains; r++) {
        const uint16_t *g = gu + (r / chains) * ldgu + (r % chains) * 2 * F, *u = g + F;
        uint16_t *o = out + r * F;
        for (int64_t i = 0; i < F; i++) {
            const float gv = bf16_to_f32(g[i]);
            o[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(gv / (1.f + expf(-gv)))) * bf16_to_f32(u[i]));
        }
    }
}

/* Rotary embedding of one step's queries and keys, and the new K/V stored into the paged cache, for
 * models with equal chains, fp32 and bf16 (attention.py _rope_and_store; one call per layer instead of
 * ~15 small torch ops). y: [T, P*(C+2H)*hd] rows (stride ldy): per pool, C query heads, H key heads, H value heads;
 * cos, sin: [T, hd] (rotate-half layout, sin's first half negated: x*cos + rotate(x)*sin); q_out:
 * [T, P*C, hd]; kc, vc: one layer's cache as [slots, H, hd]; slots[i]: where pool-major K/V row
 * rows[i] = p*T + t goes (rows NULL: row i). */
static inline void rope_head(const float *x, const float *c, const float *s, int64_t hd, float *o) {
    const int64_t half = hd / 2;
    for (int64_t d = 0; d < half; d++) o[d] = x[d] * c[d] + x[d + half] * s[d];
    for (int64_t d = half; d < hd; d++) o[d] = x[d] * c[d] + x[d - half] * s[d];
}

/* bf16 rows and tables, rounded as layers.apply_rope rounds with tables in bf16: x*cos rounded to bf16,
 * then that plus rotate(x)*sin rounded to bf16 (torch's mul, then addcmul). */
static inline void rope_head_bf16(const uint16_t *x, const uint16_t *c, const uint16_t *s, int64_t hd, uint16_t *o) {
    const int64_t half = hd / 2;
    for (int64_t d = 0; d < hd; d++) {
        const float xc = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[d]) * bf16_to_f32(c[d])));
        o[d] = f32_to_bf16(xc + bf16_to_f32(x[d < half ? d + half : d - half]) * bf16_to_f32(s[d]));
    }
}

/* One definition for both dtypes: E the element type, ROPE its rope_head. */
#define ROPE_STORE(NAME, E, ROPE)                                                                                      \
    void NAME(const E *y, int64_t T, int64_t ldy, int64_t P, int64_t C, int64_t H, int64_t hd, const E *cos,           \
              const E *sin, E *q_out, E *kc, E *vc, const int64_t *slots, const int64_t *rows, int64_t R,              \
              int threads) {                                                                                           \
        const int64_t blk = (C + 2 * H) * hd;                                                                          \
        _Pragma("omp parallel num_threads(threads) if (T * P * blk >= 65536)") {                                       \
            _Pragma("omp for schedule(static) nowait") for (int64_t t = 0; t < T; t++)                                 \
                for (int64_t p = 0; p < P; p++)                                                                        \
                    for (int64_t h = 0; h < C; h++)                                                                    \
                        ROPE(y + t * ldy + p * blk + h * hd, cos + t * hd, sin + t * hd, hd,                           \
                             q_out + ((t * P + p) * C + h) * hd);                                                      \
            _Pragma("omp for schedule(static)") for (int64_t i = 0; i < R; i++) {                                      \
                const int64_t r = rows ? rows[i] : i, p = r / T, t = r % T;                                            \
                const E *k = y + t * ldy + p * blk + C * hd, *v = k + H * hd;                                          \
                E *kd = kc + slots[i] * H * hd, *vd = vc + slots[i] * H * hd;                                          \
                for (int64_t h = 0; h < H; h++) ROPE(k + h * hd, cos + t * hd, sin + t * hd, hd, kd + h * hd);         \
                for (int64_t e = 0; e < H * hd; e++) vd[e] = v[e];                                                     \
            }                                                                                                          \
        }                                                                                                              \
    }

ROPE_STORE(rope_store_f32, float, rope_head)
ROPE_STORE(rope_store_bf16, uint16_t, rope_head_bf16)
