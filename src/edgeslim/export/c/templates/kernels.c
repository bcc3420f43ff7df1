/* ---------------------------------------------------------------------------------------
 * int8 kernels. The arithmetic is TFLite Micro's reference kernels' (gemmlowp fixed point,
 * "double rounding"), transcribed from edgeslim/quant/spec.py; every result is bit-exact
 * with TFLite Micro (the bias is added after the products, as there). Feature maps are NHWC. A buffer may hold only a region of a feature
 * map (patch-based execution): `region_t` says which rows and columns it holds, and a
 * kernel computes the outputs of the region `todo`. Taps outside the full input are
 * padding and are skipped (they count as the input zero point), as in TFLite.
 * ------------------------------------------------------------------------------------- */

/* ==== types ==== */

typedef struct { int32_t y0, x0, h, w; } region_t;

typedef struct {
    int32_t in_h, in_w, cin, cout, kh, kw, sh, sw, pad_t, pad_l;
    int32_t in_zp, out_zp, act_min, act_max;
    const int8_t *weight;   /* conv: [cout][kh][kw][cin]; depthwise: [kh][kw][cout] */
    const int32_t *bias;    /* [cout] */
    const int32_t *mult;    /* [cout] */
    const int32_t *shift;   /* [cout] */
} conv_params_t;

typedef struct {
    int32_t cin, cout, in_zp, out_zp, act_min, act_max, per_channel;
    const int8_t *weight;   /* [cout][cin] */
    const int32_t *bias;
    const int32_t *mult;
    const int32_t *shift;
} fc_params_t;

typedef struct {
    int32_t avg, in_h, in_w, c, kh, kw, sh, sw, pad_t, pad_l, act_min, act_max;
} pool_params_t;

typedef struct {
    int32_t c, zp1, zp2, out_zp, left_shift, m1, s1, m2, s2, mo, so, act_min, act_max;
} add_params_t;

typedef struct { int32_t rows, depth, multiplier, left_shift, diff_min; } softmax_params_t;

typedef struct { int32_t size, in_zp, out_zp, mult, shift; } requant_params_t;

#define region(y0, x0, h, w) ((region_t){(y0), (x0), (h), (w)})

/* ==== arith ==== */
/* ---- fixed-point arithmetic ---- */

/* SaturatingRoundingDoublingHighMul: round(a * b / 2^31) */
static int32_t srdhm(int32_t a, int32_t b)
{
    int64_t ab, nudge;
    if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;
    ab = (int64_t)a * (int64_t)b;
    nudge = ab >= 0 ? ((int64_t)1 << 30) : (1 - ((int64_t)1 << 30));
    return (int32_t)((ab + nudge) / ((int64_t)1 << 31));
}

/* RoundingDivideByPOT: x / 2^e rounded half away from zero */
static int32_t rdbpot(int32_t x, int32_t e)
{
    const int32_t mask = (int32_t)(((int64_t)1 << e) - 1);
    const int32_t remainder = x & mask;
    const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> e) + (remainder > threshold ? 1 : 0);
}

/* MultiplyByQuantizedMultiplier: x * m * 2^(shift - 31) */
static int32_t mbqm(int32_t x, int32_t m, int32_t shift)
{
    const int32_t left = shift > 0 ? shift : 0;
    const int32_t right = shift > 0 ? 0 : -shift;
    return rdbpot(srdhm(x * (1 << left), m), right);
}

static int32_t clamp32(int32_t x, int32_t lo, int32_t hi)
{
    return x < lo ? lo : (x > hi ? hi : x);
}

/* ==== conv2d ==== */

