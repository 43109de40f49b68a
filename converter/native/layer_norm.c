/* LayerNorm over the last axis (torch's: biased variance, eps inside the square root), vectorised and on
 * every core; MLX's x86 CPU kernel runs on one thread. Mean and variance in two passes over the row (one
 * pass, E[x^2] - E[x]^2, loses digits when the row has a large common offset), each in LANES partial sums. */
#include <math.h>

#include "parallel.h"

typedef struct {
    const float *x, *weight, *bias;
    float *out;
    long width, first_row, last_row;
    float eps;
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

static void *worker(void *arg) {
    Job *job = arg;
    long n = job->width;
    for (long row = job->first_row; row < job->last_row; row++) {
        const float *x = job->x + row * n;
        float mean = vector_sum(x, n) / (float)n;
        float variance = row_square_sum(x, n, mean) / (float)n;
        normalise(x, n, mean, 1.0f / sqrtf(variance + job->eps), job->weight, job->bias, job->out + row * n);
    }
    return NULL;
}

void canary_layer_norm(const float *x, long rows, long width, const float *weight, const float *bias, float eps,
                       float *out, int threads) {
    Job jobs[MAX_THREADS];
    int used = parallel_count(rows, threads);
    for (int k = 0; k < used; k++)
        jobs[k] = (Job){x, weight, bias, out, width, rows * k / used, rows * (k + 1) / used, eps};
    parallel_run(worker, jobs, sizeof(Job), used);
}
