/* The conformer conv module's depthwise convolution over time, its BatchNorm and SiLU, in one pass.
 *
 * MLX's x86 CPU backend made them k + 3 passes on one thread without wide vectors (k shifted multiply-adds,
 * the BatchNorm, the composed SiLU); here each output row reads its k input rows once, vectorised over
 * channels and on every core. Channels-last (B, T, C); NeMo's symmetric padding, (k-1)/2 zeros each side.
 * BatchNorm in inference form as NeMo evaluates it: (y - mean) * (weight / sqrt(var + eps)) + bias, with the
 * per-channel factor computed by the caller.
 */
#include "parallel.h"
#include "vector_exp.h"

typedef struct {
    const float *x, *taps, *conv_bias, *mean, *factor, *shift;
    float *out;
    long frames, channels, kernel, first_row, last_row;
} Job;

VECTOR_CLONES static void conv_row(const Job *job, long row) {
    long t = row % job->frames, channels = job->channels, pad = (job->kernel - 1) / 2;
    const float *sequence = job->x + (row - t) * channels;
    float *out = job->out + row * channels;
    for (long c = 0; c < channels; c++)
        out[c] = 0.0f;
    for (long tap = 0; tap < job->kernel; tap++) {
        long source = t + tap - pad;
        if (source < 0 || source >= job->frames)
            continue;
        const float *in = sequence + source * channels, *w = job->taps + tap * channels;
        for (long c = 0; c < channels; c++)
            out[c] += in[c] * w[c];
    }
    for (long c = 0; c < channels; c++) {
        float y = out[c] + (job->conv_bias != NULL ? job->conv_bias[c] : 0.0f);
        y = (y - job->mean[c]) * job->factor[c] + job->shift[c];
        out[c] = y / (1.0f + vector_exp(-y));
    }
}

static void *worker(void *arg) {
    Job *job = arg;
    for (long row = job->first_row; row < job->last_row; row++)
        conv_row(job, row);
    return NULL;
}

/* x (B, T, C) -> out (B, T, C) = SiLU(BatchNorm(depthwise conv(x))); taps (k, C) tap-major; conv_bias may be
 * NULL. */
void canary_depthwise_bn_silu(const float *x, long batch, long frames, long channels, const float *taps, long kernel,
                              const float *conv_bias, const float *mean, const float *factor, const float *shift,
                              float *out, int threads) {
    long rows = batch * frames;
    Job jobs[MAX_THREADS];
    int used = parallel_count(rows, threads);
    for (int k = 0; k < used; k++)
        jobs[k] = (Job){x, taps, conv_bias, mean, factor, shift, out, frames, channels, kernel, rows * k / used,
                        rows * (k + 1) / used};
    parallel_run(worker, jobs, sizeof(Job), used);
}