static void conv2d_s8(const conv_params_t *p, const int8_t *in, region_t ir,
                      int8_t *out, region_t orr, region_t todo)
{
    int32_t oy, ox, oc, ky, kx, ic;
    for (oy = todo.y0; oy < todo.y0 + todo.h; ++oy) {
        for (ox = todo.x0; ox < todo.x0 + todo.w; ++ox) {
            int8_t *dst = out + ((oy - orr.y0) * orr.w + (ox - orr.x0)) * p->cout;
            const int32_t y_base = oy * p->sh - p->pad_t;
            const int32_t x_base = ox * p->sw - p->pad_l;
            for (oc = 0; oc < p->cout; ++oc) {
                const int8_t *w_oc = p->weight + oc * p->kh * p->kw * p->cin;
                int32_t acc = 0;
                for (ky = 0; ky < p->kh; ++ky) {
                    const int32_t iy = y_base + ky;
                    if (iy < 0 || iy >= p->in_h) continue;
                    for (kx = 0; kx < p->kw; ++kx) {
                        const int32_t ix = x_base + kx;
                        const int8_t *src, *w;
                        if (ix < 0 || ix >= p->in_w) continue;
                        src = in + ((iy - ir.y0) * ir.w + (ix - ir.x0)) * p->cin;
                        w = w_oc + (ky * p->kw + kx) * p->cin;
                        for (ic = 0; ic < p->cin; ++ic) {
                            acc += ((int32_t)src[ic] - p->in_zp) * w[ic];
                        }
                    }
                }
                acc = mbqm(acc + p->bias[oc], p->mult[oc], p->shift[oc]) + p->out_zp;
                dst[oc] = (int8_t)clamp32(acc, p->act_min, p->act_max);
            }
        }
    }
}

/* ==== pointwise ==== */

/* 1x1 stride-1 conv, one pixel at a time through `pixel` (cout bytes), so that the output may
 * share the input's buffer: shrinking (cout <= cin), the output starts where the input
 * starts and pixels run forward; expanding, the input sits at the end of the buffer and
 * pixels run backward. Either way a pixel's output only overwrites input already read. */
static void pointwise_s8(const conv_params_t *p, const int8_t *in, region_t ir,
                         int8_t *out, region_t orr, region_t todo, int8_t *pixel)
{
    const int32_t n = todo.h * todo.w;
    int32_t k, oc, ic;
    for (k = 0; k < n; ++k) {
        const int32_t idx = p->cout > p->cin ? n - 1 - k : k;
        const int32_t oy = todo.y0 + idx / todo.w, ox = todo.x0 + idx % todo.w;
        const int8_t *src = in + ((oy - ir.y0) * ir.w + (ox - ir.x0)) * p->cin;
        int8_t *dst = out + ((oy - orr.y0) * orr.w + (ox - orr.x0)) * p->cout;
        for (oc = 0; oc < p->cout; ++oc) {
            const int8_t *w = p->weight + oc * p->cin;
            int32_t acc = 0;
            for (ic = 0; ic < p->cin; ++ic) acc += ((int32_t)src[ic] - p->in_zp) * w[ic];
            acc = mbqm(acc + p->bias[oc], p->mult[oc], p->shift[oc]) + p->out_zp;
            pixel[oc] = (int8_t)clamp32(acc, p->act_min, p->act_max);
        }
        for (oc = 0; oc < p->cout; ++oc) dst[oc] = pixel[oc];
    }
}

/* ==== dwconv ==== */

/* Depthwise conv, channel by channel. With `scratch` (in place: `out` is `in`), each input
 * channel is first copied to scratch; in NHWC the outputs of channel c only overwrite bytes
 * of input channel c. */
static void dwconv_s8(const conv_params_t *p, const int8_t *in, region_t ir,
                      int8_t *out, region_t orr, region_t todo, int8_t *scratch)
{
    const int32_t mult = p->cout / p->cin;
    int32_t oc, oy, ox, ky, kx;
    for (oc = 0; oc < p->cout; ++oc) {
        const int32_t ic = oc / mult;
        const int8_t *src = in + ic;
        int32_t step = p->cin;
        if (scratch != 0) {
            const int32_t n = ir.h * ir.w;
            int32_t i;
            for (i = 0; i < n; ++i) scratch[i] = in[i * p->cin + ic];
            src = scratch;
            step = 1;
        }
        for (oy = todo.y0; oy < todo.y0 + todo.h; ++oy) {
            for (ox = todo.x0; ox < todo.x0 + todo.w; ++ox) {
                const int32_t y_base = oy * p->sh - p->pad_t;
                const int32_t x_base = ox * p->sw - p->pad_l;
                int32_t acc = 0;
                for (ky = 0; ky < p->kh; ++ky) {
                    const int32_t iy = y_base + ky;
                    if (iy < 0 || iy >= p->in_h) continue;
                    for (kx = 0; kx < p->kw; ++kx) {
                        const int32_t ix = x_base + kx;
                        int32_t x;
                        if (ix < 0 || ix >= p->in_w) continue;
                        x = src[((iy - ir.y0) * ir.w + (ix - ir.x0)) * step];
                        acc += (x - p->in_zp) * p->weight[(ky * p->kw + kx) * p->cout + oc];
                    }
                }
                acc = mbqm(acc + p->bias[oc], p->mult[oc], p->shift[oc]) + p->out_zp;
                out[((oy - orr.y0) * orr.w + (ox - orr.x0)) * p->cout + oc] =
                    (int8_t)clamp32(acc, p->act_min, p->act_max);
            }
        }
    }
}

