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
#include <string.h>

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
        uint32_t u;
        memcpy(&u, &v, 4);
        u += 0x7FFFu + ((u >> 16) & 1u);
        ((uint16_t *)y)[at] = (uint16_t)(u >> 16);
    }
}

/* nb <= NB rows of W (n0..) against R <= 4 x rows (m0..). Called with constant R and nb, so the loops
 * unroll and the accumulators stay in registers. */
TGT static inline __attribute__((always_inline)) void block(const uint16_t *x, int64_t ldx, int64_t m0, int R, const uint16_t *W, int64_t ldw,
                             int64_t n0, int nb, int64_t K, void *y, int64_t ldy, int out_f32) {
    __m512 acc[4][NB];
    for (int m = 0; m < 4; m++)
        for (int j = 0; j < NB; j++) acc[m][j] = _mm512_setzero_ps();
    const int64_t Kfull = K & ~(int64_t)31;
    for (int64_t k = 0; k <= Kfull; k += 32) {
        const __mmask32 mask = k < Kfull ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1ull << (K - Kfull)) - 1);
        if (k == Kfull && K == Kfull) break;
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

/* Returns 0, or -1 if M is outside 1..8 or the CPU lacks AVX-512 BF16 (nothing written). */
TGT int gemv_bf16(const uint16_t *x, int64_t M, int64_t ldx, const uint16_t *W, int64_t N, int64_t K, int64_t ldw,
                  void *y, int64_t ldy, int out_f32, int threads) {
    if (M < 1 || M > 8 || !gemv_bf16_supported()) return -1;
    const int64_t blocks = (N + NB - 1) / NB;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * NB;
        const int nb = (int)(N - n0 < NB ? N - n0 : NB);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int R = (int)(M - m0 < 4 ? M - m0 : 4);
            if (nb == NB) {
                switch (R) {
                case 1: block(x, ldx, m0, 1, W, ldw, n0, NB, K, y, ldy, out_f32); break;
                case 2: block(x, ldx, m0, 2, W, ldw, n0, NB, K, y, ldy, out_f32); break;
                case 3: block(x, ldx, m0, 3, W, ldw, n0, NB, K, y, ldy, out_f32); break;
                default: block(x, ldx, m0, 4, W, ldw, n0, NB, K, y, ldy, out_f32);
                }
            } else { /* the last, partial block of W rows */
                block(x, ldx, m0, R, W, ldw, n0, nb, K, y, ldy, out_f32);
            }
        }
    }
    return 0;
}

#else
int gemv_bf16_supported(void) { return 0; }
int gemv_bf16(const uint16_t *x, int64_t M, int64_t ldx, const uint16_t *W, int64_t N, int64_t K, int64_t ldw,
              void *y, int64_t ldy, int out_f32, int threads) {
    return -1;
}
#endif
