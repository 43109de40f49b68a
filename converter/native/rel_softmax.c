/* Transformer-XL attention after the projections: the per-head products, the relative shift, the scale, the
 * mask and the softmax, as NeMo's RelPositionMultiHeadAttention computes them.
 *
 * NeMo computes softmax((ac + rel_shift(bd)) / sqrt(d_k)) v per head with ac = (q+u)k^T (T, T) and
 * bd = (q+v)p^T (T, 2T-1), whose shift puts bd[i, T-1-i+j] at column j. In MLX the heads' operands are strided
 * views of the projections' (T, h * d_k) rows, which its matmul copies before every product, and the softmax
 * was five passes on one thread without wide vectors (the shifted copy, the scale, the sum, the mask, then exp
 * composed from vectorised operations: model/cpu/activations.py). Here the products are the BLAS's sgemm read
 * in place (leading dimension h * d_k), each head's scores stay in a buffer the caches hold, and the softmax is
 * one vectorised pass per row on every core.
 */
#include <stdlib.h>

#include "parallel.h"
#include "vector_exp.h"

/* One row: out[j] = softmax over j of (ac[j] + bd[j]) * scale + mask[j] (mask may be NULL). */
VECTOR_CLONES static void softmax_row(const float *ac, const float *bd, const float *mask, int t, float scale,
                                      float *out) {
    for (int j = 0; j < t; j++)
        out[j] = (ac[j] + bd[j]) * scale + (mask != NULL ? mask[j] : 0.0f);
    float lanes[LANES];
    for (int l = 0; l < LANES; l++)
        lanes[l] = -3.0e38f;
    int whole_lanes = t - t % LANES;
    for (int j = 0; j < whole_lanes; j += LANES)
        for (int l = 0; l < LANES; l++)
            lanes[l] = out[j + l] > lanes[l] ? out[j + l] : lanes[l];
    float high = lanes[0];
    for (int l = 1; l < LANES; l++)
        high = lanes[l] > high ? lanes[l] : high;
    for (int j = whole_lanes; j < t; j++)
        high = out[j] > high ? out[j] : high;

    for (int j = 0; j < t; j++)
        out[j] = vector_exp(out[j] - high);
    float total = vector_sum(out, t);
    for (int j = 0; j < t; j++)
        out[j] = out[j] / total;
}

typedef struct {
    const float *ac, *bd, *mask;
    int t;
    float scale;
    float *out;
    long first_row, last_row;
} Job;

static void *worker(void *arg) {
    Job *job = arg;
    long t = job->t, p = 2 * t - 1;
    for (long row = job->first_row; row < job->last_row; row++) {
        /* Column j of the shifted product is bd[i, T-1-i+j]. */
        const float *bd = job->bd + row * p + (t - 1 - row);
        const float *mask = job->mask != NULL ? job->mask + row * t : NULL;
        softmax_row(job->ac + row * t, bd, mask, (int)t, job->scale, job->out + row * t);
    }
    return NULL;
}

/* One head's weights: out (T, T) from ac (T, T), bd (T, 2T-1) and mask NULL or (T, T), rows on `threads`. */
static void head_softmax(const float *ac, const float *bd, const float *mask, int t, float scale, float *out,
                         int threads) {
    Job jobs[MAX_THREADS];
    int used = parallel_count(t, threads);
    for (int k = 0; k < used; k++)
        jobs[k] = (Job){ac, bd, mask, t, scale, out, (long)t * k / used, (long)t * (k + 1) / used};
    parallel_run(worker, jobs, sizeof(Job), used);
}

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

/* cblas_sgemm's signature: the caller passes the one MLX multiplies with. */
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

typedef struct {
    const float *q, *k, *v, *p, *bias_u, *bias_v, *mask;
    int t, heads, d_head;
    int left, right; /* local attention's context; left < 0: full attention */
    float scale;
    sgemm_fn sgemm;
    float *out;
    long first_pair, last_pair; /* (sequence, head) pairs, sequence-major */
    int softmax_threads, failed;
} AttentionJob;

/* Rows [first, last) of one head's q (row stride `width`) plus each bias: q+u and q+v, rows packed for sgemm, as
 * NeMo adds the biases to q before its products. */
