/* Temperature sampling of fp32 logit rows in one pass over each row (CPU).
 *
 * Row r draws token j with probability exp(x_j / T_r - m) / sum, m = max_j x_j / T_r: the softmax the
 * torch path computes, drawn by inverse CDF with one uniform u_r in [0, 1) from the caller's generator.
 * Instead of torch's divide, softmax, float64 copy, cumsum and searchsorted over [B, V] (five passes,
 * four [B, V] buffers), each row is read twice (its max, then its exps) and the draw walks one chunk.
 *
 * The walk: the exps are stored, summed per chunk of CHUNK tokens in double, and the chunk sums added
 * into the total. target = u * total (kept below the total); the walk adds chunk sums until the next
 * one would pass the target, then adds that chunk's exps one by one and stops at the first token that
 * passes it. A token of probability 0 never passes (adding 0 changes nothing), so masked tokens (-inf)
 * are never drawn, whatever the rounding. If rounding leaves the walk short of the target, the last
 * token of positive mass it saw is taken.
 *
 * A row with no finite positive mass (NaN or +inf logits, every token at -inf) gets -1: the caller
 * samples it the torch way. Non-finite values are tested on their bits: this file is compiled with
 * -ffast-math (vectorised expf), under which isinf() and isnan() may be folded away.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK 256

static inline int finite_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x7F800000u) != 0x7F800000u;
}

static inline int is_neg_inf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u == 0xFF800000u;
}

static int64_t sample_row(const float *restrict x, int64_t V, float T, double u, float *restrict e,
                          double *restrict chunk) {
    float mx = -INFINITY;
    int any_bad = 0;
    for (int64_t j = 0; j < V; j++) {
        const float v = x[j];
        any_bad |= !finite_bits(v) && !is_neg_inf(v); /* NaN or +inf */
        mx = v > mx ? v : mx;
    }
    if (any_bad || !finite_bits(mx)) return -1; /* NaN / +inf somewhere, or every token at -inf */
    const float m = mx / T;
    if (!finite_bits(m)) return -1; /* a tiny temperature overflowed the scaled logits */
    const int64_t nc = (V + CHUNK - 1) / CHUNK;
    double total = 0.0;
    for (int64_t c = 0; c < nc; c++) {
        const int64_t lo = c * CHUNK, hi = lo + CHUNK < V ? lo + CHUNK : V;
        double s = 0.0;
        for (int64_t j = lo; j < hi; j++) {
            /* -inf logits (masks) give exactly 0; everything else exp(x / T - m) <= 1 */
            const float p = is_neg_inf(x[j]) ? 0.f : expf(x[j] / T - m);
            e[j] = p;
            s += p;
        }
        chunk[c] = s;
        total += s;
    }
    if (!(total > 0.0) || !finite_bits((float)total)) return -1;
    double target = u * total;
    if (target >= total) target = nextafter(total, 0.0);
    double acc = 0.0;
    int64_t last = -1;
    for (int64_t c = 0; c < nc; c++) {
        if (chunk[c] <= 0.0) continue;
        const int64_t lo = c * CHUNK, hi = lo + CHUNK < V ? lo + CHUNK : V;
        if (acc + chunk[c] <= target && c + 1 < nc) {
            acc += chunk[c];
            for (int64_t j = hi - 1; j >= lo; j--) /* remember a token of positive mass, for the short walk */
                if (e[j] > 0.f) { last = j; break; }
            continue;
        }
        for (int64_t j = lo; j < hi; j++) {
            if (e[j] <= 0.f) continue;
            acc += e[j];
            last = j;
            if (acc > target) return j;
        }
    }
    return last;
}

/* x: [rows, V] fp32, row stride ldx; temps: [rows] (> 0); u: [rows] uniforms in [0, 1); out: [rows] ids,
 * -1 where the row has no finite positive mass. Rows are independent: one row per task. */
void sample_rows(const float *x, int64_t rows, int64_t V, int64_t ldx, const float *temps, const double *u,
                 int64_t *out, int threads) {
#pragma omp parallel num_threads(threads) if (rows > 1)
    {
        float *e = malloc(sizeof(float) * V);
        double *chunk = malloc(sizeof(double) * ((V + CHUNK - 1) / CHUNK));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) out[r] = (e && chunk) ? sample_row(x + r * ldx, V, temps[r], u[r], e, chunk) : -1;
        free(e);
        free(chunk);
    }
}
