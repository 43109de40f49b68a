/* SiLU and GLU over float32 arrays, vectorised and on every core, for the encoder on x86 CPUs.
 *
 * MLX evaluates exp one element at a time on x86; model/cpu/activations.py composes it from MLX operations the
 * backend does vectorise, but those still run on one thread with narrow vectors: a canary-180m-flash feed-forward
 * SiLU over (376, 2048) took 2.4 ms. Same formulas as activations.py: x / (1 + e**-x), a / (1 + e**-gate), with
 * the linear layer's bias added on the way when MLX multiplied without it.
 */
#include "parallel.h"
#include "vector_exp.h"

/* SiLU of rows of `width` values plus a bias per column (NULL: none), the linear layer's bias MLX did not add:
 * its addmm first copies the bias into every row of the product. out may be x (then x is overwritten). */
VECTOR_CLONES static void silu_rows(const float *x, const float *bias, float *out, long first_row, long last_row,
                                    long width) {
    for (long row = first_row; row < last_row; row++) {
        const float *in = x + row * width;
        float *o = out + row * width;
        if (bias == NULL)
            for (long j = 0; j < width; j++)
                o[j] = in[j] / (1.0f + vector_exp(-in[j]));
        else
            for (long j = 0; j < width; j++) {
                float value = in[j] + bias[j];
                o[j] = value / (1.0f + vector_exp(-value));
            }
    }
}

/* torch's GLU over the last axis: rows of 2d values (plus a bias of 2d, or NULL) -> rows of d, first half times
 * sigmoid(second half). */
VECTOR_CLONES static void glu_rows(const float *x, const float *bias, float *out, long first_row, long last_row,
                                   long d) {
    for (long row = first_row; row < last_row; row++) {
        const float *a = x + row * 2 * d, *gate = a + d;
        float *o = out + row * d;
        if (bias == NULL)
            for (long j = 0; j < d; j++)
                o[j] = a[j] / (1.0f + vector_exp(-gate[j]));
        else
            for (long j = 0; j < d; j++)
                o[j] = (a[j] + bias[j]) / (1.0f + vector_exp(-(gate[j] + bias[d + j])));
    }
}

typedef struct {
    const float *x, *bias;
    float *out;
    long first, last, width;
    int glu; /* SiLU over rows of `width`, or GLU over rows of 2 * `width` */
} Job;

static void *worker(void *arg) {
    Job *job = arg;
    if (job->glu)
        glu_rows(job->x, job->bias, job->out, job->first, job->last, job->width);
    else
        silu_rows(job->x, job->bias, job->out, job->first, job->last, job->width);
    return NULL;
}

static void run(const float *x, const float *bias, float *out, long rows, long width, int glu, int threads) {
    Job jobs[MAX_THREADS];
    int used = parallel_count(rows, threads);
    for (int k = 0; k < used; k++)
        jobs[k] = (Job){x, bias, out, rows * k / used, rows * (k + 1) / used, width, glu};
    parallel_run(worker, jobs, sizeof(Job), used);
}

/* x (rows, width) + bias (width) or NULL -> out (rows, width), which may be x. */
void canary_silu(const float *x, const float *bias, float *out, long rows, long width, int threads) {
    run(x, bias, out, rows, width, 0, threads);
}

/* x (rows, 2d) + bias (2d) or NULL -> out (rows, d). */
void canary_glu(const float *x, const float *bias, float *out, long rows, long d, int threads) {
    run(x, bias, out, rows, d, 1, threads);
}
