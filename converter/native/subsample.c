/* The stride-2 3x3 convolutions of NeMo's dw_striding subsampling, vectorised over channels and threaded.
 *
 * MLX's x86 CPU backend runs elementwise work on one thread without wide vectors, and the subsampling's first
 * stages are nothing but that: the 1->C convolution writes a (T/2, F/2, C) array (98 MB for canary on 30 s),
 * a ReLU pass reads and writes it again, and the depthwise convolution reads it through nine strided views.
 * Here each thread makes the first convolution's rows as the depthwise one needs them (three rows of
 * F/2 x C floats, kept in cache) and never writes the large array: 22% of a canary-180m-flash encoder on
 * the development machine became a few percent.
 *
 * Channels-last float32 throughout, as the MLX model holds them. Weights come transposed to (9, C), tap-major
 * (row a, column b of the 3x3 kernel at a*3+b), so the innermost loop runs over contiguous channels. Padding
 * is NeMo's: one zero row and column each side; rows at or past a sequence's valid length count as zeros
 * (NeMo's MaskedConvSequential zeroes them before each conv). Only the order of the sums differs from NeMo's.
 */
#include <stdlib.h>
#include <string.h>

#include "parallel.h"

/* Row r of ReLU(conv 1->C, 3x3, stride 2, padding 1) over x (T, F); input rows >= valid are zeros. */
VECTOR_CLONES static void first_conv_row(const float *x, int frames, int freq, int valid, int r, int out_freq,
                                         int channels, const float *weight, const float *bias, float *row) {
    for (int q = 0; q < out_freq; q++) {
        float *out = row + (size_t)q * channels;
        for (int c = 0; c < channels; c++)
            out[c] = 0.0f;
        for (int a = 0; a < 3; a++) {
            int t = 2 * r - 1 + a;
            if (t < 0 || t >= frames || t >= valid)
                continue;
            for (int b = 0; b < 3; b++) {
                int f = 2 * q - 1 + b;
                if (f < 0 || f >= freq)
                    continue;
                float value = x[(size_t)t * freq + f];
                const float *w = weight + (size_t)(a * 3 + b) * channels;
                for (int c = 0; c < channels; c++)
                    out[c] += value * w[c];
            }
        }
        for (int c = 0; c < channels; c++) {
            float v = out[c] + bias[c];
            out[c] = v > 0.0f ? v : 0.0f;
        }
    }
}

/* Output row of the depthwise 3x3 stride-2 conv from input rows 2i-1, 2i, 2i+1 (NULL: a zero row), each
 * (width, C); `relu` applies a ReLU to the inputs as they are read. */
VECTOR_CLONES static void depthwise_row(const float *const rows[3], int width, int out_width, int channels,
                                        const float *weight, const float *bias, int relu, float *out_row) {
    for (int j = 0; j < out_width; j++) {
        float *out = out_row + (size_t)j * channels;
        for (int c = 0; c < channels; c++)
            out[c] = 0.0f;
        for (int a = 0; a < 3; a++) {
            if (rows[a] == NULL)
                continue;
            for (int b = 0; b < 3; b++) {
                int q = 2 * j - 1 + b;
                if (q < 0 || q >= width)
                    continue;
                const float *in = rows[a] + (size_t)q * channels;
                const float *w = weight + (size_t)(a * 3 + b) * channels;
                if (relu) {
                    for (int c = 0; c < channels; c++)
                        out[c] += (in[c] > 0.0f ? in[c] : 0.0f) * w[c];
                } else {
                    for (int c = 0; c < channels; c++)
                        out[c] += in[c] * w[c];
                }
            }
        }
        for (int c = 0; c < channels; c++)
            out[c] += bias[c];
    }
}

typedef struct {
    const float *x;  /* stem: features (B, T, F); depthwise: input (B, H, W, C) */
    int batch, height, width, channels, out_height, out_width;
    const int *valid;     /* per sequence: input rows (stem: frames) at or past it are zeros */
    const int *mid_valid; /* stem only: first-conv rows at or past it are zeros */
    const float *first_weight, *first_bias, *weight, *bias;
    float *out;
    int first_row, last_row; /* this worker's share of the B * out_height output rows */
    int failed;
} Job;