static void biased_queries(const AttentionJob *job, const float *q, long width, long h, long first, long last,
                           float *q_u, float *q_v) {
    long d_head = job->d_head;
    for (long i = first; i < last; i++)
        for (long j = 0; j < d_head; j++) {
            q_u[(i - first) * d_head + j] = q[i * width + j] + job->bias_u[h * d_head + j];
            q_v[(i - first) * d_head + j] = q[i * width + j] + job->bias_v[h * d_head + j];
        }
}

/* Rows of (q+v)p^T per product in full attention. */
enum { SHIFT_BLOCK = 96 };

static void *attention_worker(void *arg) {
    AttentionJob *job = arg;
    long t = job->t, d_head = job->d_head, width = (long)job->heads * d_head, positions = 2 * t - 1;
    float *q_u = malloc(sizeof(float) * (t * d_head * 2 + t * t * 2 + t * positions));
    if (q_u == NULL) {
        job->failed = 1;
        return NULL;
    }
    float *q_v = q_u + t * d_head, *ac = q_v + t * d_head, *weights = ac + t * t, *bd = weights + t * t;
    for (long pair = job->first_pair; pair < job->last_pair; pair++) {
        long b = pair / job->heads, h = pair % job->heads;
        long column = b * t * width + h * d_head; /* this head's first value in q, k, v, out */
        biased_queries(job, job->q + column, width, h, 0, t, q_u, q_v);
        job->sgemm(ROW_MAJOR, NO_TRANS, TRANS, (int)t, (int)t, (int)d_head, 1.0f, q_u, (int)d_head, job->k + column,
                   (int)width, 0.0f, ac, (int)t);
        /* Row i reads (q+v)p^T only at columns T-1-i ... 2T-2-i: each block of rows multiplies with the positions
         * its rows read, a third fewer products than the whole (T, 2T-1). */
        for (long start = 0; start < t; start += SHIFT_BLOCK) {
            long rows = start + SHIFT_BLOCK < t ? SHIFT_BLOCK : t - start, low = t - start - rows;
            job->sgemm(ROW_MAJOR, NO_TRANS, TRANS, (int)rows, (int)(t - 1 + rows), (int)d_head, 1.0f,
                       q_v + start * d_head, (int)d_head, job->p + low * width + h * d_head, (int)width, 0.0f,
                       bd + start * positions + low, (int)positions);
        }
        head_softmax(ac, bd, job->mask != NULL ? job->mask + b * t * t : NULL, (int)t, job->scale, weights,
                     job->softmax_threads);
        job->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, (int)t, (int)d_head, (int)t, 1.0f, weights, (int)t, job->v + column,
                   (int)width, 0.0f, job->out + column, (int)width);
    }
    free(q_u);
    return NULL;
}

/* Queries per block of local attention: each block's scores span the block plus both contexts of keys. */
enum { LOCAL_BLOCK = 128 };

/* Local attention (NeMo's rel_pos_local_attn without global tokens): query i sees keys i-left ... i+right within
 * the sequence, positional column c of (q+v)p^T being offset left - c, i.e. key i - left + c. A block of queries
 * multiplies with its band of keys; each row's softmax runs over its own keys only, the keys NeMo sets to -10000
 * outside the band getting the weight 0 they get there (their exp underflows). mask: NULL or (B, T) additive per
 * key (NeMo's -10000 on padded keys). */
