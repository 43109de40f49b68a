/* NeMo's greedy_batch label-looping decoding of RNNT and TDT transducers, the whole loop in C, for x86 CPUs.
 *
 * model/transducer/decoding.py runs the same loop in MLX: every joint call and prediction-network step there is
 * a graph of a dozen small operations and a host round trip to decide whether to go on, which on an x86 CPU cost
 * twice the products themselves (parakeet-tdt-0.6b-v2: 0.22 s for 30 s, 0.08 s of it in the BLAS). Here the
 * products go to the BLAS MLX multiplies with (sgemv for one row, sgemm for several, bound from Python) and
 * the rest is a few loops per step.
 *
 * The batch moves in lockstep exactly as NeMo's tdt_label_looping.py / rnnt_label_looping.py (torch_impl) do,
 * because a TDT row's stored duration depends on it: NeMo takes every row's duration from each inner-loop
 * joint call, so a row that has found its label keeps being re-scored at its next frame while another row is
 * still skipping blanks, and what it stores is the last of those. Rows that cannot affect any output
 * (finished ones, and found rows of an RNNT inner loop) are not computed.
 *
 * The first LSTM layer's input product depends only on the label, so it comes as a table computed once per
 * model (x W_ih^T + b_ih for every embedding row), which saves a third of the bytes each label reads.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "vector_exp.h"

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { RELU = 0, SIGMOID = 1, TANH = 2 };
enum { DONE = 0, NO_MEMORY = 1, TOO_MANY_LABELS = 2 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *,
                         int);

/* The prediction network and joint, float32, row-major as torch stores them (out_features, in_features). */
typedef struct {
    int layers, hidden, joint_hidden, outputs, tokens; /* tokens: V + 1 (blank last); TDT durations follow */
    int duration_count;                                 /* 0 for RNNT */
    const int *duration_values;
    int activation;
    const float *first_input;           /* (tokens, 4 hidden): layer 0's x W_ih^T + b_ih for every label */
    const float *const *input_weight;   /* per layer (4 hidden, hidden); entry 0 unused */
    const float *const *input_bias;     /* per layer (4 hidden); entry 0 unused */
    const float *const *hidden_weight;  /* per layer (4 hidden, hidden) */
    const float *const *hidden_bias;    /* per layer (4 hidden) */
    const float *pred_weight, *pred_bias; /* (joint_hidden, hidden), (joint_hidden) */
    const float *net_weight, *net_bias;   /* (outputs, joint_hidden), (outputs) */
    sgemv_fn sgemv;
    sgemm_fn sgemm;
} Network;

/* out (rows, n) = x (rows, k) W^T + bias, W (n, k): one sgemv for a row (MLX's own products forward those to
 * sgemv too, blas.py), one sgemm for several. */
static void linear(const Network *net, const float *x, int rows, int k, const float *weight, const float *bias,
                   int n, float *out) {
    if (rows == 1)
        net->sgemv(ROW_MAJOR, NO_TRANS, n, k, 1.0f, weight, k, x, 1, 0.0f, out, 1);
    else
        net->sgemm(ROW_MAJOR, NO_TRANS, TRANS, rows, n, k, 1.0f, x, k, weight, k, 0.0f, out, n);
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < n; j++)
            out[(long)r * n + j] += bias[j];
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + vector_exp(-x)); }

/* One torch LSTM cell on gates = x W_ih^T + b_ih + h W_hh^T + b_hh (split i, f, g, o): c and h updated. */
VECTOR_CLONES static void lstm_cell(const float *gates, int hidden, float *h, float *c) {
    const float *i = gates, *f = gates + hidden, *g = gates + 2 * hidden, *o = gates + 3 * hidden;
    for (int j = 0; j < hidden; j++)
        c[j] = sigmoid(f[j]) * c[j] + sigmoid(i[j]) * tanhf(g[j]);
    for (int j = 0; j < hidden; j++)
        h[j] = sigmoid(o[j]) * tanhf(c[j]);
}

typedef struct {
    int batch, frames;
    const float *enc; /* (batch, frames, joint_hidden): the encoder output through the joint's enc projection */
    float *h, *c;     /* (layers, batch, hidden) */
    float *pred;      /* (batch, joint_hidden): the joint's pred projection of each row's last output */
    int *rows;        /* scratch: the rows one call works on */
    float *x, *hx, *gates, *products, *z, *logits; /* scratch, batch rows each */
} State;

