/* Every transformer layer of one engine step in one call, for fp32 models with equal chains on the CPUs
 * where gemm_f32 runs (AVX2 + FMA, no AVX-512), when the whole step's attention goes through
 * paged_decode as (row, chain) pairs (decode rows and short prefill chunks: attention.py plan_step).
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
void rms_norm_f32(const float *x, int64_t rows, int64_t ldx, const float *w, int64_t n, int64_t c, float eps,
                  float *out, int threads);
void swiglu_f32(const float *gu, int64_t rows, int64_t ldgu, int64_t chains, int64_t F, float *out, int threads);
void rope_store_f32(const float *y, int64_t T, int64_t ldy, int64_t P, int64_t C, int64_t H, int64_t hd,
                    const float *cos, const float *sin, float *q_out, float *kc, float *vc, const int64_t *slots,
                    const int64_t *rows, int64_t R, int threads);
int paged_decode(const void *q, const void *k, const void *v, void *out, const int64_t *idx, const int64_t *lens,
                 int64_t pairs, int64_t nb, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                 int64_t block_size, int64_t max_len, float scale, int bf16, int threads);

/* dims[]: the step's sizes (cpu_kernels.layers_f32 fills them in this order) */
enum { D_T, D_KMAX, D_NC, D_CW, D_C, D_H, D_HD, D_F, D_NP, D_NB, D_BS, D_MAXLEN, D_R, D_TALL, D_LAYERS, D_KV_STRIDE,
       D_COUNT };
/* wtab: per layer, attn_norm and ffn_norm weights, then for qkv, o, gate_up and down, per chain 0..NC-1:
 * weight, bias (0: none), out rows n, in width k, row stride ldw */
enum { LIN_FIELDS = 5, LINEARS = 4 };

int layers_f32_dims(void) { return D_COUNT; }

/* One Chain-of-Linear map (gemm_f32.c chain_gemm_f32): chain j's weight on x's first rows[j] rows, into
 * its column block of y, each chain on the kernel gemm_f32 would pick for it alone. */
static int chain_linear(const float *x, int64_t ldx, const int64_t *lin, int64_t kmax, const int64_t *rows,
                        int64_t tall, float *y, int64_t ldy, int threads) {
    return chain_gemm_f32(x, ldx, lin, kmax, rows, tall, y, ldy, threads);
}

static void add_rows(float *h, const float *d, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < n; i++) h[i] += d[i];
}

/* The step's attention: every (row, chain) pair through paged_decode; with q_idx, the pairs rows use are
 * gathered into qd, attended into od and scattered back (the rest of att stays 0). */
static int attend(const float *q, const float *kc, const float *vc, float *att, float *qd, float *od,
                  const int64_t *q_idx, int64_t NP, int64_t qw, const int64_t *block_idx, const int64_t *lens,
                  int64_t NB, int64_t C, int64_t H, int64_t hd, int64_t BS, int64_t max_len, float scale,
                  int threads) {
    if (!q_idx) return paged_decode(q, kc, vc, att, block_idx, lens, NP, NB, C, H, hd, BS, max_len, scale, 0, threads);
    for (int64_t i = 0; i < NP; i++) memcpy(qd + i * qw, q + q_idx[i] * qw, sizeof(float) * (size_t)qw);
    int rc = paged_decode(qd, kc, vc, od, block_idx, lens, NP, NB, C, H, hd, BS, max_len, scale, 0, threads);
    for (int64_t i = 0; i < NP && rc == 0; i++) memcpy(att + q_idx[i] * qw, od + i * qw, sizeof(float) * (size_t)qw);
    return rc;
}

/* h: [T, kmax*cw] hidden rows, updated in place. rows: [kmax]. cos, sin: [T, hd]. slots, kv_rows: the K/V
 * stores (kv_rows NULL: every pool-major row). q_idx: [NP] pair -> row*kmax + chain (NULL: pair i is
 * i, and NP == T*kmax); block_idx: [NP, NB] global block ids; lens: [NP]. k_all, v_all: the shared K/V
 * tensors, layer l at l*kv_stride floats. Returns 0, or -1 (a kernel refused its shape, or no memory:
 * h may then be partly updated). */