static void *local_worker(void *arg) {
    AttentionJob *job = arg;
    long t = job->t, d_head = job->d_head, width = (long)job->heads * d_head;
    long left = job->left, right = job->right, positions = left + right + 1, span = LOCAL_BLOCK + left + right;
    float *q_u = malloc(sizeof(float) * (LOCAL_BLOCK * d_head * 2 + LOCAL_BLOCK * span * 2 + LOCAL_BLOCK * positions));
    if (q_u == NULL) {
        job->failed = 1;
        return NULL;
    }
    float *q_v = q_u + LOCAL_BLOCK * d_head, *ac = q_v + LOCAL_BLOCK * d_head, *weights = ac + LOCAL_BLOCK * span;
    float *bd = weights + LOCAL_BLOCK * span;
    for (long pair = job->first_pair; pair < job->last_pair; pair++) {
        long b = pair / job->heads, h = pair % job->heads;
        long column = b * t * width + h * d_head;
        const float *mask = job->mask != NULL ? job->mask + b * t : NULL;
        for (long start = 0; start < t; start += LOCAL_BLOCK) {
            long end = start + LOCAL_BLOCK < t ? start + LOCAL_BLOCK : t;
            long first = start - left > 0 ? start - left : 0, last = end + right < t ? end + right : t;
            long rows = end - start, keys = last - first;
            biased_queries(job, job->q + column, width, h, start, end, q_u, q_v);
            job->sgemm(ROW_MAJOR, NO_TRANS, TRANS, (int)rows, (int)keys, (int)d_head, 1.0f, q_u, (int)d_head,
                       job->k + column + first * width, (int)width, 0.0f, ac, (int)keys);
            job->sgemm(ROW_MAJOR, NO_TRANS, TRANS, (int)rows, (int)positions, (int)d_head, 1.0f, q_v, (int)d_head,
                       job->p + h * d_head, (int)width, 0.0f, bd, (int)positions);
            for (long r = 0; r < rows; r++) {
                long i = start + r;
                long low = i - left > first ? i - left : first, high = i + right + 1 < last ? i + right + 1 : last;
                float *row = weights + r * keys;
                for (long j = first; j < low; j++)
                    row[j - first] = 0.0f;
                /* key j: ac column j - first, positional column j - i + left */
                softmax_row(ac + r * keys + (low - first), bd + r * positions + (low - i + left),
                            mask != NULL ? mask + low : NULL, (int)(high - low), job->scale, row + (low - first));
                for (long j = high; j < last; j++)
                    row[j - first] = 0.0f;
            }
            job->sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, (int)rows, (int)d_head, (int)keys, 1.0f, weights, (int)keys,
                       job->v + column + first * width, (int)width, 0.0f, job->out + column + start * width,
                       (int)width);
        }
    }
    free(q_u);
    return NULL;
}

/* The (sequence, head) pairs side by side on `threads` threads when split_heads (the BLAS set to one thread by
 * the caller), else on one, the BLAS threading each product and full attention's softmax rows on `threads`. */
static int run_attention(AttentionJob job, void *(*worker)(void *), int batch, int threads, int split_heads) {
    long pairs = (long)batch * job.heads;
    AttentionJob jobs[MAX_THREADS];
    int used = split_heads ? parallel_count(pairs, threads) : 1;
    for (int n = 0; n < used; n++) {
        jobs[n] = job;
        jobs[n].first_pair = pairs * n / used;
        jobs[n].last_pair = pairs * (n + 1) / used;
        jobs[n].softmax_threads = split_heads ? 1 : threads;
    }
    parallel_run(worker, jobs, sizeof(AttentionJob), used);
    int failed = 0;
    for (int n = 0; n < used; n++)
        failed |= jobs[n].failed;
    return failed;
}

/* q, k, v (B, T, h * d_head) projections, p (2T-1, h * d_head) projected positions (shared by the batch),
 * bias_u, bias_v (h, d_head), mask NULL or (B, T, T) additive -> out (B, T, h * d_head), each head's
 * softmax(((q+u)k^T + rel_shift((q+v)p^T)) * scale + mask) v in its own d_head columns.
 * Returns nonzero when its buffers cannot be allocated. */
int canary_rel_attention(const float *q, const float *k, const float *v, const float *p, const float *bias_u,
                         const float *bias_v, const float *mask, int batch, int t, int heads, int d_head, float scale,
                         sgemm_fn sgemm, float *out, int threads, int split_heads) {
    AttentionJob job = {q, k, v, p, bias_u, bias_v, mask, t, heads, d_head, -1, -1, scale, sgemm, out, 0, 0, 1, 0};
    return run_attention(job, attention_worker, batch, threads, split_heads);
}

/* The same with local attention: p (left + right + 1, h * d_head) for offsets left ... -right, mask NULL or
 * (B, T) additive per key. */
int canary_rel_local_attention(const float *q, const float *k, const float *v, const float *p, const float *bias_u,
                               const float *bias_v, const float *mask, int batch, int t, int heads, int d_head,
                               int left, int right, float scale, sgemm_fn sgemm, float *out, int threads,
                               int split_heads) {
    AttentionJob job = {q, k, v, p, bias_u, bias_v, mask, t, heads, d_head, left, right, scale, sgemm, out, 0, 0, 1, 0};
    return run_attention(job, local_worker, batch, threads, split_heads);
}