/* The prediction network on `labels` for `count` rows (indices in rows[]), their h, c and pred replaced. */
static void predict(const Network *net, State *s, const int *labels, int count) {
    int hidden = net->hidden, wide = 4 * hidden;
    for (int l = 0; l < net->layers; l++) {
        float *h = s->h + (long)l * s->batch * hidden, *c = s->c + (long)l * s->batch * hidden;
        for (int k = 0; k < count; k++)
            memcpy(s->hx + (long)k * hidden, h + (long)s->rows[k] * hidden, sizeof(float) * hidden);
        linear(net, s->hx, count, hidden, net->hidden_weight[l], net->hidden_bias[l], wide, s->products);
        if (l == 0) {
            for (int k = 0; k < count; k++)
                memcpy(s->gates + (long)k * wide, net->first_input + (long)labels[s->rows[k]] * wide,
                       sizeof(float) * wide);
        } else {
            linear(net, s->x, count, hidden, net->input_weight[l], net->input_bias[l], wide, s->gates);
        }
        for (int k = 0; k < count; k++) {
            float *gates = s->gates + (long)k * wide, *product = s->products + (long)k * wide;
            for (int j = 0; j < wide; j++)
                gates[j] += product[j]; /* torch's order: (x W_ih^T + b_ih) + (h W_hh^T + b_hh) */
            long row = (long)s->rows[k] * hidden;
            lstm_cell(gates, hidden, h + row, c + row);
            memcpy(s->x + (long)k * hidden, h + row, sizeof(float) * hidden); /* the next layer's input */
        }
    }
    linear(net, s->x, count, hidden, net->pred_weight, net->pred_bias, net->joint_hidden, s->logits);
    for (int k = 0; k < count; k++)
        memcpy(s->pred + (long)s->rows[k] * net->joint_hidden, s->logits + (long)k * net->joint_hidden,
               sizeof(float) * net->joint_hidden);
}

static inline float activate(int activation, float x) {
    if (activation == RELU)
        return x > 0.0f ? x : 0.0f;
    return activation == SIGMOID ? 1.0f / (1.0f + expf(-x)) : tanhf(x);
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int j = 1; j < n; j++)
        if (x[j] > x[best])
            best = j;
    return best;
}

/* The joint at each listed row's frame safe[row] with its pred: best label and (TDT) duration value. */
static void joint(const Network *net, State *s, const int *safe, int count, int *label, int *duration) {
    int width = net->joint_hidden;
    for (int k = 0; k < count; k++) {
        int row = s->rows[k];
        const float *enc = s->enc + ((long)row * s->frames + safe[row]) * width;
        const float *pred = s->pred + (long)row * width;
        float *z = s->z + (long)k * width;
        for (int j = 0; j < width; j++)
            z[j] = activate(net->activation, enc[j] + pred[j]);
    }
    linear(net, s->z, count, width, net->net_weight, net->net_bias, net->outputs, s->logits);
    for (int k = 0; k < count; k++) {
        const float *logits = s->logits + (long)k * net->outputs;
        int row = s->rows[k];
        label[row] = argmax(logits, net->tokens);
        duration[row] = net->duration_count ? net->duration_values[argmax(logits + net->tokens, net->duration_count)]
                                            : 0;
    }
}

/* Each row's place in the search, NeMo's names. */
typedef struct {
    const int *lengths;
    int *time, *safe, *last, *labels, *duration, *label_time, *last_label_frame, *labels_on_frame;
    int *scored_label, *scored_duration; /* one joint call's results */
    char *active, *active_before, *advance;
} Rows;

/* Row r takes a joint call's result: the label if it is `moving` (searching on), the duration in any case
 * (NeMo keeps every row's duration from each call); then it moves: TDT by the duration (a blank of duration 0
 * still moves one frame), RNNT by one frame on a blank. Returns whether it goes on past a blank. */
static int take(Rows *b, int r, int moving, int tdt, int blank) {
    if (moving) {
        b->label_time[r] = b->time[r];
        b->labels[r] = b->scored_label[r];
    }
    int is_blank = b->labels[r] == blank;
    if (tdt) {
        b->duration[r] = b->scored_duration[r] == 0 && is_blank ? 1 : b->scored_duration[r];
        b->time[r] += moving ? b->duration[r] : 0;
    } else {
        b->time[r] += is_blank;
    }
    b->safe[r] = b->time[r] < b->last[r] ? b->time[r] : b->last[r];
    b->active[r] = b->time[r] < b->lengths[r];
    b->advance[r] = b->active[r] && is_blank;
    return b->advance[r];
}

/* Greedy label-looping decoding of `batch` rows of `frames` projected encoder states, valid lengths[row]
 * frames each. Row r's labels, their frames and (TDT) durations go to out_*[r * capacity ...], their number
 * to counts[r]. max_symbols: labels allowed on one frame before it is left (NeMo's greedy.max_symbols).
 * Returns DONE, NO_MEMORY, or TOO_MANY_LABELS when a row would pass `capacity`. */
