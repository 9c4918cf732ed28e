/* fp32 products on AVX2 + FMA: y[M, N] = x[M, K] . W[N, K]^T (+ bias): gemm_f32 for a decode batch's
 * few rows (M <= 64), gemm_f32_tall (below) for taller ones.
 *
 * At a few dozen rows a product is bound by reading W (every weight of the model, once per decode
 * step), yet on a 2-core AVX2 machine (AMD EPYC, no AVX-512) MKL's sgemm reads W at 4-7 GB/s at 1-32
 * rows where a plain sum reads ~18 GB/s: it packs W for every call. This kernel reads each W row
 * where it lies (rows may be strided: a column prefix of a wider matrix, as a multi-chain LM head
 * takes), keeps a block of 3 W rows in L1 while every group of up to 4 x rows passes over it, and sums
 * R x nb products in 8-wide fp32 FMA accumulators (12 of the 16 ymm registers at R = 4). Threads split
 * W's rows in contiguous ranges, so each streams its own part of W once.
 *
 * x86-64 with AVX2 and FMA only (checked at run time: gemm_f32_supported); the Python side keeps
 * ATen's product everywhere else.
 *
 * row_k (NULL: K for every row): a mixed-chain batch's LM head, rows ordered by chain count, descending:
 * row m uses only x[m, :row_k[m]] (non-increasing in m) and its other columns must be zero. The kernels
 * then stop each group of rows at the K of its first row, so the head's FLOPs follow the chains each row
 * uses while W is still read once for all rows.
 */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "bf16.h"

#if defined(__x86_64__)
#include <immintrin.h>

#define TGT __attribute__((target("avx2,fma")))
#define NB 3  /* W rows per block */
#define MR 4  /* x rows per group */
#define PF 4  /* prefetch W this many blocks ahead (interleaved A/B: 1.1-1.4x at 4-8 rows, ~1.0x at one) */

int gemm_f32_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

TGT static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 bf16 values widened to fp32 in a register (exact: a bf16 is an fp32's high half). */
TGT static inline __m256 widen8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* R x rows (m0..) against nb W rows (n0..) over all of K. Called with constant R, nb and w16, so the loops
 * unroll and the R x nb accumulators stay in registers. w16: W is bf16 (Wv is uint16_t *), widened in
 * registers as it is loaded: the sums are those on the widened W, bit for bit, with W read at half the
 * bytes and nothing written to scratch. */
TGT static inline __attribute__((always_inline)) void block(const float *x, int64_t ldx, int64_t m0, const int R,
                                                            const void *Wv, int64_t ldw, int64_t n0, const int nb,
                                                            int64_t K, float *y, int64_t ldy, const float *bias,
                                                            const int w16) {
    __m256 acc[MR][NB];
    for (int m = 0; m < R; m++)
        for (int j = 0; j < nb; j++) acc[m][j] = _mm256_setzero_ps();
    const float *wr[NB], *xr[MR];
    const uint16_t *wh[NB];
    for (int j = 0; j < nb; j++) {
        wr[j] = (const float *)Wv + (n0 + j) * ldw;
        wh[j] = (const uint16_t *)Wv + (n0 + j) * ldw;
    }
    for (int m = 0; m < R; m++) xr[m] = x + (m0 + m) * ldx;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 w[NB];
        for (int j = 0; j < nb; j++) w[j] = w16 ? widen8(wh[j] + k) : _mm256_loadu_ps(wr[j] + k);
        if ((k & (w16 ? 31 : 15)) == 0)  /* one per 64-byte line: W's rows PF blocks ahead (past W's end: a no-op) */
            for (int j = 0; j < nb; j++)
                _mm_prefetch(w16 ? (const char *)(wh[j] + PF * NB * ldw + k)
                                 : (const char *)(wr[j] + PF * NB * ldw + k), _MM_HINT_T0);
        for (int m = 0; m < R; m++) {
            const __m256 xv = _mm256_loadu_ps(xr[m] + k);
            for (int j = 0; j < nb; j++) acc[m][j] = _mm256_fmadd_ps(xv, w[j], acc[m][j]);
        }
    }
    if (k < K) { /* the last K % 8 values: masked loads read nothing past the row */
        const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(K - k)), idx);
        __m256 w[NB];
        for (int j = 0; j < nb; j++) {
            if (w16) {
                uint16_t t[8] = {0};
                for (int64_t i = 0; i < K - k; i++) t[i] = wh[j][k + i];
                w[j] = widen8(t);
            } else {
                w[j] = _mm256_maskload_ps(wr[j] + k, mask);
            }
        }
        for (int m = 0; m < R; m++) {
            const __m256 xv = _mm256_maskload_ps(xr[m] + k, mask);
            for (int j = 0; j < nb; j++) acc[m][j] = _mm256_fmadd_ps(xv, w[j], acc[m][j]);
        }
    }
    for (int m = 0; m < R; m++)
        for (int j = 0; j < nb; j++) {
            float s = hsum(acc[m][j]);
            if (bias) s += bias[n0 + j];
            y[(m0 + m) * ldy + n0 + j] = s;
        }
}

