/* bf16 products of a decode batch on AMX: y[M, N] = x[M, K] . W[N, K]^T with fp32 sums, for the 9-64
 * rows of a batched decode step.
 *
 * At these sizes a product is still bound by reading W (every weight once per step), and oneDNN's
 * GEMM on an unpacked W streams it at ~10 GB/s on the 2-core reference machine: it repacks W into the
 * tile layout as it goes. This kernel needs no repacking: it computes y^T = W . x^T, so W is the
 * tile instruction's left operand (16 rows of W by 32 k-values: a plain strided tile load of W as
 * stored), and x^T, a few KB, is packed once per call into the right operand's pair-interleaved
 * layout (one dword = the bf16 pair k, k+1 of one x row). Each thread takes blocks of 32 rows of W,
 * streams them once along K with the next block prefetched, and keeps the 32 x M fp32 sums in tiles.
 *
 * Limits (else returns -1 and the caller takes oneDNN): K a multiple of 32, N a multiple of 16, M <= 64
 * (a larger M would re-read W per 64 rows: oneDNN does better there). x86-64 with AMX-BF16 only,
 * after the kernel has asked Linux for the tile state (gemm_amx_init); built with target attributes,
 * so the file compiles for any x86-64 and the caller checks gemm_amx_init's answer at run time.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


#if defined(__x86_64__) && defined(__GNUC__) && __GNUC__ >= 11
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16")))
#define MAXM 64
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 0 when this process may use AMX tiles (the CPU has AMX-BF16 and Linux granted the tile state). */
int gemm_amx_init(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-tile")) return -1;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tilecfg;

/* Tiles: 0-3 sums (W block b, x tile t) at 2b + t; 4, 5 the two W blocks; 6, 7 the two x tiles. */
static void config(tilecfg *c, int mt0, int mt1) {
    memset(c, 0, sizeof *c);
    c->palette = 1;
    const int cols[2] = {mt0, mt1};
    for (int b = 0; b < 2; b++)
        for (int t = 0; t < 2; t++) {
            c->rows[2 * b + t] = 16;
            c->colsb[2 * b + t] = (uint16_t)(cols[t] * 4);
        }
    for (int b = 4; b < 6; b++) c->rows[b] = 16, c->colsb[b] = 64;
    for (int t = 0; t < 2; t++) c->rows[6 + t] = 16, c->colsb[6 + t] = (uint16_t)(cols[t] * 4);
}

/* xp: for each k step of 32 and each x tile of 16 rows, 16 pair rows of 16 dwords (zero past M): a
 * 16 x 16 dword transpose of x's block. Steps ks0..ks1-1 (the caller splits them over its threads). */
static void pack_x(const uint16_t *x, int64_t M, int64_t ldx, int64_t tiles, int64_t ks0, int64_t ks1, uint32_t *xp) {
    for (int64_t ks = ks0; ks < ks1; ks++)
        for (int64_t t = 0; t < tiles; t++) {
            uint32_t *dst = xp + (ks * tiles + t) * 256;
            const int64_t rows = M - t * 16 < 16 ? M - t * 16 : 16;
            for (int64_t m = 0; m < rows; m++) {
                uint32_t src[16];
                memcpy(src, x + (t * 16 + m) * ldx + ks * 32, 64);
                for (int p = 0; p < 16; p++) dst[p * 16 + m] = src[p];
            }
            for (int64_t m = rows; m < 16; m++)
                for (int p = 0; p < 16; p++) dst[p * 16 + m] = 0;
        }
}

/* One tile of sums s[16 W rows][16 x rows] into y[m0 + c][n0 .. n0 + 15] for the mc valid x rows: a
 * column of s is one row segment of y (gathered, then rounded to bf16 with vcvtneps2bf16, nearest even). */
AMX static void store(const float *s, int64_t n0, int64_t m0, int mc, void *y, int64_t ldy, int out_f32) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
    for (int c = 0; c < mc; c++) {
        const __m512 v = _mm512_i32gather_ps(rows, s + c, 4);
        if (out_f32)
            _mm512_storeu_ps((float *)y + (m0 + c) * ldy + n0, v);
        else
            _mm256_storeu_si256((__m256i *)((uint16_t *)y + (m0 + c) * ldy + n0), (__m256i)_mm512_cvtneps_pbh(v));
    }
}

