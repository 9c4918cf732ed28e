/* Every transformer layer of one engine step in one call, for models with equal chains on the CPUs where
 * gemm_f32 runs (AVX2 + FMA, no AVX-512), when the whole step's attention goes through paged_decode as
 * (row, chain) pairs (decode rows and short prefill chunks: attention.py plan_step): fp32 models, and bf16
 * models where the CPU has no bf16 dot product (their products on gemm_bf16w's widening kernels).
 *
 * It runs the kernels the Python path runs (transformer.py CoLMModel.forward_step, layers.py, attention.py
 * _rope_and_store and _attend_plan), in the same order, on the same rows, so its output is bit-identical;
 * what it removes is the Python between them: ~16 dispatches per layer (slices, wrappers, ctypes calls, a
 * zero-filled output per mixed-chain product, the gather and scatter of a mixed step's query pairs),
 * ~20-35 ms of a 30-layer batch-32 step of SmolLM2's shape (docs/performance.md, round 7).
 *
 * Per layer, rows ordered by chain count (descending), rows[j] of them using chain j:
 *   xa = rms_norm(h); y = qkv(xa); q = rope(y), K/V stored; att = paged_decode(q pairs); h += o(att);
 *   xf = rms_norm(h); h += down(swiglu(gate_up(xf))).
 * A chain-j product runs on rows[j] rows only; its other rows stay zero (scratch from calloc, and every
 * layer writes the same rows), as the Python path's zero-filled outputs are.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

/* Built with -DCOLM_LAYER_TIMING (benchmarks/layer_parts.py), each part of a layer adds its wall time to
 * part_s, read and reset by layer_parts(); in the normal build PART(i, stmt) is stmt alone. */
enum { P_NORM, P_QKV, P_ROPE, P_ATTN, P_O, P_GATE_UP, P_SWIGLU_ADD, P_DOWN, N_PARTS };
#ifdef COLM_LAYER_TIMING
#include <omp.h>
static double part_s[N_PARTS];
void layer_parts(double *out) {
    for (int i = 0; i < N_PARTS; i++) out[i] = part_s[i], part_s[i] = 0;
}
#define PART(i, stmt) do { double t0_ = omp_get_wtime(); stmt; part_s[i] += omp_get_wtime() - t0_; } while (0)
#else
#define PART(i, stmt) do { stmt; } while (0)
#endif

int gemm_f32(const float *x, int64_t M, int64_t ldx, const float *W, int64_t N, int64_t K, int64_t ldw, float *y,
             int64_t ldy, const float *bias, const int64_t *row_k, int threads);
int gemm_f32_tall(const float *x, int64_t M, int64_t ldx, const float *W, int64_t N, int64_t K, int64_t ldw,
                  float *y, int64_t ldy, const float *bias, const int64_t *row_k, int threads);
int chain_gemm_f32(const float *x, int64_t ldx, const int64_t *lin, int64_t chains, const int64_t *rows, int64_t tall,
                   float *y, int64_t ldy, int threads);
int chain_gemm_bf16w(const uint16_t *x, int64_t ldx, const int64_t *lin, int64_t chains, const int64_t *rows,
                     int64_t tall, uint16_t *y, int64_t ldy, int threads);
void rms_norm_f32(const float *x, int64_t rows, int64_t ldx, const float *w, int64_t n, int64_t c, float eps,
                  float *out, int threads);
void rms_norm_bf16(const uint16_t *x, int64_t rows, int64_t ldx, const uint16_t *w, int64_t n, int64_t c,
                   float eps, uint16_t *out, int threads);
void swiglu_f32(const float *gu, int64_t rows, int64_t ldgu, int64_t chains, int64_t F, float *out, int threads);
void swiglu_bf16(const uint16_t *gu, int64_t rows, int64_t ldgu, int64_t chains, int64_t F, uint16_t *out,
                 int threads);
void rope_store_f32(const float *y, int64_t T, int64_t ldy, int64_t P, int64_t C, int64_t H, int64_t hd,
                    const float *cos, const float *sin, float *q_out, float *kc, float *vc, const int64_t *slots,
                    const int64_t *rows, int64_t R, int threads);
void rope_store_bf16(const uint16_t *y, int64_t T, int64_t ldy, int64_t P, int64_t C, int64_t H, int64_t hd,
                     const uint16_t *cos, const uint16_t *sin, uint16_t *q_out, uint16_t *kc, uint16_t *vc,
                     const int64_t *slots, const int64_t *rows, int64_t R, int threads);
int paged_decode(const void *q, const void *k, const void *v, void *out, const int64_t *idx, const int64_t *lens,
                 int64_t pairs, int64_t nb, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                 int64_t block_size, int64_t max_len, float scale, int bf16, int threads);