/* ==== fc ==== */

static void fc_s8(const fc_params_t *p, const int8_t *in, int8_t *out)
{
    int32_t oc, ic;
    for (oc = 0; oc < p->cout; ++oc) {
        const int8_t *w = p->weight + oc * p->cin;
        const int32_t q = p->per_channel ? oc : 0;
        int32_t acc = 0;
        for (ic = 0; ic < p->cin; ++ic) acc += ((int32_t)in[ic] - p->in_zp) * w[ic];
        acc = mbqm(acc + p->bias[oc], p->mult[q], p->shift[q]) + p->out_zp;
        out[oc] = (int8_t)clamp32(acc, p->act_min, p->act_max);
    }
}

/* ==== pool ==== */

/* Max (avg = 0) or average (avg = 1) pooling over the in-bounds taps of each window; the
 * output keeps the input's qparams. The average rounds half away from zero. */
static void pool_s8(const pool_params_t *p, const int8_t *in, region_t ir,
                    int8_t *out, region_t orr, region_t todo)
{
    int32_t oy, ox, c, ky, kx;
    for (oy = todo.y0; oy < todo.y0 + todo.h; ++oy) {
        for (ox = todo.x0; ox < todo.x0 + todo.w; ++ox) {
            int8_t *dst = out + ((oy - orr.y0) * orr.w + (ox - orr.x0)) * p->c;
            for (c = 0; c < p->c; ++c) {
                int32_t acc = p->avg ? 0 : -128, count = 0;
                for (ky = 0; ky < p->kh; ++ky) {
                    const int32_t iy = oy * p->sh - p->pad_t + ky;
                    if (iy < 0 || iy >= p->in_h) continue;
                    for (kx = 0; kx < p->kw; ++kx) {
                        const int32_t ix = ox * p->sw - p->pad_l + kx;
                        int32_t x;
                        if (ix < 0 || ix >= p->in_w) continue;
                        x = in[((iy - ir.y0) * ir.w + (ix - ir.x0)) * p->c + c];
                        if (p->avg) acc += x;
                        else if (x > acc) acc = x;
                        ++count;
                    }
                }
                if (p->avg) acc = acc > 0 ? (acc + count / 2) / count : (acc - count / 2) / count;
                dst[c] = (int8_t)clamp32(acc, p->act_min, p->act_max);
            }
        }
    }
}

/* ==== add ==== */

/* May run in place (out == a or out == b): each output byte is written after the input
 * bytes at the same or a later offset were read. */
static void add_s8(const add_params_t *p, const int8_t *a, region_t ar, const int8_t *b,
                   region_t br, int8_t *out, region_t orr, region_t todo)
{
    int32_t y, x, c;
    for (y = todo.y0; y < todo.y0 + todo.h; ++y) {
        for (x = todo.x0; x < todo.x0 + todo.w; ++x) {
            const int8_t *pa = a + ((y - ar.y0) * ar.w + (x - ar.x0)) * p->c;
            const int8_t *pb = b + ((y - br.y0) * br.w + (x - br.x0)) * p->c;
            int8_t *po = out + ((y - orr.y0) * orr.w + (x - orr.x0)) * p->c;
            for (c = 0; c < p->c; ++c) {
                const int32_t x1 = ((int32_t)pa[c] - p->zp1) * (1 << p->left_shift);
                const int32_t x2 = ((int32_t)pb[c] - p->zp2) * (1 << p->left_shift);
                const int32_t sum = rdbpot(srdhm(x1, p->m1), -p->s1) +
                                    rdbpot(srdhm(x2, p->m2), -p->s2);
                const int32_t q = rdbpot(srdhm(sum, p->mo), -p->so) + p->out_zp;
                po[c] = (int8_t)clamp32(q, p->act_min, p->act_max);
            }
        }
    }
}

/* ==== requantize ==== */

