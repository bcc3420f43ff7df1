/* Test firmware around model.c for QEMU's MPS2 boards (not part of the model). Through
 * semihosting it reads int8 inputs back to back from in.bin, runs model_run on each (all of a
 * model's inputs back to back per inference, all its outputs likewise), writes
 * the outputs to out.bin and, per input, two int32 to stats.bin: SysTick ticks of model_run
 * and its stack bytes (stack painting). The first record of stats.bin is a calibration: the
 * ticks of CALIB_LOOPS iterations of a two-instruction loop. With QEMU's -icount shift=0
 * every instruction advances the virtual clock by 1 ns, so ticks convert to instructions. */
#include <stdint.h>
#include "model.h"
#ifndef MODEL_RUN_PACKED /* one input, one output (model.h of several defines it) */
#define MODEL_RUN_PACKED(in, out) model_run((in), (out))
#endif

#define CALIB_LOOPS 200000
#define PAINT 0xDEADBEEFu

extern uint32_t _sstack;
static int8_t input[MODEL_INPUT_SIZE], output[MODEL_OUTPUT_SIZE];
static volatile uint32_t wraps;

static int32_t semihost(int32_t op, const void *arg)
{
    register int32_t r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

void semihost_exit(int failed)
{
    /* SYS_EXIT with ADP_Stopped_ApplicationExit (0) or RunTimeErrorUnknown (failure) */
    semihost(0x18, (const void *)(failed ? 0x20023u : 0x20026u));
    for (;;) {
    }
}

static int32_t open_file(const char *name, int32_t mode)
{
    int32_t len = 0, args[3];
    while (name[len] != 0) ++len;
    args[0] = (int32_t)(uintptr_t)name;
    args[1] = mode;  /* 1 = "rb", 5 = "wb" */
    args[2] = len;
    return semihost(0x01, args);
}

static void close_file(int32_t handle)
{
    semihost(0x02, &handle);
}

static int32_t transfer(int32_t op, int32_t handle, const void *buf, int32_t n)
{
    int32_t args[3];
    args[0] = handle;
    args[1] = (int32_t)(uintptr_t)buf;
    args[2] = n;
    return semihost(op, args);  /* bytes NOT transferred */
}

void SysTick_Handler(void)
{
    ++wraps;
}

#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)

/* ticks since the timer started, counting up (SysTick counts down from 2^24 - 1) */
static uint32_t now(void)
{
    uint32_t w, v;
    do {
        w = wraps;
        v = SYST_CVR;
    } while (w != wraps);
    return (w << 24) + (0xFFFFFFu - v);
}

static void calibrate_loop(uint32_t n)
{
    __asm__ volatile("1: subs %0, %0, #1\n\tbne 1b" : "+r"(n) : : "cc");
}

int main(void)
{
    int32_t in, out, stats, record[2];
    uint32_t t0, t1;
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 7u;  /* processor clock, interrupt on wrap, enabled */
    in = open_file("in.bin", 1);
    out = open_file("out.bin", 5);
    stats = open_file("stats.bin", 5);
    if (in < 0 || out < 0 || stats < 0) return 2;
    t0 = now();
    calibrate_loop(CALIB_LOOPS);
    t1 = now();
    record[0] = (int32_t)(t1 - t0);
    record[1] = CALIB_LOOPS;
    transfer(0x05, stats, record, 8);
    while (transfer(0x06, in, input, MODEL_INPUT_SIZE) == 0) {
        uint32_t sp, *p;
        __asm__ volatile("mov %0, sp" : "=r"(sp));
        for (p = &_sstack; (uint32_t)(uintptr_t)p < sp - 8u; ++p) *p = PAINT;
        t0 = now();
        MODEL_RUN_PACKED(input, output);
        t1 = now();
        for (p = &_sstack; *p == PAINT; ++p) {
        }
        record[0] = (int32_t)(t1 - t0);
        record[1] = (int32_t)(sp - (uint32_t)(uintptr_t)p);
        transfer(0x05, out, output, MODEL_OUTPUT_SIZE);
        transfer(0x05, stats, record, 8);
    }
    close_file(in);
    close_file(out);
    close_file(stats);
    return 0;
}
