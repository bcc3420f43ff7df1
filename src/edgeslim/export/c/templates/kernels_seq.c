/* ==== transpose ==== */
/* Sequence / transformer ops (edgeslim/export/int8/ops_seq.py). out = in viewed as `shape`,
 * transposed by `perm` (at most 6 dimensions). */

typedef struct { int32_t ndim, shape[6], perm[6]; } transpose_params_t;

static void transpose_s8(const transpose_params_t *p, const int8_t *in, int8_t *out)
{
    int32_t stride[6], dims[6], idx[6], d, i, total = 1, s = 1;
    for (d = p->ndim - 1; d >= 0; --d) { stride[d] = s; s *= p->shape[d]; }
    for (d = 0; d < p->ndim; ++d) { dims[d] = p->shape[p->perm[d]]; idx[d] = 0; total *= dims[d]; }
    for (i = 0; i < total; ++i) {
        int32_t off = 0;
        for (d = 0; d < p->ndim; ++d) off += idx[d] * stride[p->perm[d]];
        out[i] = in[off];
        for (d = p->ndim - 1; d >= 0; --d) {
            if (++idx[d] < dims[d]) break;
            idx[d] = 0;
        }
    }
}

/* ==== normalize ==== */
/* LayerNorm without its affine part, as TFLite Micro's MEAN (keep dims, the input's
 * qparams), SUB (the input scale, zero point 0) and L2_NORMALIZATION (scale 1/128) compute it,
 * row by row over the last axis. */

typedef struct {
    int32_t rows, depth, zp, mean_mult, mean_shift;
    int32_t left_shift, m1, s1, m2, s2, mo, so;
} normalize_params_t;

static int32_t nsat_shl(int32_t x, int32_t e)
{
    const int32_t threshold = (int32_t)(((int64_t)1 << (31 - e)) - 1);
    if (x > threshold) return INT32_MAX;
    if (x < -threshold) return INT32_MIN;
    return x * (1 << e);
}

/* GetInvSqrtQuantizedMultiplierExp(acc, -1): 1 / sqrt(acc) as m * 2^(shift - 31) */
static int32_t inv_sqrt(int32_t acc, int32_t *shift_out)
{
    int32_t shift = 11, clz = 0, pairs, half_input, x, i;
    uint32_t u;
    if (acc <= 1) { *shift_out = 0; return INT32_MAX; }
    while (acc >= (1 << 29)) { acc /= 4; ++shift; }
    for (u = (uint32_t)acc; (u & 0x80000000u) == 0; u <<= 1) ++clz;
    pairs = (clz - 1) / 2 - 1;
    shift -= pairs;
    acc <<= 2 * pairs;
    half_input = rdbpot(acc >> 1, 1);
    x = 1 << 28;
    for (i = 0; i < 5; ++i) {
        const int32_t x3 = nsat_shl(srdhm(srdhm(x, x), x), 6);
        x = nsat_shl(srdhm((1 << 28) + (1 << 27), x) - srdhm(half_input, x3), 3);
    }
    x = srdhm(x, 1518500250);
    if (shift < 0) { x = x * (1 << -shift); shift = 0; }
    *shift_out = -shift;
    return x;
}

static void normalize_s8(const normalize_params_t *p, const int8_t *in, int8_t *out)
{
    int32_t r, c;
    for (r = 0; r < p->rows; ++r) {
        const int8_t *x = in + r * p->depth;
        int8_t *y = out + r * p->depth;
        int32_t sum = 0, mean, m2, acc = 0, mult, shift;
        for (c = 0; c < p->depth; ++c) sum += x[c];
        mean = clamp32(mbqm(sum - p->zp * p->depth, p->mean_mult, p->mean_shift) + p->zp,
                       -128, 127);
        m2 = mbqm((mean - p->zp) * (1 << p->left_shift), p->m2, p->s2);
        for (c = 0; c < p->depth; ++c) {
            const int32_t m1 = mbqm(((int32_t)x[c] - p->zp) * (1 << p->left_shift), p->m1, p->s1);
            const int32_t d = clamp32(mbqm(m1 - m2, p->mo, p->so), -128, 127);
            y[c] = (int8_t)d;
            acc += d * d;
        }
        mult = inv_sqrt(acc, &shift);
        for (c = 0; c < p->depth; ++c) {
            y[c] = (int8_t)clamp32(mbqm(y[c], mult, shift + 7), -128, 127);
        }
    }
}

/* ==== batch_matmul ==== */
/* TFLite's BATCH_MATMUL: out[b] = a[b] (m x k) @ b[b] (k x n; stored n x k when adj_y) */

typedef struct { int32_t batches, m, k, n, adj_y, a_zp, b_zp, out_zp, mult, shift; } bmm_params_t;

static void batch_matmul_s8(const bmm_params_t *p, const int8_t *a, const int8_t *b, int8_t *out)
{
    int32_t t, i, j, k;
    for (t = 0; t < p->batches; ++t) {
        const int8_t *at = a + t * p->m * p->k;
        const int8_t *bt = b + t * p->k * p->n;
        for (i = 0; i < p->m; ++i) {
            for (j = 0; j < p->n; ++j) {
                int32_t acc = 0;
                for (k = 0; k < p->k; ++k) {
                    const int32_t bv = p->adj_y ? bt[j * p->k + k] : bt[k * p->n + j];
                    acc += ((int32_t)at[i * p->k + k] - p->a_zp) * (bv - p->b_zp);
                }
                out[(t * p->m + i) * p->n + j] =
                    (int8_t)clamp32(mbqm(acc, p->mult, p->shift) + p->out_zp, -128, 127);
            }
        }
    }
}

/* ==== constant ==== */

static void constant_s8(const int8_t *data, int8_t *out, int32_t size)
{
    int32_t i;
    for (i = 0; i < size; ++i) out[i] = data[i];
}

/* ==== gather ==== */
/* out[o][j][i] = in[o][index[j]][i]: `count` slices of `inner` bytes along an axis */

static void gather_s8(const int8_t *in, int32_t outer, int32_t axis_size, int32_t inner,
                      const int32_t *index, int32_t count, int8_t *out)
{
    int32_t o, j, i;
    for (o = 0; o < outer; ++o) {
        for (j = 0; j < count; ++j) {
            const int8_t *src = in + (o * axis_size + index[j]) * inner;
            for (i = 0; i < inner; ++i) *out++ = src[i];
        }
    }
}