/* Every x row against nb W rows from n0: groups of MR rows, then the rest; a group stops at its first
 * row's K. */
#define GROUP(R) block(x, ldx, m, R, W, ldw, n0, nb_c, row_k ? row_k[m] : K, y, ldy, bias, W16)
#define ROWS(NBC)                                                                      \
    do {                                                                               \
        const int nb_c = NBC;                                                          \
        int64_t m = 0;                                                                 \
        for (; m + MR <= M; m += MR) GROUP(MR);                                        \
        switch (M - m) {                                                               \
        case 1: GROUP(1); break;                                                       \
        case 2: GROUP(2); break;                                                       \
        case 3: GROUP(3); break;                                                       \
        }                                                                              \
    } while (0)

#define W16 0
TGT static void rows_block(const float *x, int64_t ldx, int64_t M, const float *W, int64_t ldw, int64_t n0, int nb,
                           int64_t K, const int64_t *row_k, float *y, int64_t ldy, const float *bias) {
    if (nb == NB) ROWS(NB);
    else if (nb == 2) ROWS(2);
    else ROWS(1);
}
#undef W16
#define W16 1
/* The same with W in bf16, widened in registers (gemm_bf16w below its tall rows). */
TGT static void rows_block16(const float *x, int64_t ldx, int64_t M, const uint16_t *W, int64_t ldw, int64_t n0,
                             int nb, int64_t K, const int64_t *row_k, float *y, int64_t ldy, const float *bias) {
    if (nb == NB) ROWS(NB);
    else if (nb == 2) ROWS(2);
    else ROWS(1);
}
#undef W16

/* Returns 0, or -1 if M is outside 1..64 or the CPU lacks AVX2/FMA (nothing written). */
TGT int gemm_f32(const float *x, int64_t M, int64_t ldx, const float *W, int64_t N, int64_t K, int64_t ldw,
                 float *y, int64_t ldy, const float *bias, const int64_t *row_k, int threads) {
    if (M < 1 || M > 64 || !gemm_f32_supported()) return -1;
    const int64_t blocks = (N + NB - 1) / NB;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * NB;
        const int nb = N - n0 < NB ? (int)(N - n0) : NB;
        rows_block(x, ldx, M, W, ldw, n0, nb, K, row_k, y, ldy, bias);
    }
    return 0;
}

/* Taller products (prefill, large batches): y^T = W . x^T with x^T packed per call into panels of 16
 * rows, [K][16] each (zero-padded), and W read where it lies. A 6 x 16 block of y^T sums in 12
 * accumulators: per k, two loads of the x panel, six broadcasts of W values, twelve FMAs. A block of 6
 * W rows stays in L1 while every panel passes over it; the panels (M x K floats) stay in L2. A panel's
 * two halves of 8 rows each stop at their own K: the last panel's padding rows cost nothing past k = 0
 * (21 rows cost 24, not 32), and with row_k each half stops at its first row's K. */
#define TR 6   /* W rows per tall block */
#define TP 16  /* x rows per panel */

/* One step of k: two loads of the x panel, six broadcasts of W values, twelve FMAs (HALF: the first 8
 * rows only, six FMAs). */