/* dims[]: the step's sizes (cpu_kernels.layers_step fills them in this order); D_BF16: 1 for a bf16 model
 * (every tensor the call reads or writes in bf16), 0 for fp32 */
enum { D_T, D_KMAX, D_NC, D_CW, D_C, D_H, D_HD, D_F, D_NP, D_NB, D_BS, D_MAXLEN, D_R, D_TALL, D_LAYERS, D_KV_STRIDE,
       D_BF16, D_COUNT };
/* wtab: per layer, attn_norm and ffn_norm weights, then for qkv, o, gate_up and down, per chain 0..NC-1:
 * weight, bias (0: none), out rows n, in width k, row stride ldw */
enum { LIN_FIELDS = 5, LINEARS = 4 };

int layers_step_dims(void) { return D_COUNT; }

/* Each op of a layer in the model's dtype (bf16: the row_ops.c and gemm_f32.c kernels the Python path calls
 * for bf16 tensors). x, y and the other buffers are float * or uint16_t * as bf16 says. */
static int chain_linear(const void *x, int64_t ldx, const int64_t *lin, int64_t kmax, const int64_t *rows,
                        int64_t tall, void *y, int64_t ldy, int bf16, int threads) {
    return bf16 ? chain_gemm_bf16w(x, ldx, lin, kmax, rows, tall, y, ldy, threads)
                : chain_gemm_f32(x, ldx, lin, kmax, rows, tall, y, ldy, threads);
}

static void rms_norm(const void *x, int64_t rows, int64_t ldx, const void *w, int64_t n, int64_t c, float eps,
                     void *out, int bf16, int threads) {
    if (bf16) rms_norm_bf16(x, rows, ldx, w, n, c, eps, out, threads);
    else rms_norm_f32(x, rows, ldx, w, n, c, eps, out, threads);
}

static void rope_store(const void *y, int64_t T, int64_t ldy, int64_t P, int64_t C, int64_t H, int64_t hd,
                       const void *cos, const void *sin, void *q, void *kc, void *vc, const int64_t *slots,
                       const int64_t *rows, int64_t R, int bf16, int threads) {
    if (bf16) rope_store_bf16(y, T, ldy, P, C, H, hd, cos, sin, q, kc, vc, slots, rows, R, threads);
    else rope_store_f32(y, T, ldy, P, C, H, hd, cos, sin, q, kc, vc, slots, rows, R, threads);
}

static void swiglu(const void *gu, int64_t rows, int64_t ldgu, int64_t chains, int64_t F, void *out, int bf16,
                   int threads) {
    if (bf16) swiglu_bf16(gu, rows, ldgu, chains, F, out, threads);
    else swiglu_f32(gu, rows, ldgu, chains, F, out, threads);
}

/* h += d (bf16: the sum of the two in fp32, rounded to bf16, as torch's add_ rounds) */
static void add_rows(void *h, const void *d, int64_t n, int bf16, int threads) {
    if (bf16) {
        uint16_t *a = h;
        const uint16_t *b = d;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= 65536)
        for (int64_t i = 0; i < n; i++) a[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));
        return;
    }
    float *a = h;
    const float *b = d;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < n; i++) a[i] += b[i];
}

/* The step's attention: every (row, chain) pair through paged_decode; with q_idx, the pairs rows use are
 * gathered into qd, attended into od and scattered back (the rest of att stays 0). es: bytes per value. */
static int attend(const char *q, const void *kc, const void *vc, char *att, char *qd, char *od,
                  const int64_t *q_idx, int64_t NP, int64_t qw, const int64_t *block_idx, const int64_t *lens,
                  int64_t NB, int64_t C, int64_t H, int64_t hd, int64_t BS, int64_t max_len, float scale, int bf16,
                  int threads) {
    const size_t row = (size_t)qw * (bf16 ? 2 : 4);
    if (!q_idx)
        return paged_decode(q, kc, vc, att, block_idx, lens, NP, NB, C, H, hd, BS, max_len, scale, bf16, threads);
    for (int64_t i = 0; i < NP; i++) memcpy(qd + i * row, q + q_idx[i] * row, row);
    int rc = paged_decode(qd, kc, vc, od, block_idx, lens, NP, NB, C, H, hd, BS, max_len, scale, bf16, threads);
    for (int64_t i = 0; i < NP && rc == 0; i++) memcpy(att + q_idx[i] * row, od + i * row, row);
    return rc;
}

