/* cblas_sgemm for MLX's Linux CPU backend that sends matrix-vector products to cblas_sgemv.
 *
 * MLX multiplies every float32 matmul with cblas_sgemm, including the (1, K) x (K, N) products of a decoder
 * step. OpenBLAS before 0.3.27 runs those through its general kernel at about a third of the memory
 * bandwidth its sgemv reaches (Debian bookworm ships 0.3.21), and a decoder step is nothing but such
 * products. Loaded into the global symbol scope ahead of OpenBLAS (see blas.py), this cblas_sgemm is the one
 * libmlx.so binds to; it calls OpenBLAS's sgemv when M or N is 1 and its sgemm otherwise, both bound at
 * load time by canary_gemv_bind. Only row-major calls are forwarded, which is all MLX makes.
 */
#include <stddef.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *,
                         int);

static sgemm_fn real_sgemm = NULL;
static sgemv_fn real_sgemv = NULL;
static long forwarded = 0;

void canary_gemv_bind(sgemm_fn sgemm, sgemv_fn sgemv) {
    real_sgemm = sgemm;
    real_sgemv = sgemv;
}

/* How many products went to sgemv: lets tests and --version prove the forwarding is live. */
long canary_gemv_forwarded(void) { return forwarded; }

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    if (order == ROW_MAJOR && k > 0 && m == 1 && n > 1) {
        /* c(1, n) = a(1, k) op(b)(k, n), i.e. c' = op(b)' a': b is (n, k) when transposed, (k, n) otherwise. */
        int b_trans = trans_b != NO_TRANS;
        int a_step = trans_a == NO_TRANS ? 1 : lda;
        real_sgemv(ROW_MAJOR, b_trans ? NO_TRANS : TRANS, b_trans ? n : k, b_trans ? k : n, alpha, b, ldb, a,
                   a_step, beta, c, 1);
        __atomic_add_fetch(&forwarded, 1, __ATOMIC_RELAXED);
        return;
    }
    if (order == ROW_MAJOR && k > 0 && n == 1 && m > 1) {
        /* c(m, 1) = op(a)(m, k) b(k, 1): a is (k, m) when transposed, (m, k) otherwise. */
        int a_trans = trans_a != NO_TRANS;
        int b_step = trans_b == NO_TRANS ? ldb : 1;
        real_sgemv(ROW_MAJOR, a_trans ? TRANS : NO_TRANS, a_trans ? k : m, a_trans ? m : k, alpha, a, lda, b,
                   b_step, beta, c, ldc);
        __atomic_add_fetch(&forwarded, 1, __ATOMIC_RELAXED);
        return;
    }
    real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