#define TALL_K(k)                                                                                  \
    do {                                                                                           \
        const __m256 b0 = _mm256_load_ps(xp + (k) * TP), b1 = _mm256_load_ps(xp + (k) * TP + 8);   \
        _Pragma("GCC unroll 6") for (int r = 0; r < TR; r++) {                                    \
            const __m256 a = _mm256_broadcast_ss(wr[r] + (k));                                     \
            c[r][0] = _mm256_fmadd_ps(a, b0, c[r][0]);                                             \
            c[r][1] = _mm256_fmadd_ps(a, b1, c[r][1]);                                             \
        }                                                                                          \
    } while (0)
#define TALL_K_HALF(k)                                                                             \
    do {                                                                                           \
        const __m256 b0 = _mm256_load_ps(xp + (k) * TP);                                           \
        _Pragma("GCC unroll 6") for (int r = 0; r < TR; r++)                                      \
            c[r][0] = _mm256_fmadd_ps(_mm256_broadcast_ss(wr[r] + (k)), b0, c[r][0]);              \
    } while (0)
#define PREFETCH_NEXT(k)                                                                           \
    _Pragma("GCC unroll 6") for (int r = 0; r < TR; r++) _mm_prefetch((const char *)(wn[r] + (k)), _MM_HINT_T1)

/* Rows m0.. of one panel against a block of TR W rows: all 16 rows over k < k1, the first 8 over k1 <= k
 * < k0. wn: the next block's W rows, fetched into L2 a line per row per 16 k while this block computes
 * (NULL: no prefetch). At 32 rows (two panels over each block) W's reads otherwise stall the FMAs:
 * interleaved A/B on cold weights, 1.13-1.38x at 21-32 rows, 1.05-1.08x at 128; ~1.0x (0.9-1.0) where
 * W has only 192 rows (benchmarks/gemm_f32_ab.py).
 * Inlined into each caller: called, gcc kept two of the prefetch row addresses on the stack and shuffled
 * accumulators between registers in the k loop; inlined, the one-chain LM head (32 rows, K 192 of 576)
 * runs 1.28-1.31x faster, the full head 1.07-1.09x, decode steps 1.07-1.15x (interleaved builds). */
TGT static inline __attribute__((always_inline)) void tall_block(const float *const wr[TR], const float *const wn[TR],
                                                                 int nvalid, const float *xp, int64_t k0, int64_t k1,
                                                                 int64_t m0, int64_t M, float *y, int64_t ldy,
                                                                 int64_t n0, const float *bias) {
    __m256 c[TR][2];
#pragma GCC unroll 6
    for (int r = 0; r < TR; r++) c[r][0] = c[r][1] = _mm256_setzero_ps();
    int64_t k = 0;
    if (wn)
        for (; k + 16 <= k1; k += 16) {
            PREFETCH_NEXT(k);
#pragma GCC unroll 16
            for (int kk = 0; kk < 16; kk++) TALL_K(k + kk);
        }
#pragma GCC unroll 4  /* interleaved A/B of two builds: 1.07-1.11x at 32 and 128 rows, 0.98-1.09x in a first run */
    for (; k < k1; k++) TALL_K(k);
    if (wn)
        for (; k + 16 <= k0; k += 16) {
            PREFETCH_NEXT(k);
#pragma GCC unroll 16
            for (int kk = 0; kk < 16; kk++) TALL_K_HALF(k + kk);
        }
#pragma GCC unroll 4
    for (; k < k0; k++) TALL_K_HALF(k);
    /* Out of the registers with constant indices only: a variable index into c would keep it in memory
     * (gcc then stores all 12 accumulators on every k). */
    float v[TR][TP];
#pragma GCC unroll 6
    for (int r = 0; r < TR; r++) {
        _mm256_storeu_ps(v[r], c[r][0]);
        _mm256_storeu_ps(v[r] + 8, c[r][1]);
    }
    const int64_t mrows = M - m0 < TP ? M - m0 : TP;
    float b[TR];
    for (int r = 0; r < TR; r++) b[r] = bias && r < nvalid ? bias[n0 + r] : 0.f;
    /* Row by row: each output row's nvalid values are adjacent, and rows lie ldy apart (with a head's
     * 49152 columns, a page apart): one address translation per row, not per value. */
    for (int64_t m = 0; m < mrows; m++) {
        float *out = y + (m0 + m) * ldy + n0;
        for (int r = 0; r < nvalid; r++) out[r] = v[r][m] + b[r];
    }
}

