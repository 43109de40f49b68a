/* float16 weights widened to float32 with the CPU's conversion instructions (x86 F16C).
 *
 * The goldens and verify run a float16 folder's layers with their weights copied in from the
 * mapped folder for each call (model/streaming.py). MLX's x86 CPU backend widens float16 one element at a
 * time (1.7 GB/s of output on the development machine), and a canary-1b float16 decoder call widens 0.8 GB
 * of weights; widened while they are copied in, the product layers receive float32 weights and skip it.
 * Both conversions are exact, so the products are the same to the bit.
 */
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx,f16c"))) static void widen_f16c(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = _cvtsh_ss(src[i]);
}
#endif

/* float16 bits -> float32; returns 0 (and writes nothing) where the CPU lacks the instructions. */
int canary_widen_float16(const uint16_t *src, float *dst, size_t n) {
#if defined(__x86_64__)
    if (__builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx")) {
        widen_f16c(src, dst, n);
        return 1;
    }
#endif
    (void)src, (void)dst, (void)n;
    return 0;
}
