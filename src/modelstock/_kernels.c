/* Fused CPU loops for the Model Stock merge of 16-bit and 32-bit float weights.
 *
 * The pure-torch path (modelstock/stock.py) makes ten passes over each cache block: widen
 * the anchor, widen and subtract each fine-tune, sum, widen to float64, Gram product, and so
 * on. These loops do the same arithmetic in one pass per block, to the same rounding: task
 * vectors and their sum in float32, dot products of float32 values exact in float64 and
 * accumulated there, the output rounded once to float32 and then to the output dtype.
 * Loaded with ctypes (which releases the GIL), so worker threads run them in parallel.
 * Plain C99; `modelstock.kernels` falls back to torch when this library is absent, or when
 * its ms_version() is not the one that module expects (a build older than the source).
 */
#ifdef MODELSTOCK_PYTHON_MODULE /* set by setup.py: also an importable (empty) module */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif
#include <stdint.h>
#include <string.h>

#define VERSION 1    /* bump when an entry point's arguments or meaning change */
#define BLK 512      /* elements per block: for a few models, N + 1 rows of it stay in L1 */
#define MAX_MODELS 16

enum { F32 = 0, BF16 = 1 };

/* With GCC or clang on x86-64 Linux, each entry point is also built for AVX2 and the loader
 * picks the build the CPU supports (the Gram loop runs ~1.4x faster with 256-bit vectors). */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define ENTRY __attribute__((target_clones("avx2", "default")))
#else
#define ENTRY
#endif
#if defined(__GNUC__) || defined(__clang__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif
#ifdef _WIN32
#define EXPORT __declspec(dllexport)
#else
#define EXPORT
#endif
#ifdef _MSC_VER
#define restrict __restrict
#endif

EXPORT int ms_version(void) { return VERSION; }

INLINE float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

INLINE void widen(const void *src, int dt, int64_t start, int64_t m, float *dst) {
    if (dt == F32) {
        memcpy(dst, (const float *)src + start, (size_t)m * 4);
    } else {
        const uint16_t *h = (const uint16_t *)src + start;
        for (int64_t k = 0; k < m; k++) dst[k] = bits_to_f32((uint32_t)h[k] << 16);
    }
}

/* float32 -> bfloat16, round to nearest even; NaN -> 0x7fc0 (as torch's c10::BFloat16). */
INLINE uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* sum_k x[k] y[k] in float64 (products of widened float32 values are exact); eight
 * independent partial sums, so that the compiler can vectorise without reassociating. */
INLINE double dot(const float *restrict x, const float *restrict y, int64_t m) {
    double a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= m; k += 8)
        for (int l = 0; l < 8; l++) a[l] += (double)x[k + l] * (double)y[k + l];
    for (; k < m; k++) a[k & 7] += (double)x[k] * (double)y[k];
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* d[i] = models[i] - anchor for one block, in float32; sum[k] = d[0] + d[1] + ... in order. */
INLINE void block_deltas(const void *anchor, const void *const *models, int n, int dt,
                         int64_t s, int64_t m, float d[][BLK], float *sum) {
    float w0[BLK];
    widen(anchor, dt, s, m, w0);
    for (int i = 0; i < n; i++) {
        widen(models[i], dt, s, m, d[i]);
        for (int64_t k = 0; k < m; k++) d[i][k] -= w0[k];
    }
    if (sum == NULL) return;
    if (n == 1) {
        memcpy(sum, d[0], (size_t)m * 4);
        return;
    }
    for (int64_t k = 0; k < m; k++) sum[k] = d[0][k] + d[1][k];
    for (int i = 2; i < n; i++)
        for (int64_t k = 0; k < m; k++) sum[k] += d[i][k];
}

/* out[k] = anchor[k] + scale * total[k], rounded once to float32 (the product of two
 * float32 values is exact in float64, so this is a fused multiply-add), then to `odt`. */
INLINE void block_combine(const void *anchor, int dt, int64_t s, int64_t m,
                          const float *total, float scale, void *out, int odt) {
    float w0[BLK], r[BLK];
    widen(anchor, dt, s, m, w0);
    for (int64_t k = 0; k < m; k++)
        r[k] = (float)((double)w0[k] + (double)scale * (double)total[k]);
    if (odt == F32) {
        memcpy((float *)out + s, r, (size_t)m * 4);
    } else {
        uint16_t *o = (uint16_t *)out + s;
        for (int64_t k = 0; k < m; k++) o[k] = to_bf16(r[k]);
    }
}

/* Gram matrix (added into `gram`, n x n float64, may be NULL) and, if `total` is not NULL,
 * total[k] = sum_i (models[i][k] - anchor[k]). Returns -1 for unsupported arguments. */
EXPORT ENTRY int ms_stats(const void *anchor, const void *const *models, int n, int64_t numel,
                          int dt, float *total, double *gram) {
    if (n < 1 || n > MAX_MODELS || (dt != F32 && dt != BF16)) return -1;
    float d[MAX_MODELS][BLK];
    double g[MAX_MODELS * MAX_MODELS] = {0};
    for (int64_t s = 0; s < numel; s += BLK) {
        int64_t m = numel - s < BLK ? numel - s : BLK;
        block_deltas(anchor, models, n, dt, s, m, d, total ? total + s : NULL);
        if (gram == NULL) continue;
        for (int i = 0; i < n; i++)
            for (int j = i; j < n; j++) g[i * n + j] += dot(d[i], d[j], m);
    }
    if (gram != NULL)
        for (int i = 0; i < n; i++)
            for (int j = i; j < n; j++) {
                gram[i * n + j] += g[i * n + j];
                if (j != i) gram[j * n + i] += g[i * n + j];
            }
    return 0;
}

/* out = anchor + scale * total (see block_combine). */
EXPORT ENTRY int ms_combine(const void *anchor, const float *total, double scale, void *out,
                            int64_t numel, int dt, int odt) {
    if ((dt != F32 && dt != BF16) || (odt != F32 && odt != BF16)) return -1;
    for (int64_t s = 0; s < numel; s += BLK) {
        int64_t m = numel - s < BLK ? numel - s : BLK;
        block_combine(anchor, dt, s, m, total + s, (float)scale, out, odt);
    }
    return 0;
}

/* out = anchor + scale * sum_i (models[i] - anchor), straight from the weights. */
EXPORT ENTRY int ms_output(const void *anchor, const void *const *models, int n, int64_t numel,
                           int dt, double scale, void *out, int odt) {
    if (n < 1 || n > MAX_MODELS || (dt != F32 && dt != BF16) || (odt != F32 && odt != BF16))
        return -1;
    float d[MAX_MODELS][BLK], sum[BLK];
    for (int64_t s = 0; s < numel; s += BLK) {
        int64_t m = numel - s < BLK ? numel - s : BLK;
        block_deltas(anchor, models, n, dt, s, m, d, sum);
        block_combine(anchor, dt, s, m, sum, (float)scale, out, odt);
    }
    return 0;
}

#ifdef MODELSTOCK_PYTHON_MODULE
static struct PyModuleDef kernels_module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "C loops of modelstock.kernels; called through ctypes, nothing to use from Python.", -1,
    NULL, NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
#endif
