/* RMSNorm of bf16 rows, rounded as transformers' LlamaRMSNorm rounds (and as layers.py's torch path):
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