/* The 32 W rows n0.. (two tile blocks; `two` = 0: only the first, for N % 32 == 16) against the x
 * tiles at x row m0 (`wide` = 1: two tiles). Tile numbers must be constants: hence the four bodies. */
AMX static void blocks(const uint16_t *W, int64_t ldw, int64_t n0, int two, int64_t K, const uint32_t *xp,
                       int64_t tiles, int64_t t0, int wide, int64_t N, float *s, void *y, int64_t ldy, int64_t m0,
                       const int mc[2], int out_f32) {
    const int64_t stride = ldw * 2;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t ks = 0; ks < K / 32; ks++) {
        const uint16_t *a = W + n0 * ldw + ks * 32;
        const uint32_t *b = xp + (ks * tiles + t0) * 256;
        if (n0 + 32 < N) /* the next block's line of each of its rows at this k: one block ahead */
            for (int r = 0; r < 32 && n0 + 32 + r < N; r++)
                _mm_prefetch((const char *)(a + (32 + r) * ldw), _MM_HINT_T0);
        _tile_loadd(4, a, stride);
        _tile_loadd(6, b, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (two) {
            _tile_loadd(5, a + 16 * ldw, stride);
            _tile_dpbf16ps(2, 5, 6);
        }
        if (wide) {
            _tile_loadd(7, b + 256, 64);
            _tile_dpbf16ps(1, 4, 7);
            if (two) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, s, 64);
    store(s, n0, m0, mc[0], y, ldy, out_f32);
    if (wide) {
        _tile_stored(1, s, 64);
        store(s, n0, m0 + 16, mc[1], y, ldy, out_f32);
    }
    if (two) {
        _tile_stored(2, s, 64);
        store(s, n0 + 16, m0, mc[0], y, ldy, out_f32);
        if (wide) {
            _tile_stored(3, s, 64);
            store(s, n0 + 16, m0 + 16, mc[1], y, ldy, out_f32);
        }
    }
}

/* x: [M, K] bf16 (row stride ldx); W: [N, K] bf16 (row stride ldw); y: [M, N] (row stride ldy), fp32 if
 * out_f32 else bf16. Returns 0, or -1 (nothing written) outside the limits above. */
AMX int gemm_amx_bf16(const uint16_t *x, int64_t M, int64_t ldx, const uint16_t *W, int64_t N, int64_t K,
                      int64_t ldw, void *y, int64_t ldy, int out_f32, int threads) {
    if (M < 1 || M > MAXM || K % 32 || N % 16 || K < 32) return -1;
    const int64_t tiles = (M + 15) / 16, pairs = (N + 31) / 32;
    uint32_t *xp = aligned_alloc(64, (size_t)(K / 32) * tiles * 1024);
    if (!xp) return -1;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t ks = 0; ks < K / 32; ks++) pack_x(x, M, ldx, tiles, ks, ks + 1, xp);
        tilecfg cfg; /* loaded per x-tile pair: its last tile may be partial */
        float s[256] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int64_t p = 0; p < pairs; p++) {
            const int64_t n0 = p * 32;
            const int two = n0 + 16 < N;
            for (int64_t t0 = 0; t0 < tiles; t0 += 2) {
                const int wide = t0 + 1 < tiles;
                const int mc[2] = {(int)(M - t0 * 16 < 16 ? M - t0 * 16 : 16),
                                   wide ? (int)(M - (t0 + 1) * 16 < 16 ? M - (t0 + 1) * 16 : 16) : 16};
                config(&cfg, mc[0], wide ? mc[1] : 16);
                _tile_loadconfig(&cfg);
                blocks(W, ldw, n0, two, K, xp, tiles, t0, wide, N, s, y, ldy, t0 * 16, mc, out_f32);
            }
        }
        _tile_release();
    }
    free(xp);
    return 0;
}

#else
int gemm_amx_init(void) { return -1; }
int gemm_amx_bf16(const uint16_t *x, int64_t M, int64_t ldx, const uint16_t *W, int64_t N, int64_t K, int64_t ldw,
                  void *y, int64_t ldy, int out_f32, int threads) {
    (void)x, (void)M, (void)ldx, (void)W, (void)N, (void)K, (void)ldw, (void)y, (void)ldy, (void)out_f32,
        (void)threads;
    return -1;
}
#endif
