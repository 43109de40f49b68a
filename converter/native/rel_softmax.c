/* The softmax of Transformer-XL attention scores, with the relative shift, the scale and the mask folded in.
 *
 * NeMo's RelPositionMultiHeadAttention computes softmax((ac + rel_shift(bd)) / sqrt(d_k)) with ac = (q+u)k^T
 * (B, h, T, T) and bd = (q+v)p^T (B, h, T, 2T-1), whose shift puts bd[..., i, T-1-i+j] at column j. On an x86
 * CPU MLX makes that five passes on one thread without wide vectors (the shifted copy, the scale, the sum, the
 * mask, then the softmax, with exp composed from its vectorised operations: model/cpu/activations.py). Here one
 * pass per row reads both products and writes the weights, vectorised and on every core.
 */
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
    int heads, t;
    float scale;
    float *out;
    long first_row, last_row;
} Job;

static void *worker(void *arg) {
    Job *job = arg;
    long t = job->t, p = 2 * t - 1;
    for (long row = job->first_row; row < job->last_row; row++) {
        long i = row % t, sequence = row / t / job->heads;
        /* Column j of the shifted product is bd[..., i, T-1-i+j]. */
        const float *bd = job->bd + row * p + (t - 1 - i);
        const float *mask = job->mask != NULL ? job->mask + (sequence * t + i) * t : NULL;
        softmax_row(job->ac + row * t, bd, mask, (int)t, job->scale, job->out + row * t);
    }
    return NULL;
}

/* ac (B, h, T, T), bd (B, h, T, 2T-1), mask NULL or (B, 1, T, T) additive -> out (B, h, T, T). */
void canary_rel_softmax(const float *ac, const float *bd, const float *mask, int batch, int heads, int t, float scale,
                        float *out, int threads) {
    long rows = (long)batch * heads * t;
    Job jobs[MAX_THREADS];
    int used = parallel_count(rows, threads);
    for (int k = 0; k < used; k++)
        jobs[k] = (Job){ac, bd, mask, heads, t, scale, out, rows * k / used, rows * (k + 1) / used};
    parallel_run(worker, jobs, sizeof(Job), used);
}