static void requantize_s8(const requant_params_t *p, const int8_t *in, int8_t *out)
{
    int32_t i;
    for (i = 0; i < p->size; ++i) {
        const int32_t q = mbqm((int32_t)in[i] - p->in_zp, p->mult, p->shift) + p->out_zp;
        out[i] = (int8_t)clamp32(q, -128, 127);
    }
}

/* ==== concat ==== */

/* Copy `in` ([outer][in_inner]) into `out` ([outer][out_inner]) at column `offset`. */
static void concat_s8(const int8_t *in, int32_t outer, int32_t in_inner, int8_t *out,
                      int32_t out_inner, int32_t offset)
{
    int32_t i, j;
    for (i = 0; i < outer; ++i) {
        for (j = 0; j < in_inner; ++j) out[i * out_inner + offset + j] = in[i * in_inner + j];
    }
}

/* ==== softmax ==== */
/* gemmlowp fixed point, as TFLite's reference_ops::Softmax */

/* SaturatingRoundingMultiplyByPOT for a positive exponent: a saturating left shift */
static int32_t sat_shl(int32_t x, int32_t e)
{
    const int32_t threshold = (int32_t)(((int64_t)1 << (31 - e)) - 1);
    if (x > threshold) return INT32_MAX;
    if (x < -threshold) return INT32_MIN;
    return x * (1 << e);
}

static int32_t rounding_half_sum(int32_t a, int32_t b)
{
    const int64_t sum = (int64_t)a + (int64_t)b;
    return (int32_t)((sum + (sum >= 0 ? 1 : -1)) / 2);
}

/* exp(a) for Q0.31 a in [-1/4, 0) */
static int32_t exp_quarter(int32_t a)
{
    const int32_t constant_term = 1895147668;   /* exp(-1/8) */
    const int32_t one_third = 715827883;
    const int32_t x = a + (1 << 28);
    const int32_t x2 = srdhm(x, x), x3 = srdhm(x2, x), x4 = srdhm(x2, x2);
    const int32_t poly = rdbpot(srdhm(rdbpot(x4, 2) + x3, one_third) + x2, 1);
    return constant_term + srdhm(constant_term, x + poly);
}

/* exp(a) in Q0.31 for Q5.26 a <= 0 */
static int32_t exp_on_negative_values(int32_t a)
{
    static const int32_t barrel[7] = {1672461947, 1302514674, 790015084, 290630308,
                                      39332535, 720401, 242};
    const int32_t quarter = 1 << 24;
    const int32_t a_mod = (a & (quarter - 1)) - quarter;
    const int32_t remainder = a_mod - a;
    int32_t result = exp_quarter(sat_shl(a_mod, 5));
    int32_t k;
    for (k = 0; k < 7; ++k) {
        if (remainder & (1 << (24 + k))) result = srdhm(result, barrel[k]);
    }
    return a == 0 ? INT32_MAX : result;
}

/* 1 / (1 + a) in Q0.31 for Q0.31 a in [0, 1): Newton-Raphson in Q2.29 */
static int32_t one_over_one_plus_x(int32_t a)
{
    const int32_t half_denominator = rounding_half_sum(a, INT32_MAX);
    int32_t x = 1515870810 + srdhm(half_denominator, -1010580540);
    int32_t i;
    for (i = 0; i < 3; ++i) {
        const int32_t one_minus = (1 << 29) - srdhm(half_denominator, x);
        x = x + sat_shl(srdhm(x, one_minus), 2);
    }
    return sat_shl(x, 1);
}

static void softmax_s8(const softmax_params_t *p, const int8_t *in, int8_t *out)
{
    int32_t r, c;
    for (r = 0; r < p->rows; ++r) {
        const int8_t *x = in + r * p->depth;
        int8_t *y = out + r * p->depth;
        int32_t max = -128, sum = 0, headroom = 0, scale, exponent;
        uint32_t u;
        for (c = 0; c < p->depth; ++c) if (x[c] > max) max = x[c];
        for (c = 0; c < p->depth; ++c) {
            const int32_t diff = x[c] - max;
            if (diff >= p->diff_min) {
                const int32_t scaled = srdhm(diff * (1 << p->left_shift), p->multiplier);
                sum += rdbpot(exp_on_negative_values(scaled), 12);
            }
        }
        for (u = (uint32_t)sum; (u & 0x80000000u) == 0; u <<= 1) ++headroom;
        scale = one_over_one_plus_x((int32_t)(((uint32_t)sum << headroom) - 0x80000000u));
        exponent = 12 - headroom + 31 - 8;
        for (c = 0; c < p->depth; ++c) {
            const int32_t diff = x[c] - max;
            int32_t q = -128;
            if (diff >= p->diff_min) {
                const int32_t scaled = srdhm(diff * (1 << p->left_shift), p->multiplier);
                q = rdbpot(srdhm(scale, exp_on_negative_values(scaled)), exponent) - 128;
            }
            y[c] = (int8_t)clamp32(q, -128, 127);
        }
    }
}

