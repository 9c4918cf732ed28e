/* bf16 products of a few rows on the CPU: y[M, N] = x[M, K] . W[N, K]^T for M <= 8, in fp32 accumulators.
 *
 * At a handful of rows a product is bound by reading W once: every weight of the model per decode
 * step. ATen's bf16 matrix-vector product and oneDNN's GEMM read it at ~6-10 GB/s on the 2-core
 * reference machine, where a plain sum reads ~17 GB/s. This kernel streams each row of W once with
 * AVX-512 BF16 dot products (vdpbf16ps: 32 products per instruction, exact products, fp32 sums) and
 * uses it for every x row while it is in registers. W rows may be strided (a column prefix of a wider
 * matrix, as the mixed-chain LM head takes), x rows too; y is written bf16 (rounded to nearest even)
 * or fp32.
 *
 * x86-64 with AVX-512 BF16 only (checked at run time: gemv_bf16_supported); the Python side keeps the
 * torch path everywhere else.
 */
#include <stdint.h>

#include "bf16.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TGT __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define NB 4  /* W rows per inner block */
#define PF_ROWS 8  /* prefetch W this many rows ahead (measured: 8-16 best, 1.7x at one row) */

int gemv_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
}

static inline void put(void *y, int64_t at, int out_f32, float v) {
    if (out_f32) {
        ((float *)y)[at] = v;
    } else {
        ((uint16_t *)y)[at] = f32_to_bf16(v);
    }
}

/* nb <= NB rows of W (n0..) against R <= MAXR x rows (m0..). Called with constant R and nb, so the loops
 * unroll and the accumulators (R x nb <= 16 of the 32 vector registers) stay in registers. */
#define MAXR 8
TGT static inline __attribute__((always_inline)) void block(const uint16_t *x, int64_t ldx, int64_t m0, const int R,
                                                            const uint16_t *W, int64_t ldw, int64_t n0, const int nb,
                                                            int64_t K, void *y, int64_t ldy, int out_f32) {
    __m512 acc[MAXR][NB];
    for (int m = 0; m < R; m++)
        for (int j = 0; j < nb; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 mask = K - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - k)) - 1);
        __m512i w[NB];
        for (int j = 0; j < nb; j++) {
            w[j] = _mm512_maskz_loadu_epi16(mask, W + (n0 + j) * ldw + k);
            _mm_prefetch((const char *)(W + (n0 + j + PF_ROWS) * ldw + k), _MM_HINT_T0);
        }
        for (int m = 0; m < R; m++) {
            const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + (m0 + m) * ldx + k);
            for (int j = 0; j < nb; j++)
                acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)xv, (__m512bh)w[j]);
        }
    }
    for (int m = 0; m < R; m++)
        for (int j = 0; j < nb; j++) put(y, (m0 + m) * ldy + n0 + j, out_f32, _mm512_reduce_add_ps(acc[m][j]));
}

/* All M rows against W rows n0..: up to 4 rows take 4 W rows per pass, 5-8 rows take 3 (at most 24 accumulators). */
#define CASE(R, NBX) case R: block(x, ldx, 0, R, W, ldw, n0, NBX, K, y, ldy, out_f32); break;
TGT static void rows_block(const uint16_t *x, int64_t ldx, int64_t M, const uint16_t *W, int64_t ldw, int64_t n0,
                           int64_t K, void *y, int64_t ldy, int out_f32) {
    switch (M) {
    CASE(1, 4) CASE(2, 4) CASE(3, 4) CASE(4, 4) CASE(5, 3) CASE(6, 3) CASE(7, 3) CASE(8, 3)
    }
}

/* Returns 0, or -1 if M is outside 1..8 or the CPU lacks AVX-512 BF16 (nothing written). */
TGT int gemv_bf16(const uint16_t *x, int64_t M, int64_t ldx, const uint16_t *W, int64_t N, int64_t K, int64_t ldw,
                  void *y, int64_t ldy, int out_f32, int threads) {
    if (M < 1 || M > 8 || !gemv_bf16_supported()) return -1;
    const int64_t step = M <= 4 ? 4 : 3, full = N / step;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < full; b++)
        rows_block(x, ldx, M, W, ldw, b * step, K, y, ldy, out_f32);
    for (int64_t n = full * step; n < N; n++) /* the last W rows, one at a time */
        for (int64_t m = 0; m < M; m++) block(x, ldx, m, 1, W, ldw, n, 1, K, y, ldy, out_f32);
    return 0;
}

#else
int gemv_bf16_supported(void) { return 0; }
int gemv_bf16(const uint16_t *x, int64_t M, int64_t ldx, const uint16_t *W, int64_t N, int64_t K, int64_t ldw,
              void *y, int64_t ldy, int out_f32, int threads) {
    return -1;
}
#endif
