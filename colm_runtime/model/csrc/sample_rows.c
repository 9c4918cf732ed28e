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
 * top-k, top-p and min-p (filter_row) shrink the row to its nucleus without sorting the vocabulary:
 * a histogram of the exps' top bits (positive floats order as their bits) finds the bucket where the
 * k-th token or the p-th mass falls; every bucket above it is kept whole and only the tokens of that
 * bucket are sorted, to cut as torch's path cuts (top-k, then top-p over the top-k renormalised: keep
 * tokens while the mass before them is < p; then min-p: drop p_j < min_p * p_max). Ties at the cut are
 * broken by token id (a sort's tie order is arbitrary too).
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

static inline uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline int finite_bits(float f) { return (bits(f) & 0x7F800000u) != 0x7F800000u; }

static inline int is_neg_inf(float f) { return bits(f) == 0xFF800000u; }

/* The row's exps into e and their per-chunk sums into chunk -> their total, or -1 for a row with no
 * finite positive mass. */
static double row_exps(const float *restrict x, int64_t V, float T, float *restrict e, double *restrict chunk) {
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
    return total > 0.0 && finite_bits((float)total) ? total : -1;
}

/* The inverse-CDF draw over row_exps' exps and chunk sums. */
static int64_t draw_chunks(const float *restrict e, const double *restrict chunk, int64_t V, double total, double u) {
    const int64_t nc = (V + CHUNK - 1) / CHUNK;
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

#define BUCKET_SHIFT 20 /* exps are in [0, 1]: 2^(31 - 20) buckets, 8 per binade */
#define BUCKETS (1 << (31 - BUCKET_SHIFT))

typedef struct {
    float e;
    int32_t j;
} cand;

static int by_mass_desc(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->e != y->e) return x->e < y->e ? 1 : -1;
    return x->j < y->j ? -1 : x->j > y->j;
}

/* The tokens of bucket b, by mass descending (ties: lower id first) -> their count. */
static int64_t bucket_sorted(const float *restrict e, int64_t V, int64_t b, cand *restrict out) {
    int64_t n = 0;
    for (int64_t j = 0; j < V; j++)
        if (e[j] > 0.f && (int64_t)(bits(e[j]) >> BUCKET_SHIFT) == b) out[n++] = (cand){e[j], (int32_t)j};
    qsort(out, n, sizeof(cand), by_mass_desc);
    return n;
}

/* Row r with top_k (0: off), top_p (>= 1: off), min_p (<= 0: off): the exps e (from row_exps)
 * cut to the row's nucleus, drawn with u. The kept set is every token of a bucket above `cut` plus the
 * first `keep` tokens of bucket `cut` by mass (sorted into cands), less those under the min-p floor.
 * Scratch: cnt and mass [BUCKETS], cands [V]. */
static int64_t filter_row(const float *restrict e, int64_t V, int64_t top_k, float top_p, float min_p, double u,
                          double total, int64_t *restrict cnt, double *restrict mass, cand *restrict cands) {
    memset(cnt, 0, sizeof(int64_t) * BUCKETS);
    memset(mass, 0, sizeof(double) * BUCKETS);
    for (int64_t j = 0; j < V; j++) {
        const uint32_t b = bits(e[j]) >> BUCKET_SHIFT;
        cnt[b]++;
        mass[b] += e[j];
    }
    mass[0] = 0.0, cnt[0] = 0; /* bucket 0 holds the zeros (and exps below 2^-126): never kept by a cut */
    int64_t cut = -1, keep = 0; /* -1: no cut, every token is in */
    double kept = total, above = 0.0;
    if (top_k > 0) { /* the bucket of the k-th token; its leading tokens up to k */
        int64_t seen = 0, b = BUCKETS - 1;
        for (; b > 0 && seen + cnt[b] < top_k; b--) seen += cnt[b], above += mass[b];
        if (b > 0) {
            cut = b;
            keep = bucket_sorted(e, V, b, cands);
            keep = keep < top_k - seen ? keep : top_k - seen;
            kept = above;
            for (int64_t i = 0; i < keep; i++) kept += cands[i].e;
        }
    }
    if (top_p < 1.f) { /* over the top-k set, renormalised: keep tokens while the mass before them is < p */
        const double target = (double)top_p * kept;
        double acc = 0.0;
        int64_t b = BUCKETS - 1;
        for (; b > 0 && b > cut && (cnt[b] == 0 || acc + mass[b] < target); b--) acc += mass[b];
        if (b > 0 && b != cut) { /* the nucleus ends in a bucket above the top-k cut: sort that one */
            cut = b;
            keep = bucket_sorted(e, V, b, cands);
        }
        if (b > 0) { /* within cut's sorted tokens: the first whose predecessors reach the target ends it */
            int64_t i = 0;
            while (i < keep && acc < target) acc += cands[i++].e;
            keep = i > 0 ? i : 1;
        }
    }
    if (cut >= 0 && keep < 1) return -1; /* cannot happen (a cut bucket holds a token); the torch path if it did */
    const float floor = min_p > 0.f ? min_p : 0.f; /* the max token's exp is 1: min-p drops exps < min_p */
    double sum = 0.0;
    for (int64_t i = 0; i < keep; i++)
        if (cands[i].e >= floor) sum += cands[i].e;
    for (int64_t j = 0; j < V; j++)
        if (e[j] > 0.f && e[j] >= floor && (int64_t)(bits(e[j]) >> BUCKET_SHIFT) > cut) sum += e[j];
    if (!(sum > 0.0)) return -1;
    double target = u * sum;
    if (target >= sum) target = nextafter(sum, 0.0);
    double run = 0.0;
    int64_t last = -1;
    for (int64_t i = 0; i < keep; i++)
        if (cands[i].e >= floor) {
            run += cands[i].e;
            last = cands[i].j;
            if (run > target) return last;
        }
    for (int64_t j = 0; j < V; j++)
        if (e[j] > 0.f && e[j] >= floor && (int64_t)(bits(e[j]) >> BUCKET_SHIFT) > cut) {
            run += e[j];
            last = j;
            if (run > target) return j;
        }
    return last;
}

/* x: [rows, V] fp32, row stride ldx; temps: [rows] (> 0); u: [rows] uniforms in [0, 1); top_k, top_p,
 * min_p: [rows] each, or NULL where no row sets them; out: [rows] ids, -1 where the row has no finite
 * positive mass. Rows are independent: one row per task. */
void sample_rows(const float *x, int64_t rows, int64_t V, int64_t ldx, const float *temps, const double *u,
                 const int64_t *top_k, const float *top_p, const float *min_p, int64_t *out, int threads) {
    const int filters = top_k != NULL;
#pragma omp parallel num_threads(threads) if (rows > 1)
    {
        float *e = malloc(sizeof(float) * V);
        double *chunk = malloc(sizeof(double) * ((V + CHUNK - 1) / CHUNK));
        int64_t *cnt = filters ? malloc(sizeof(int64_t) * BUCKETS) : NULL;
        double *mass = filters ? malloc(sizeof(double) * BUCKETS) : NULL;
        cand *cands = filters ? malloc(sizeof(cand) * V) : NULL;
        const int ok = e && chunk && (!filters || (cnt && mass && cands));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const int cut = filters && ((top_k[r] > 0 && top_k[r] < V) || top_p[r] < 1.f || min_p[r] > 0.f);
            const double total = ok ? row_exps(x + r * ldx, V, temps[r], e, chunk) : -1;
            if (total < 0)
                out[r] = -1;
            else if (cut)
                out[r] = filter_row(e, V, top_k[r] < V ? top_k[r] : 0, top_p[r], min_p[r], u[r], total, cnt, mass, cands);
            else
                out[r] = draw_chunks(e, chunk, V, total, u[r]);
        }
        free(e);
        free(chunk);
        free(cnt);
        free(mass);
        free(cands);
    }
}