/* Panel p of x's M rows: [K][TP] values, rows past M zero. */
static inline void pack_panel(const float *x, int64_t ldx, int64_t M, int64_t K, int64_t p, float *xp) {
    for (int64_t k = 0; k < K; k++)
        for (int64_t i = 0; i < TP; i++) {
            const int64_t m = p * TP + i;
            xp[(p * K + k) * TP + i] = m < M ? x[m * ldx + k] : 0.f;
        }
}

/* Any M >= 1; returns 0, or -1 without AVX2/FMA or memory for the panels (nothing written). */
TGT int gemm_f32_tall(const float *x, int64_t M, int64_t ldx, const float *W, int64_t N, int64_t K, int64_t ldw,
                      float *y, int64_t ldy, const float *bias, const int64_t *row_k, int threads) {
    if (M < 1 || !gemm_f32_supported()) return -1;
    const int64_t panels = (M + TP - 1) / TP;
    float *xp = aligned_alloc(64, (size_t)(panels * K * TP * sizeof(float) + 64));
    if (!xp) return -1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) pack_panel(x, ldx, M, K, p, xp);
        const int64_t blocks = (N + TR - 1) / TR;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n0 = b * TR;
            const int nvalid = N - n0 < TR ? (int)(N - n0) : TR;
            const float *wr[TR], *wn[TR];
            for (int r = 0; r < TR; r++) wr[r] = W + (n0 + (r < nvalid ? r : nvalid - 1)) * ldw;
            const int next = n0 + 2 * TR <= N;  /* a whole next block: prefetch it while panel 0 computes */
            for (int r = 0; r < TR; r++) wn[r] = W + (n0 + TR + r) * ldw;
            for (int64_t p = 0; p < panels; p++) {
                const int64_t m0 = p * TP, m1 = m0 + TP / 2;  /* the first row of each half */
                const int64_t k0 = row_k ? row_k[m0] : K, k1 = m1 >= M ? 0 : row_k ? row_k[m1] : K;
                tall_block(wr, p == 0 && next ? wn : NULL, nvalid, xp + p * K * TP, k0, k1, m0, M, y, ldy, n0, bias);
            }
        }
    }
    free(xp);
    return 0;
}

/* bf16 products on the same kernels, for CPUs without a bf16 dot product (no AVX-512 BF16, no AMX), where
 * ATen emulates them (a decode step of SmolLM2's shape at batch 32: 0.6 s, against 85 ms in fp32):
 * out[M, N] = x[M, K] . W[N, K]^T, x and W bf16, out bf16 (rounded to nearest even) or fp32 (out_f32).
 * x is widened once into fp32 (panels for the tall kernel). Below `tall` rows the few-row kernel widens W
 * in registers as it loads it (rows_block16); from `tall` rows each thread widens its block of W rows
 * into fp32 scratch in L1 and runs the tall kernel on it. Widening a bf16 is exact, so the sums are
 * gemm_f32 / gemm_f32_tall's on the widened operands, bit for bit, while W is read from memory at half
 * the bytes. row_k as in gemm_f32. */
TGT static inline void widen_rows(const uint16_t *W, int64_t ldw, int64_t n0, int nvalid, int nrows, int64_t K,
                                  float *dst, int64_t ldd, int64_t pf) {
    for (int r = 0; r < nrows; r++) {  /* rows past nvalid repeat the last valid one (tall_block's padding) */
        const uint16_t *src = W + (n0 + (r < nvalid ? r : nvalid - 1)) * ldw;
        float *d = dst + r * ldd;
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            if (pf && (k & 31) == 0) _mm_prefetch((const char *)(src + pf * ldw + k), _MM_HINT_T0);
            const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + k)));
            _mm256_storeu_ps(d + k, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
        }
        for (; k < K; k++) d[k] = bf16_to_f32(src[k]);
    }
}

