/* Fused CPU loops for the Model Stock merge of float32, bfloat16 and float16 weights.
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

#define VERSION 3    /* bump when an entry point's arguments or meaning change */
#define BLK 512      /* elements per block: for a few models, N + 1 rows of it stay in L1 */
#define MAX_MODELS 16

enum { F32 = 0, BF16 = 1, F16 = 2 };
#define BAD_DTYPE(t) ((t) < F32 || (t) > F16)

/* With GCC or clang on x86-64 Linux, each entry point is also built for AVX2 and the loader
 * picks the build the CPU supports (the Gram loop runs ~1.4x faster with 256-bit vectors). */
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define X86_DISPATCH 1
#define ENTRY __attribute__((target_clones("avx2", "default")))
#include <immintrin.h>
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

/* float16 bits -> float32, exactly: subnormals, infinities and NaN payloads included.
 * Masks instead of branches, so that the loops over it vectorise. */
INLINE float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, mag = h & 0x7fffu;
    uint32_t normal = (mag << 13) + 0x38000000u;  /* exponent bias 15 -> 127 */
    uint32_t special = (mag << 13) | 0x7f800000u; /* infinity, NaN (payload kept) */
    float tiny = (float)mag * 0x1p-24f;           /* zero, subnormal: mag units of 2^-24 */
    uint32_t tiny_bits;
    memcpy(&tiny_bits, &tiny, 4);
    uint32_t is_special = 0u - (uint32_t)(mag >= 0x7c00u);
    uint32_t is_normal = 0u - (uint32_t)(mag >= 0x0400u);
    return bits_to_f32(sign | (special & is_special) | (normal & is_normal & ~is_special)
                       | (tiny_bits & ~is_normal));
}

/* float32 -> bfloat16, round to nearest even; NaN -> 0x7fc0 (as torch's c10::BFloat16). */
INLINE uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* float32 -> float16, round to nearest even, overflow to infinity; NaN -> 0x7e00 with its
 * sign (as torch's scalar conversion). Masks instead of branches, as above. */
INLINE uint16_t to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    uint32_t r = a - 0x38000000u; /* normal in float16 (>= 2^-14): rebias, round at bit 13 */
    uint32_t normal = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
    /* below 2^-14: adding 0.5, whose ulp is 2^-24 (float16's subnormal step), rounds the
     * value to a multiple of that step, to nearest even, in one float32 addition */
    float abs_f = bits_to_f32(a) + 0.5f;
    uint32_t tiny;
    memcpy(&tiny, &abs_f, 4);
    tiny -= 0x3f000000u;
    uint32_t is_nan = 0u - (uint32_t)(a > 0x7f800000u);
    uint32_t is_inf = 0u - (uint32_t)(a >= 0x477ff000u); /* from 65520, halfway to 2^16, up */
    uint32_t is_normal = 0u - (uint32_t)(a >= 0x38800000u);
    uint32_t mag = (0x7e00u & is_nan) | (0x7c00u & is_inf & ~is_nan)
                   | (normal & is_normal & ~is_inf) | (tiny & ~is_normal);
    return (uint16_t)(sign | mag);
}

#ifdef X86_DISPATCH
/* float16 <-> float32 with the F16C instructions (on every CPU with AVX2): 8 at a time, the
 * same values as the portable loops (NaN payloads aside), far fewer instructions. */
static int f16c = -1; /* -1: ask the CPU; ms_use_f16c(0) tests the portable loops */

static int have_f16c(void) {
    if (f16c < 0) {
        __builtin_cpu_init();
        f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
    }
    return f16c;
}

__attribute__((target("avx,f16c"))) static void widen_f16c(const uint16_t *h, int64_t m,
                                                           float *dst) {
    int64_t k = 0;
    for (; k + 8 <= m; k += 8)
        _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + k))));
    for (; k < m; k++) dst[k] = f16_to_f32(h[k]);
}

__attribute__((target("avx,f16c"))) static void narrow_f16c(const float *r, int64_t m,
                                                            uint16_t *o) {
    int64_t k = 0;
    for (; k + 8 <= m; k += 8)
        _mm_storeu_si128((__m128i *)(o + k),
                         _mm256_cvtps_ph(_mm256_loadu_ps(r + k), _MM_FROUND_TO_NEAREST_INT));
    for (; k < m; k++) o[k] = to_f16(r[k]);
}
#endif

EXPORT void ms_use_f16c(int on) {
#ifdef X86_DISPATCH
    f16c = on ? -1 : 0;
#else
    (void)on;
#endif
}

INLINE void widen(const void *src, int dt, int64_t start, int64_t m, float *dst) {
    if (dt == F32) {
        memcpy(dst, (const float *)src + start, (size_t)m * 4);
    } else if (dt == BF16) {
        const uint16_t *h = (const uint16_t *)src + start;
        for (int64_t k = 0; k < m; k++) dst[k] = bits_to_f32((uint32_t)h[k] << 16);
    } else {
        const uint16_t *h = (const uint16_t *)src + start;
#ifdef X86_DISPATCH
        if (have_f16c()) {
            widen_f16c(h, m, dst);
            return;
        }
#endif
        for (int64_t k = 0; k < m; k++) dst[k] = f16_to_f32(h[k]);
    }
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

/* out[k] = anchor[k] + scale * total[k] in float64, where the product of two float32 values
 * is exact, rounded to float32 (a fused multiply-add but for the rare sum that rounding to
 * float64 first moves onto a float32 halfway point), then to `odt`. */
INLINE void block_combine(const void *anchor, int dt, int64_t s, int64_t m,
                          const float *total, float scale, void *out, int odt) {
    float w0[BLK], r[BLK];
    widen(anchor, dt, s, m, w0);
    for (int64_t k = 0; k < m; k++)
        r[k] = (float)((double)w0[k] + (double)scale * (double)total[k]);
    uint16_t *o = (uint16_t *)out + s;
    if (odt == F32)
        memcpy((float *)out + s, r, (size_t)m * 4);
    else if (odt == BF16)
        for (int64_t k = 0; k < m; k++) o[k] = to_bf16(r[k]);
#ifdef X86_DISPATCH
    else if (have_f16c())
        narrow_f16c(r, m, o);
#endif
    else
        for (int64_t k = 0; k < m; k++) o[k] = to_f16(r[k]);
}

/* Gram matrix (added into `gram`, n x n float64, may be NULL) and, if `total` is not NULL,
 * total[k] = sum_i (models[i][k] - anchor[k]). Returns -1 for unsupported arguments. */
EXPORT ENTRY int ms_stats(const void *anchor, const void *const *models, int n, int64_t numel,
                          int dt, float *total, double *gram) {
    if (n < 1 || n > MAX_MODELS || BAD_DTYPE(dt)) return -1;
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
    if (BAD_DTYPE(dt) || BAD_DTYPE(odt)) return -1;
    for (int64_t s = 0; s < numel; s += BLK) {
        int64_t m = numel - s < BLK ? numel - s : BLK;
        block_combine(anchor, dt, s, m, total + s, (float)scale, out, odt);
    }
    return 0;
}

/* out = anchor + scale * sum_i (models[i] - anchor), straight from the weights. */
EXPORT ENTRY int ms_output(const void *anchor, const void *const *models, int n, int64_t numel,
                           int dt, double scale, void *out, int odt) {
    if (n < 1 || n > MAX_MODELS || BAD_DTYPE(dt) || BAD_DTYPE(odt))
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
