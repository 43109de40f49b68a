/* LayerNorm over the last axis (torch's: biased variance, eps inside the square root), vectorised and on
 * every core; MLX's x86 CPU kernel runs on one thread. Mean and variance in two passes over the row (one
 * pass, E[x^2] - E[x]^2, loses digits when the row has a large common offset), each in LANES partial sums.
 * canary_add_layer_norm makes the row first: a Conformer block's residual sum, whose LayerNorm comes next. */
#include <math.h>

#include "parallel.h"

typedef struct {
    const float *x, *weight, *bias;
    float *out;
    long width, first_row, last_row;
    float eps;
    /* For the residual's sum first: x + factor * (update + update_bias) written to `sum` (which may be update),
     * then normalised; update NULL: x normalised as it is. */
    const float *update, *update_bias;
    float factor, *sum;
} Job;

VECTOR_CLONES static float row_square_sum(const float *x, long n, float mean) {
    float lanes[LANES] = {0};
    long whole = n - n % LANES;
    for (long j = 0; j < whole; j += LANES)
        for (int l = 0; l < LANES; l++)
            lanes[l] += (x[j + l] - mean) * (x[j + l] - mean);
    float total = 0.0f;
    for (int l = 0; l < LANES; l++)
        total += lanes[l];
    for (long j = whole; j < n; j++)
        total += (x[j] - mean) * (x[j] - mean);
    return total;
}

VECTOR_CLONES static void normalise(const float *x, long n, float mean, float inverse, const float *weight,
                                    const float *bias, float *out) {
    for (long j = 0; j < n; j++)
        out[j] = (x[j] - mean) * inverse * weight[j] + bias[j];
}

/* NeMo's residual + factor * update (update a linear layer's product, its bias added here when not NULL);
 * factor is 1 or 0.5, so the product by it is exact and the sum rounds as torch's does. */
VECTOR_CLONES static void residual_row(const float *x, const float *update, const float *bias, float factor, long n,
                                       float *sum) {
    if (bias == NULL)
        for (long j = 0; j < n; j++)
            sum[j] = x[j] + factor * update[j];
    else
        for (long j = 0; j < n; j++)
            sum[j] = x[j] + factor * (update[j] + bias[j]);
}

static void *worker(void *arg) {
    Job *job = arg;
    long n = job->width;
    for (long row = job->first_row; row < job->last_row; row++) {
        const float *x = job->x + row * n;
        if (job->update != NULL) {
            residual_row(x, job->update + row * n, job->update_bias, job->factor, n, job->sum + row * n);
            x = job->sum + row * n;
        }
        float mean = vector_sum(x, n) / (float)n;
        float variance = row_square_sum(x, n, mean) / (float)n;
        normalise(x, n, mean, 1.0f / sqrtf(variance + job->eps), job->weight, job->bias, job->out + row * n);
    }
    return NULL;
}

static void run(const float *x, const float *update, const float *update_bias, float factor, float *sum, long rows,
                long width, const float *weight, const float *bias, float eps, float *out, int threads) {
    Job jobs[MAX_THREADS];
    int used = parallel_count(rows, threads);
    for (int k = 0; k < used; k++)
        jobs[k] = (Job){x, weight, bias, out, width, rows * k / used, rows * (k + 1) / used, eps, update, update_bias,
                        factor, sum};
    parallel_run(worker, jobs, sizeof(Job), used);
}

void canary_layer_norm(const float *x, long rows, long width, const float *weight, const float *bias, float eps,
                       float *out, int threads) {
    run(x, NULL, NULL, 0.0f, NULL, rows, width, weight, bias, eps, out, threads);
}

/* sum = x + factor * (update + update_bias) (update_bias may be NULL; sum may be update), out = LayerNorm(sum):
 * a Conformer block's residual step and the next module's LayerNorm in one pass over the rows. */
void canary_add_layer_norm(const float *x, const float *update, const float *update_bias, float factor, float *sum,
                           long rows, long width, const float *weight, const float *bias, float eps, float *out,
                           int threads) {
    run(x, update, update_bias, factor, sum, rows, width, weight, bias, eps, out, threads);
}