/* Any M >= 1; returns 0, or -1 without AVX2/FMA or memory (nothing written). */
TGT int gemm_bf16w(const uint16_t *x, int64_t M, int64_t ldx, const uint16_t *W, int64_t N, int64_t K, int64_t ldw,
                   void *out, int64_t ldo, int out_f32, const int64_t *row_k, int64_t tall, int threads) {
    if (M < 1 || !gemm_f32_supported()) return -1;
    const int is_tall = M >= tall, per = is_tall ? TR : NB;
    const int64_t panels = is_tall ? (M + TP - 1) / TP : 0, blocks = (N + per - 1) / per;
    float *xf = malloc(sizeof(float) * (size_t)(M * K)),
          *xp = is_tall ? aligned_alloc(64, (size_t)(panels * K * TP * sizeof(float) + 64)) : NULL,
          *yf = out_f32 ? out : malloc(sizeof(float) * (size_t)(M * N));
    const int64_t ldy = out_f32 ? ldo : N;
    int rc = (!xf || (is_tall && !xp) || !yf) ? -1 : 0;
#pragma omp parallel num_threads(threads) if (rc == 0)
    {
        float *wf = is_tall ? aligned_alloc(64, (size_t)((TR * K * sizeof(float) + 63) / 64 * 64)) : NULL;
        if (is_tall && !wf) {
#pragma omp atomic write
            rc = -1;
        }
#pragma omp barrier
        if (rc == 0) {
#pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++) widen_rows(x, ldx, m, 1, 1, K, xf + m * K, K, 0);
            if (is_tall) {
#pragma omp for schedule(static)
                for (int64_t p = 0; p < panels; p++) pack_panel(xf, K, M, K, p, xp);
            }
#pragma omp for schedule(static)
            for (int64_t b = 0; b < blocks; b++) {
                const int64_t n0 = b * per;
                const int nvalid = N - n0 < per ? (int)(N - n0) : per;
                if (!is_tall) {  /* W widened in registers: no scratch */
                    rows_block16(xf, K, M, W, ldw, n0, nvalid, K, row_k, yf, ldy, NULL);
                    continue;
                }
                widen_rows(W, ldw, n0, nvalid, TR, K, wf, K, PF * per);
                const float *wr[TR];
                for (int r = 0; r < TR; r++) wr[r] = wf + r * K;
                for (int64_t p = 0; p < panels; p++) {
                    const int64_t m0 = p * TP, m1 = m0 + TP / 2;
                    const int64_t k0 = row_k ? row_k[m0] : K, k1 = m1 >= M ? 0 : row_k ? row_k[m1] : K;
                    tall_block(wr, NULL, nvalid, xp + p * K * TP, k0, k1, m0, M, yf, ldy, n0, NULL);
                }
            }
            if (!out_f32) {
#pragma omp for schedule(static)
                for (int64_t m = 0; m < M; m++)
                    for (int64_t n = 0; n < N; n++) ((uint16_t *)out)[m * ldo + n] = f32_to_bf16(yf[m * N + n]);
            }
        }
        free(wf);
    }
    free(xf), free(xp);
    if (!out_f32) free(yf);
    return rc;
}

/* One Chain-of-Linear map in one parallel region (layers_cpu.c): chain j's W_j [n_j, k_j] (lin: per chain
 * its address, bias, n_j, k_j, row stride, as layers_cpu's table holds them) on x's first rows[j] rows,
 * into column block j of y (rows past rows[j] are not written). Each chain runs the kernel, and so sums
 * in the order, that gemm_f32 / gemm_f32_tall would pick for it alone (tall from `tall` rows): the result
 * is bit-identical to one call per chain. What changes is who does what: x is packed once for every
 * tall chain, and the threads split the blocks of ALL chains by their estimated cost, in contiguous
 * ranges (one fork and join per map, not per chain; a mixed batch's few-row blocks, bound by reading W,
 * mostly on one thread while the other computes the first chains). Decode steps 1.02-1.08x against
 * one call per chain (interleaved builds); walking every chain's block of each 6 rows in turn instead
 * was 0.96-0.99x.
 * With w16 (chain_gemm_bf16w), W is bf16, widened as gemm_bf16w widens it (in registers on the few-row
 * kernel, each tall block into the thread's fp32 scratch first): the sums are one gemm_bf16w call's per
 * chain, bit for bit. */
#define FEW_ROWS_COST 16  /* a few-row block costs about as much as a tall one of this many rows (W-bound) */

typedef struct {
    const void *w;
    const float *bias;
    int64_t n, k, ldw, m, col, blocks, rows_per_block, cost;
    int tall;
} chain_op;