int canary_label_looping(const Network *net, const float *enc, int batch, int frames, const int *lengths, int blank,
                         int max_symbols, int capacity, int *out_labels, int *out_frames, int *out_durations,
                         int *counts) {
    int hidden = net->hidden, wide = 4 * hidden, width = net->joint_hidden;
    int most = net->outputs > wide ? net->outputs : wide;
    most = most > width ? most : width;
    State s = {.batch = batch, .frames = frames, .enc = enc};
    long state_size = (long)net->layers * batch * hidden;
    s.h = calloc(state_size, sizeof(float));
    s.c = calloc(state_size, sizeof(float));
    s.pred = malloc(sizeof(float) * batch * width);
    s.rows = malloc(sizeof(int) * batch);
    s.x = malloc(sizeof(float) * batch * hidden);
    s.hx = malloc(sizeof(float) * batch * hidden);
    s.gates = malloc(sizeof(float) * batch * wide);
    s.products = malloc(sizeof(float) * batch * wide);
    s.z = malloc(sizeof(float) * batch * width);
    s.logits = malloc(sizeof(float) * batch * most);
    int *ints = calloc((size_t)batch * 10, sizeof(int));
    char *flags = calloc((size_t)batch * 3, 1);
    int status = DONE;
    if (!s.h || !s.c || !s.pred || !s.rows || !s.x || !s.hx || !s.gates || !s.products || !s.z || !s.logits || !ints ||
        !flags) {
        status = NO_MEMORY;
        goto done;
    }
    Rows b = {lengths,         ints,          ints + batch,     ints + 2 * batch, ints + 3 * batch,
              ints + 4 * batch, ints + 5 * batch, ints + 6 * batch, ints + 7 * batch, ints + 8 * batch,
              ints + 9 * batch, flags,         flags + batch,    flags + 2 * batch};
    int tdt = net->duration_count > 0;

    /* NeMo starts every row from the blank (a zero embedding) and a zero state. */
    for (int r = 0; r < batch; r++) {
        s.rows[r] = r;
        b.labels[r] = blank;
        b.last[r] = lengths[r] > 0 ? lengths[r] - 1 : 0;
        b.active[r] = lengths[r] > 0;
        b.last_label_frame[r] = -1;
        counts[r] = 0;
    }
    predict(net, &s, b.labels, batch);

    for (;;) {
        int count = 0;
        for (int r = 0; r < batch; r++)
            if (b.active[r])
                s.rows[count++] = r;
        if (count == 0)
            break;
        memcpy(b.active_before, b.active, batch);
        joint(net, &s, b.safe, count, b.scored_label, b.scored_duration);
        int advancing = 0;
        for (int k = 0; k < count; k++)
            advancing += take(&b, s.rows[k], 1, tdt, blank);
        while (advancing) {
            /* Rows skipping blanks are scored again; in TDT so is every row still in play, for its duration. */
            count = 0;
            for (int r = 0; r < batch; r++)
                if (b.advance[r] || (tdt && b.active_before[r]))
                    s.rows[count++] = r;
            joint(net, &s, b.safe, count, b.scored_label, b.scored_duration);
            advancing = 0;
            for (int k = 0; k < count; k++)
                advancing += take(&b, s.rows[k], b.advance[s.rows[k]], tdt, blank);
        }
        /* RNNT keeps a row with a label active until a blank ends it; TDT's duration may end it at once. */
        count = 0;
        for (int r = 0; r < batch; r++) {
            int found = tdt ? b.active_before[r] && b.labels[r] != blank : b.active[r];
            if (!found)
                continue;
            if (counts[r] == capacity) {
                status = TOO_MANY_LABELS;
                goto done;
            }
            long at = (long)r * capacity + counts[r]++;
            out_labels[at] = b.labels[r];
            out_frames[at] = b.label_time[r];
            out_durations[at] = tdt ? b.duration[r] : 0;
            b.labels_on_frame[r] = b.last_label_frame[r] == b.label_time[r] ? b.labels_on_frame[r] + 1 : 1;
            b.last_label_frame[r] = b.label_time[r];
            s.rows[count++] = r;
        }
        if (count)
            predict(net, &s, b.labels, count);
        for (int r = 0; r < batch && max_symbols > 0; r++) {
            /* after max_symbols labels on one frame, the frame is left */
            if (b.active[r] && b.labels[r] != blank && b.labels_on_frame[r] >= max_symbols &&
                b.last_label_frame[r] == b.time[r]) {
                b.time[r] += 1;
                b.safe[r] = b.time[r] < b.last[r] ? b.time[r] : b.last[r];
                b.active[r] = b.time[r] < lengths[r];
            }
        }
    }
done:
    free(flags);
    free(s.h);
    free(s.c);
    free(s.pred);
    free(s.rows);
    free(s.x);
    free(s.hx);
    free(s.gates);
    free(s.products);
    free(s.z);
    free(s.logits);
    free(ints);
    return status;
}