/* h: [T, kmax*cw] hidden rows, updated in place. rows: [kmax]. cos, sin: [T, hd]. slots, kv_rows: the K/V
 * stores (kv_rows NULL: every pool-major row). q_idx: [NP] pair -> row*kmax + chain (NULL: pair i is
 * i, and NP == T*kmax); block_idx: [NP, NB] global block ids; lens: [NP]. k_all, v_all: the shared K/V
 * tensors, layer l at l*kv_stride values. Every float tensor (h, norm and product weights, cos, sin, K/V)
 * is fp32, or bf16 with dims[D_BF16]. Returns 0, or -1 (a kernel refused its shape, or no memory: h may
 * then be partly updated). */
int layers_step(void *h, const int64_t *dims, const int64_t *wtab, const int64_t *rows, const void *cos,
                const void *sin, const int64_t *slots, const int64_t *kv_rows, const int64_t *q_idx,
                const int64_t *block_idx, const int64_t *lens, void *k_all, void *v_all, float eps, float scale,
                int threads) {
    const int64_t T = dims[D_T], kmax = dims[D_KMAX], NC = dims[D_NC], cw = dims[D_CW], C = dims[D_C],
                  H = dims[D_H], hd = dims[D_HD], F = dims[D_F], NP = dims[D_NP], NB = dims[D_NB], BS = dims[D_BS],
                  max_len = dims[D_MAXLEN], R = dims[D_R], tall = dims[D_TALL], layers = dims[D_LAYERS],
                  kv_stride = dims[D_KV_STRIDE];
    const int bf16 = (int)dims[D_BF16];
    const size_t es = bf16 ? 2 : 4;
    const int64_t D = kmax * cw, qkv_w = kmax * (C + 2 * H) * hd, qw = C * hd, stride = 2 + LINEARS * NC * LIN_FIELDS;
    if (kmax < 1 || kmax > NC || qw != cw || (q_idx == NULL && NP != T * kmax)) return -1;
    char *xa = calloc((size_t)(T * D), es), *y = calloc((size_t)(T * qkv_w), es), *q = calloc((size_t)(T * D), es),
         *att = calloc((size_t)(T * D), es), *tmp = calloc((size_t)(T * D), es),
         *gu = calloc((size_t)(T * kmax * 2 * F), es), *act = calloc((size_t)(T * kmax * F), es),
         *qd = q_idx ? malloc(es * (size_t)(NP * qw)) : NULL, *od = q_idx ? malloc(es * (size_t)(NP * qw)) : NULL;
    int rc = (!xa || !y || !q || !att || !tmp || !gu || !act || (q_idx && (!qd || !od))) ? -1 : 0;
    for (int64_t l = 0; l < layers && rc == 0; l++) {
        const int64_t *L = wtab + l * stride;
        const int64_t *qkv = L + 2, *o = qkv + NC * LIN_FIELDS, *gate_up = o + NC * LIN_FIELDS,
                      *down = gate_up + NC * LIN_FIELDS;
        char *kc = (char *)k_all + l * kv_stride * es, *vc = (char *)v_all + l * kv_stride * es;
        const void *attn_norm = (const void *)(intptr_t)L[0], *ffn_norm = (const void *)(intptr_t)L[1];
        PART(P_NORM, rms_norm(h, T, D, attn_norm, kmax, cw, eps, xa, bf16, threads));
        PART(P_QKV, rc = chain_linear(xa, D, qkv, kmax, rows, tall, y, qkv_w, bf16, threads));
        if (rc) break;
        PART(P_ROPE, rope_store(y, T, qkv_w, kmax, C, H, hd, cos, sin, q, kc, vc, slots, kv_rows, R, bf16, threads));
        PART(P_ATTN, rc = attend(q, kc, vc, att, qd, od, q_idx, NP, qw, block_idx, lens, NB, C, H, hd, BS, max_len,
                                 scale, bf16, threads));
        if (rc) break;
        PART(P_O, rc = chain_linear(att, D, o, kmax, rows, tall, tmp, D, bf16, threads));
        if (rc) break;
        PART(P_SWIGLU_ADD, add_rows(h, tmp, T * D, bf16, threads));
        PART(P_NORM, rms_norm(h, T, D, ffn_norm, kmax, cw, eps, xa, bf16, threads));
        PART(P_GATE_UP, rc = chain_linear(xa, D, gate_up, kmax, rows, tall, gu, kmax * 2 * F, bf16, threads));
        if (rc) break;
        PART(P_SWIGLU_ADD, swiglu(gu, T, kmax * 2 * F, kmax, F, act, bf16, threads));
        PART(P_DOWN, rc = chain_linear(act, kmax * F, down, kmax, rows, tall, tmp, D, bf16, threads));
        if (rc) break;
        PART(P_SWIGLU_ADD, add_rows(h, tmp, T * D, bf16, threads));
    }
    free(xa), free(y), free(q), free(att), free(tmp), free(gu), free(act), free(qd), free(od);
    return rc;
}