TGT static int chain_gemm(const float *x, int64_t ldx, const int64_t *lin, int64_t chains, const int64_t *rows,
                          int64_t tall, float *y, int64_t ldy, int w16, int threads) {
    enum { MAXC = 16 };
    if (chains < 1 || chains > MAXC || !gemm_f32_supported()) return -1;
    chain_op op[MAXC];
    int64_t total = 0, kmax = 0, mmax = 0, col = 0;
    for (int64_t j = 0; j < chains; j++) {
        const int64_t *f = lin + j * 5;
        chain_op *c = &op[j];
        c->w = (const void *)(intptr_t)f[0], c->bias = w16 ? NULL : (const float *)(intptr_t)f[1];
        c->n = f[2], c->k = f[3], c->ldw = f[4], c->m = rows[j], c->col = col;
        col += c->n;
        if (c->m < 1 || (c->m < tall && c->m > 64 && !w16)) return -1;
        c->tall = c->m >= tall;
        c->rows_per_block = c->tall ? TR : NB;
        c->blocks = (c->n + c->rows_per_block - 1) / c->rows_per_block;
        /* per block: rows computed (tall: whole panel halves of 8) x K x W rows */
        const int64_t mc = c->tall ? (c->m + 7) / 8 * 8 : (c->m > FEW_ROWS_COST ? c->m : FEW_ROWS_COST);
        c->cost = mc * c->k * c->rows_per_block;
        total += c->cost * c->blocks;
        if (c->tall) {
            if (c->k > kmax) kmax = c->k;
            if (c->m > mmax) mmax = c->m;
        }
    }
    const int64_t panels = (mmax + TP - 1) / TP;
    float *xp = panels ? aligned_alloc(64, (size_t)(panels * kmax * TP * sizeof(float) + 64)) : NULL;
    if (panels && !xp) return -1;
    if (threads < 1) threads = 1;
    int rc = 0;
#pragma omp parallel num_threads(threads)
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        /* bf16: each tall block's W rows widened here (the few-row kernel widens in registers) */
        float *wf = w16 && panels ? aligned_alloc(64, (size_t)((TR * kmax * sizeof(float) + 63) / 64 * 64)) : NULL;
        if (w16 && panels && !wf) {
#pragma omp atomic write
            rc = -1;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) pack_panel(x, ldx, mmax, kmax, p, xp);
        /* this thread's blocks: those whose cumulative cost starts in [t, t+1) * total / nt */
        const int64_t lo = total * t / nt, hi = total * (t + 1) / nt;
        int64_t acc = 0;
        for (int64_t j = 0; j < chains && rc == 0; j++) {
            const chain_op *c = &op[j];
            for (int64_t b = 0; b < c->blocks; b++, acc += c->cost) {
                if (acc < lo || acc >= hi) continue;
                const int64_t n0 = b * c->rows_per_block;
                const int nvalid = c->n - n0 < c->rows_per_block ? (int)(c->n - n0) : (int)c->rows_per_block;
                const float *w = c->w;
                int64_t ldw = c->ldw, n0w = n0;
                if (!c->tall) {
                    if (w16) rows_block16(x, ldx, c->m, c->w, ldw, n0, nvalid, c->k, NULL, y + c->col, ldy, NULL);
                    else rows_block(x, ldx, c->m, w, ldw, n0, nvalid, c->k, NULL, y + c->col, ldy, c->bias);
                    continue;
                }
                if (w16) {  /* this block's rows widened, as gemm_bf16w widens them (padding rows: the last) */
                    widen_rows(c->w, c->ldw, n0, nvalid, TR, c->k, wf, c->k, PF * c->rows_per_block);
                    w = wf, ldw = c->k, n0w = 0;
                }
                const float *wr[TR], *wn[TR];
                for (int r = 0; r < TR; r++) wr[r] = w + (n0w + (r < nvalid ? r : nvalid - 1)) * ldw;
                const int next = !w16 && n0 + 2 * TR <= c->n;
                for (int r = 0; r < TR; r++) wn[r] = w + (n0w + TR + r) * ldw;
                const int64_t cp = (c->m + TP - 1) / TP;
                for (int64_t p = 0; p < cp; p++) {
                    const int64_t m0 = p * TP, m1 = m0 + TP / 2;
                    const int64_t k1 = m1 >= c->m ? 0 : c->k;
                    tall_block(wr, p == 0 && next ? wn : NULL, nvalid, xp + p * kmax * TP, c->k, k1, m0, c->m,
                               y + c->col, ldy, n0, c->bias);
                }
            }
        }
        free(wf);
    }
    free(xp);
    return rc;
}