static void *stem_worker(void *arg) {
    Job *job = arg;
    int mid_width = (job->width - 1) / 2 + 1;
    size_t row_floats = (size_t)mid_width * job->channels;
    float *buffers = malloc(3 * row_floats * sizeof(float));
    if (buffers == NULL) {
        job->failed = 1;
        return NULL;
    }
    int mid_height = (job->height - 1) / 2 + 1;
    int cached_seq = -1, cached_row = -1; /* buffers[2] holds first-conv row cached_row of cached_seq */
    for (int index = job->first_row; index < job->last_row; index++) {
        int s = index / job->out_height, i = index % job->out_height;
        const float *x = job->x + (size_t)s * job->height * job->width;
        const float *rows[3];
        for (int a = 0; a < 3; a++) {
            int r = 2 * i - 1 + a;
            float *buffer = buffers + (size_t)a * row_floats;
            if (r < 0 || r >= mid_height || r >= job->mid_valid[s]) {
                rows[a] = NULL;
            } else if (a == 0 && s == cached_seq && r == cached_row) {
                memcpy(buffer, buffers + 2 * row_floats, row_floats * sizeof(float));
                rows[a] = buffer;
            } else {
                first_conv_row(x, job->height, job->width, job->valid[s], r, mid_width, job->channels,
                               job->first_weight, job->first_bias, buffer);
                rows[a] = buffer;
            }
        }
        cached_seq = rows[2] ? s : -1;
        cached_row = 2 * i + 1;
        depthwise_row(rows, mid_width, job->out_width, job->channels, job->weight, job->bias, 0,
                      job->out + (size_t)index * job->out_width * job->channels);
    }
    free(buffers);
    return NULL;
}

static void *depthwise_worker(void *arg) {
    Job *job = arg;
    size_t row_floats = (size_t)job->width * job->channels;
    for (int index = job->first_row; index < job->last_row; index++) {
        int s = index / job->out_height, i = index % job->out_height;
        const float *y = job->x + (size_t)s * job->height * row_floats;
        const float *rows[3];
        for (int a = 0; a < 3; a++) {
            int r = 2 * i - 1 + a;
            rows[a] = (r < 0 || r >= job->height || r >= job->valid[s]) ? NULL : y + (size_t)r * row_floats;
        }
        depthwise_row(rows, job->width, job->out_width, job->channels, job->weight, job->bias, 1,
                      job->out + (size_t)index * job->out_width * job->channels);
    }
    return NULL;
}

/* Runs `worker` over the output rows on up to `threads` threads (the caller's included); 0 on success. */
static int run(Job *template, void *(*worker)(void *), int threads) {
    int rows = template->batch * template->out_height;
    Job jobs[MAX_THREADS];
    int used = parallel_count(rows, threads);
    for (int k = 0; k < used; k++) {
        jobs[k] = *template;
        jobs[k].first_row = (int)((long)rows * k / used);
        jobs[k].last_row = (int)((long)rows * (k + 1) / used);
        jobs[k].failed = 0;
    }
    parallel_run(worker, jobs, sizeof(Job), used);
    int failed = 0;
    for (int k = 0; k < used; k++)
        failed |= jobs[k].failed;
    return failed;
}

static Job depthwise_job(const float *x, int batch, int height, int width, int channels, const int *valid,
                         const float *weight, const float *bias, float *out) {
    Job job = {0};
    job.x = x;
    job.batch = batch;
    job.height = height;
    job.width = width;
    job.channels = channels;
    job.valid = valid;
    job.weight = weight;
    job.bias = bias;
    job.out = out;
    return job;
}

/* ReLU(conv 1->C 3x3/2) then the depthwise 3x3/2 conv: x (B, T, F) -> out (B, T2, F2, C), T2 and F2 each
 * halved twice (rounding up). valid[s]: frames of sequence s; mid_valid[s]: its first-conv rows. */
int canary_subsample_stem(const float *x, int batch, int frames, int freq, const int *valid, const int *mid_valid,
                          const float *first_weight, const float *first_bias, const float *weight, const float *bias,
                          int channels, float *out, int threads) {
    Job job = depthwise_job(x, batch, frames, freq, channels, valid, weight, bias, out);
    int mid_height = (frames - 1) / 2 + 1, mid_width = (freq - 1) / 2 + 1;
    job.out_height = (mid_height - 1) / 2 + 1;
    job.out_width = (mid_width - 1) / 2 + 1;
    job.mid_valid = mid_valid;
    job.first_weight = first_weight;
    job.first_bias = first_bias;
    return run(&job, stem_worker, threads);
}

/* The depthwise 3x3/2 conv of ReLU(y): y (B, H, W, C) -> out (B, H2, W2, C); rows of sequence s at or past
 * valid[s] are zeros. */
int canary_relu_depthwise(const float *y, int batch, int height, int width, int channels, const int *valid,
                          const float *weight, const float *bias, float *out, int threads) {
    Job job = depthwise_job(y, batch, height, width, channels, valid, weight, bias, out);
    job.out_height = (height - 1) / 2 + 1;
    job.out_width = (width - 1) / 2 + 1;
    return run(&job, depthwise_worker, threads);
}
