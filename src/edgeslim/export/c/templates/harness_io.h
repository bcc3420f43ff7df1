/* Shared by the host test drivers (harness.c, the early-exit runner's): read a whole file;
 * compare doubles for qsort. */
#ifndef EDGESLIM_HARNESS_IO_H
#define EDGESLIM_HARNESS_IO_H
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>

static int8_t *read_all(const char *path, long *n)
{
    FILE *f = fopen(path, "rb");
    int8_t *buf;
    if (f == NULL) { perror(path); exit(2); }
    fseek(f, 0, SEEK_END);
    *n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = (int8_t *)malloc((size_t)*n + 1);
    if (fread(buf, 1, (size_t)*n, f) != (size_t)*n) { perror(path); exit(2); }
    fclose(f);
    return buf;
}

static int compare(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#endif