/* ==== lut ==== */
/* a unary int8 op (logistic, hard swish) as its 256 outputs, computed at export time by
 * TFLite Micro's fixed-point arithmetic (edgeslim/quant/spec.py): out = table[in + 128] */

static void lut_s8(const int8_t *table, const int8_t *in, int8_t *out, int32_t size)
{
    int32_t i;
    for (i = 0; i < size; ++i) out[i] = table[(int32_t)in[i] + 128];
}

/* ==== mul ==== */
/* TFLite's reference MulElementwise (and its broadcast over H and W) */

/* b is the same shape as a (gate = 0), or (1, 1, 1, gate) broadcast over H and W */
typedef struct {
    int32_t size, gate, zp1, zp2, out_zp, mult, shift, act_min, act_max;
} mul_params_t;

static void mul_s8(const mul_params_t *p, const int8_t *a, const int8_t *b, int8_t *out)
{
    int32_t i;
    for (i = 0; i < p->size; ++i) {
        const int32_t x = (int32_t)a[i] - p->zp1;
        const int32_t y = (int32_t)b[p->gate ? i % p->gate : i] - p->zp2;
        const int32_t q = mbqm(x * y, p->mult, p->shift) + p->out_zp;
        out[i] = (int8_t)clamp32(q, p->act_min, p->act_max);
    }
}

/* ==== packed ==== */
/* Compressed weights (edgeslim/export/c/compress.py): a (rows x cols) int8 matrix as codes
 * into a table of its distinct values, packed LSB first at their bit-width; "relative":
 * only the nonzeros, each after a gap (zeros skipped, across row ends; an all-ones gap is a
 * filler that skips that many positions and carries no weight); "runs": (zeros, nonzeros)
 * run-length pairs, each followed by its nonzeros' codes. The kernels decode the stream
 * row by row while they multiply: no weight is expanded in RAM. Products and sums are the
 * dense kernels' (integer, exact), so the outputs are bit-exact with them. */

typedef struct {
    int32_t format;         /* 1 codebook, 2 relative, 3 runs */
    int32_t rows, cols, code_bits, index_bits, run_bits, entries;
    const uint8_t *stream;
    const int8_t *table;
} packed_t;

#define PK_NEED(k) while (nbits < (k)) { buf |= (uint32_t)(*sp++) << nbits; nbits += 8; }
#define PK_TAKE(v, k, mask) do { PK_NEED(k); (v) = buf & (mask); buf >>= (k); nbits -= (k); } while (0)
#define PK_ROW() do { \
        const int32_t q_ = per_channel ? row : 0; \
        const int32_t y_ = mbqm(acc + bias[row], mult[q_], shift[q_]) + out_zp; \
        out[row] = (int8_t)clamp32(y_, act_min, act_max); \
        acc = 0; \
        ++row; \
    } while (0)

