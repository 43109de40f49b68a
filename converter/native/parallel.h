/* What the encoder kernels share: builds for each vector width, and their work split over threads. */
#ifndef CANARY_PARALLEL_H
#define CANARY_PARALLEL_H

#include <pthread.h>
#include <stddef.h>

/* Each kernel comes in AVX-512, AVX2 and baseline builds, picked at load time by the CPU. */
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

enum { MAX_THREADS = 64 };

/* Sums and maxima run in LANES partial results, which the compiler keeps in one vector register (a single
 * running float would be a chain of dependent scalar operations). */
enum { LANES = 16 };

static inline float vector_sum(const float *x, long n) {
    float lanes[LANES] = {0};
    long whole = n - n % LANES;
    for (long j = 0; j < whole; j += LANES)
        for (int l = 0; l < LANES; l++)
            lanes[l] += x[j + l];
    float total = 0.0f;
    for (int l = 0; l < LANES; l++)
        total += lanes[l];
    for (long j = whole; j < n; j++)
        total += x[j];
    return total;
}

/* Calls worker(jobs + k * job_size) for k < count (count <= MAX_THREADS), on count threads, the caller's
 * included; a thread that cannot be started has its share run on the caller's. */
static inline void parallel_run(void *(*worker)(void *), void *jobs, size_t job_size, int count) {
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    char *base = jobs;
    for (int k = 1; k < count; k++)
        started[k] = pthread_create(&ids[k], NULL, worker, base + k * job_size) == 0;
    worker(base);
    for (int k = 1; k < count; k++) {
        if (started[k])
            pthread_join(ids[k], NULL);
        else
            worker(base + k * job_size);
    }
}

/* How many threads to use for `items` pieces of work when `threads` are asked for. */
static inline int parallel_count(long items, int threads) {
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > items)
        threads = (int)items;
    return threads < 1 ? 1 : threads;
}

#endif