int layers_f32(float *h, const int64_t *dims, const int64_t *wtab, const int64_t *rows, const float *cos,
               const float *sin, const int64_t *slots, const int64_t *kv_rows, const int64_t *q_idx,
               const int64_t *block_idx, const int64_t *lens, float *k_all, float *v_all, float eps, float scale,
               int threads) {
    const int64_t T = dims[D_T], kmax = dims[D_KMAX], NC = dims[D_NC], cw = dims[D_CW], C = dims[D_C],
                  H = dims[D_H], hd = dims[D_HD], F = dims[D_F], NP = dims[D_NP], NB = dims[D_NB], BS = dims[D_BS],
                  max_len = dims[D_MAXLEN], R = dims[D_R], tall = dims[D_TALL], layers = dims[D_LAYERS],
                  kv_stride = dims[D_KV_STRIDE];
    const int64_t D = kmax * cw, qkv_w = kmax * (C + 2 * H) * hd, qw = C * hd, stride = 2 + LINEARS * NC * LIN_FIELDS;
    if (kmax < 1 || kmax > NC || qw != cw || (q_idx == NULL && NP != T * kmax)) return -1;
    float *xa = calloc((size_t)(T * D), sizeof(float)), *y = calloc((size_t)(T * qkv_w), sizeof(float)),
          *q = calloc((size_t)(T * D), sizeof(float)), *att = calloc((size_t)(T * D), sizeof(float)),
          *tmp = calloc((size_t)(T * D), sizeof(float)), *gu = calloc((size_t)(T * kmax * 2 * F), sizeof(float)),
          *act = calloc((size_t)(T * kmax * F), sizeof(float)),
          *qd = q_idx ? malloc(sizeof(float) * (size_t)(NP * qw)) : NULL,
          *od = q_idx ? malloc(sizeof(float) * (size_t)(NP * qw)) : NULL;
    int rc = (!xa || !y || !q || !att || !tmp || !gu || !act || (q_idx && (!qd || !od))) ? -1 : 0;
    for (int64_t l = 0; l < layers && rc == 0; l++) {
        const int64_t *L = wtab + l * stride;
        const int64_t *qkv = L + 2, *o = qkv + NC * LIN_FIELDS, *gate_up = o + NC * LIN_FIELDS,
                      *down = gate_up + NC * LIN_FIELDS;
        float *kc = k_all + l * kv_stride, *vc = v_all + l * kv_stride;
        PART(P_NORM, rms_norm_f32(h, T, D, (const float *)(intptr_t)L[0], kmax, cw, eps, xa, threads));
        PART(P_QKV, rc = chain_linear(xa, D, qkv, kmax, rows, tall, y, qkv_w, threads));
        if (rc) break;
        PART(P_ROPE, rope_store_f32(y, T, qkv_w, kmax, C, H, hd, cos, sin, q, kc, vc, slots, kv_rows, R, threads));
        PART(P_ATTN, rc = attend(q, kc, vc, att, qd, od, q_idx, NP, qw, block_idx, lens, NB, C, H, hd, BS, max_len,
                                 scale, threads));
        if (rc) break;
        PART(P_O, rc = chain_linear(att, D, o, kmax, rows, tall, tmp, D, threads));
        if (rc) break;
        PART(P_SWIGLU_ADD, add_rows(h, tmp, T * D, threads));
        PART(P_NORM, rms_norm_f32(h, T, D, (const float *)(intptr_t)L[1], kmax, cw, eps, xa, threads));
        PART(P_GATE_UP, rc = chain_linear(xa, D, gate_up, kmax, rows, tall, gu, kmax * 2 * F, threads));
        if (rc) break;
        PART(P_SWIGLU_ADD, swiglu_f32(gu, T, kmax * 2 * F, kmax, F, act, threads));
        PART(P_DOWN, rc = chain_linear(act, kmax * F, down, kmax, rows, tall, tmp, D, threads));
        if (rc) break;
        PART(P_SWIGLU_ADD, add_rows(h, tmp, T * D, threads));
    }
    free(xa), free(y), free(q), free(att), free(tmp), free(gu), free(act), free(qd), free(od);
    return rc;
}
