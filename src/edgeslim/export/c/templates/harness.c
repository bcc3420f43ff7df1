/* Test and benchmark driver for generated model code (not part of the model).
 *   harness run IN OUT [TRACE]   IN: N inputs back to back; OUT: N outputs; TRACE: op log
 *                                (a model's several inputs / outputs: back to back in each)
 *   harness time IN REPEATS      prints the median latency of model_run in microseconds */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "model.h"
#ifndef MODEL_RUN_PACKED /* one input, one output (model.h of several defines it) */
#define MODEL_RUN_PACKED(in, out) model_run((in), (out))
#endif
#include "harness_io.h"

static FILE *trace_file = NULL;

void model_trace(int32_t op, int32_t y0, int32_t x0, int32_t h, int32_t w,
                 const int8_t *data, int32_t size)
{
    int32_t header[6];
    if (trace_file == NULL) return;
    header[0] = op; header[1] = y0; header[2] = x0; header[3] = h; header[4] = w;
    header[5] = size;
    fwrite(header, sizeof(int32_t), 6, trace_file);
    fwrite(data, 1, (size_t)size, trace_file);
}

int main(int argc, char **argv)
{
    long n;
    int8_t *in, out[MODEL_OUTPUT_SIZE];
    if (argc >= 4 && strcmp(argv[1], "run") == 0) {
        FILE *o = fopen(argv[3], "wb");
        long i;
        in = read_all(argv[2], &n);
        if (argc >= 5) trace_file = fopen(argv[4], "wb");
        for (i = 0; i + MODEL_INPUT_SIZE <= n; i += MODEL_INPUT_SIZE) {
            MODEL_RUN_PACKED(in + i, out);
            fwrite(out, 1, MODEL_OUTPUT_SIZE, o);
        }
        fclose(o);
        if (trace_file != NULL) fclose(trace_file);
        return 0;
    }
    if (argc >= 4 && strcmp(argv[1], "time") == 0) {
        const int repeats = atoi(argv[3]);
        double *us = (double *)malloc(sizeof(double) * (size_t)repeats);
        int r;
        in = read_all(argv[2], &n);
        MODEL_RUN_PACKED(in, out);  /* warm up */
        for (r = 0; r < repeats; ++r) {
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            MODEL_RUN_PACKED(in, out);
            clock_gettime(CLOCK_MONOTONIC, &t1);
            us[r] = (t1.tv_sec - t0.tv_sec) * 1e6 + (t1.tv_nsec - t0.tv_nsec) / 1e3;
        }
        qsort(us, (size_t)repeats, sizeof(double), compare);
        printf("%.3f\n", us[repeats / 2]);
        return 0;
    }
    fprintf(stderr, "usage: %s run IN OUT [TRACE] | time IN REPEATS\n", argv[0]);
    return 2;
}