TGT int chain_gemm_f32(const float *x, int64_t ldx, const int64_t *lin, int64_t chains, const int64_t *rows,
                       int64_t tall, float *y, int64_t ldy, int threads) {
    return chain_gemm(x, ldx, lin, chains, rows, tall, y, ldy, 0, threads);
}

/* The same map in bf16 (lin as above, bf16 weights): x [rows[0], >= every k_j] bf16 (row stride ldx) widened
 * once, the products summed in fp32 scratch as chain_gemm_f32 sums them with W widened per block, and
 * chain j's rows[j] rows rounded to bf16 into column block j of y (row stride ldy); a chain with a bias
 * (bf16) adds it to the rounded product and rounds again, as linear_rows does on the Python path
 * (gemm_bf16w, then += bias). Bit-identical to one gemm_bf16w call per chain (same rows and `tall`). */
TGT int chain_gemm_bf16w(const uint16_t *x, int64_t ldx, const int64_t *lin, int64_t chains, const int64_t *rows,
                         int64_t tall, uint16_t *y, int64_t ldy, int threads) {
    if (chains < 1 || chains > 16) return -1;
    int64_t M = 0, K = 0, N = 0;
    for (int64_t j = 0; j < chains; j++) {
        const int64_t *f = lin + j * 5;
        if (rows[j] > M) M = rows[j];
        if (f[3] > K) K = f[3];
        N += f[2];
    }
    float *xf = malloc(sizeof(float) * (size_t)(M * K)), *yf = malloc(sizeof(float) * (size_t)(M * N));
    int rc = (!xf || !yf) ? -1 : 0;
    if (rc == 0) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t m = 0; m < M; m++) widen_rows(x, ldx, m, 1, 1, K, xf + m * K, K, 0);
        rc = chain_gemm(xf, K, lin, chains, rows, tall, yf, N, 1, threads);
    }
    if (rc == 0) {
        int64_t col = 0;
        for (int64_t j = 0; j < chains; j++) {
            const int64_t *f = lin + j * 5, n = f[2];
            const uint16_t *bias = (const uint16_t *)(intptr_t)f[1];
#pragma omp parallel for num_threads(threads) schedule(static) if (rows[j] * n >= 32768)
            for (int64_t m = 0; m < rows[j]; m++)
                for (int64_t i = 0; i < n; i++) {
                    uint16_t v = f32_to_bf16(yf[m * N + col + i]);
                    if (bias) v = f32_to_bf16(bf16_to_f32(v) + bf16_to_f32(bias[i]));
                    y[m * ldy + col + i] = v;
                }
            col += n;
        }
    }
    free(xf), free(yf);
    return rc;
}

#else
int gemm_f32_supported(void) { return 0; }
int gemm_f32(const float *x, int64_t M, int64_t ldx, const float *W, int64_t N, int64_t K, int64_t ldw, float *y,
             int64_t ldy, const float *bias, const int64_t *row_k, int threads) {
    return -1;
}
int gemm_f32_tall(const float *x, int64_t M, int64_t ldx, const float *W, int64_t N, int64_t K, int64_t ldw, float *y,
                  int64_t ldy, const float *bias, const int64_t *row_k, int threads) {
    return -1;
}
int chain_gemm_f32(const float *x, int64_t ldx, const int64_t *lin, int64_t chains, const int64_t *rows, int64_t tall,
                   float *y, int64_t ldy, int threads) {
    return -1;
}
int chain_gemm_bf16w(const uint16_t *x, int64_t ldx, const int64_t *lin, int64_t chains, const int64_t *rows,
                     int64_t tall, uint16_t *y, int64_t ldy, int threads) {
    return -1;
}
int gemm_bf16w(const uint16_t *x, int64_t M, int64_t ldx, const uint16_t *W, int64_t N, int64_t K, int64_t ldw,
               void *out, int64_t ldo, int out_f32, const int64_t *row_k, int64_t tall, int threads) {
    return -1;
}
#endif