/* out[r] = requantized (sum over c of W[r][c] * (x[c] - in_zp)) + bias[r], every row r */
static void packed_mv(const packed_t *w, const int8_t *x, int32_t in_zp, const int32_t *bias,
                      const int32_t *mult, const int32_t *shift, int32_t per_channel,
                      int32_t out_zp, int32_t act_min, int32_t act_max, int8_t *out)
{
    const uint8_t *sp = w->stream;
    const int8_t *table = w->table;
    const int32_t cols = w->cols, cb = w->code_bits;
    const uint32_t cmask = (1u << cb) - 1u;
    uint32_t buf = 0;
    int32_t nbits = 0, row = 0, col = 0, acc = 0, e;
    if (w->format == 1) {
        while (row < w->rows) {
            for (col = 0; col < cols; ++col) {
                uint32_t c;
                PK_TAKE(c, cb, cmask);
                acc += ((int32_t)x[col] - in_zp) * table[c];
            }
            PK_ROW();
        }
        return;
    }
    if (w->format == 2) {
        const int32_t ib = w->index_bits, width = ib + cb;
        const uint32_t top = (1u << ib) - 1u, fmask = (1u << width) - 1u;
        for (e = 0; e < w->entries; ++e) {
            uint32_t f, g;
            PK_TAKE(f, width, fmask);
            g = f & top;
            col += (int32_t)g;
            while (col >= cols) { PK_ROW(); col -= cols; }
            if (g == top) continue;  /* filler */
            acc += ((int32_t)x[col] - in_zp) * table[f >> ib];
            ++col;
        }
    } else {
        const int32_t zb = w->index_bits, width = zb + w->run_bits;
        const uint32_t zmask = (1u << zb) - 1u, fmask = (1u << width) - 1u;
        for (e = 0; e < w->entries; ++e) {
            uint32_t f, k;
            PK_TAKE(f, width, fmask);
            col += (int32_t)(f & zmask);
            for (k = f >> zb; k > 0; --k) {
                uint32_t c;
                while (col >= cols) { PK_ROW(); col -= cols; }
                PK_TAKE(c, cb, cmask);
                acc += ((int32_t)x[col] - in_zp) * table[c];
                ++col;
            }
        }
    }
    while (row < w->rows) PK_ROW();
}

/* ==== fc_packed ==== */

static void fc_packed_s8(const fc_params_t *p, const packed_t *w, const int8_t *in, int8_t *out)
{
    packed_mv(w, in, p->in_zp, p->bias, p->mult, p->shift, p->per_channel, p->out_zp,
              p->act_min, p->act_max, out);
}

/* ==== conv2d_packed ==== */

/* Conv from packed weights, one output pixel at a time. With `im2col`, the pixel's input
 * patch (kh x kw x cin, padding taps = the input zero point, which contributes nothing) is
 * gathered into `scratch` first; without, the conv is 1x1 and unpadded and reads the input
 * pixel in place, and a non-null `scratch` (cout bytes) makes it safe to run in place as
 * pointwise_s8 does (expanding convs run backward). */
static void conv2d_packed_s8(const conv_params_t *p, const packed_t *w, const int8_t *in,
                             region_t ir, int8_t *out, region_t orr, region_t todo,
                             int32_t im2col, int8_t *scratch)
{
    const int32_t n = todo.h * todo.w;
    const int32_t backward = !im2col && scratch != 0 && p->cout > p->cin;
    int32_t k;
    for (k = 0; k < n; ++k) {
        const int32_t idx = backward ? n - 1 - k : k;
        const int32_t oy = todo.y0 + idx / todo.w, ox = todo.x0 + idx % todo.w;
        int8_t *dst = out + ((oy - orr.y0) * orr.w + (ox - orr.x0)) * p->cout;
        const int8_t *x;
        int8_t *y = dst;
        if (im2col) {
            int8_t *patch = scratch;
            int32_t ky, kx, ic;
            for (ky = 0; ky < p->kh; ++ky) {
                const int32_t iy = oy * p->sh - p->pad_t + ky;
                for (kx = 0; kx < p->kw; ++kx) {
                    const int32_t ix = ox * p->sw - p->pad_l + kx;
                    if (iy < 0 || iy >= p->in_h || ix < 0 || ix >= p->in_w) {
                        for (ic = 0; ic < p->cin; ++ic) patch[ic] = (int8_t)p->in_zp;
                    } else {
                        const int8_t *src = in + ((iy - ir.y0) * ir.w + (ix - ir.x0)) * p->cin;
                        for (ic = 0; ic < p->cin; ++ic) patch[ic] = src[ic];
                    }
                    patch += p->cin;
                }
            }
            x = scratch;
        } else {
            x = in + ((oy * p->sh - ir.y0) * ir.w + (ox * p->sw - ir.x0)) * p->cin;
            if (scratch != 0) y = scratch;
        }
        packed_mv(w, x, p->in_zp, p->bias, p->mult, p->shift, 1, p->out_zp, p->act_min,
                  p->act_max, y);
        if (y != dst) {
            int32_t oc;
            for (oc = 0; oc < p->cout; ++oc) dst[oc] = y[oc];
        }
    }
}
