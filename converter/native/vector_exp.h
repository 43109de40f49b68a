/* exp for loops the compiler vectorises, shared by the encoder kernels (rel_softmax.c, activations.c).
 *
 * As model/cpu/activations.py composes it for MLX: e**x = 2**n * 2**f, n = round(x / ln 2), |f| <= 1/2, 2**f
 * from its Taylor series to degree 7 (truncation below 1e-8, so float32 rounding dominates), 2**n assembled in
 * the float's exponent bits; exactly 0 below about e**-87.3, and inputs above 88 are taken as 88.
 */
#ifndef CANARY_VECTOR_EXP_H
#define CANARY_VECTOR_EXP_H

#include <stdint.h>
#include <string.h>

#include "parallel.h"

/* (ln 2)**k / k! for k = 7 ... 0, Horner's order. */
static const float TAYLOR[8] = {1.5252733804059841e-05f, 1.5403530393381606e-04f, 1.3333558146428441e-03f,
                                9.6181291076284770e-03f, 5.5504108664821576e-02f, 2.4022650695910069e-01f,
                                6.9314718055994529e-01f, 1.0f};

static inline float vector_exp(float x) {
    const float rounder = 12582912.0f; /* 1.5 * 2**23: adding and subtracting it rounds to an integer */
    x = x < -88.0f ? -88.0f : (x > 88.0f ? 88.0f : x);
    float scaled = x * 1.4426950408889634f;
    float whole = (scaled + rounder) - rounder;
    float fraction = scaled - whole;
    float power = TAYLOR[0];
    for (int k = 1; k < 8; k++)
        power = power * fraction + TAYLOR[k];
    int32_t biased = (int32_t)whole + 127;
    biased = biased > 0 ? biased : 0;
    int32_t bits = biased << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return two_n * power;
}

#endif
