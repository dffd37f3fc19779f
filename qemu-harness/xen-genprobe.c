/*
 * xen-genprobe: the stale-write detector of the real-Xen harness (xen.sh).
 *
 * Runs in the domU, against the blkfront disk. It stamps NBLOCKS 4 KiB blocks
 * (STRIDE apart) with "GEN <g>" for g = 1..GENS, one generation at a time, all
 * blocks of a generation submitted together with Linux native AIO (raw
 * io_setup/io_submit/io_getevents syscalls, no libaio), O_DIRECT. It keeps
 * re-reading every block (also AIO, O_DIRECT) and flags any read that returns
 * a generation older than one that had *completed* for that block before the
 * read was submitted:
 *
 *   CORRUPTION block B reads gen X but gen Y had completed
 *
 * Everything is asynchronous on purpose: the task waits in io_getevents(),
 * which the freezer can interrupt, so the guest can suspend (xl save / xl
 * migrate) while the writes of a generation are still in flight. A synchronous
 * O_DIRECT writer sits in D state and makes the suspend fail.
 *
 * SETTLE seconds after generation 1 was submitted (CLOCK_BOOTTIME, which on a
 * Xen PV/PVH guest also counts the time the domain was saved), it does a final
 * read of every block and prints
 *
 *   PROBE-RESULT CLEAN
 *   PROBE-RESULT CORRUPTION n=<corrupt reads> blocks=<distinct blocks> ...
 *   PROBE-RESULT INCOMPLETE completed=<gen> ...   (writes never completed)
 *
 * usage: xen-genprobe DEV [settle=S] [gens=N] [blocks=N] [stride_kb=K]
 *                         [read_ms=M] [hold=S]
 *   hold: seconds between the completion of one generation and the
 *         submission of the next (default 0).
 *
 * Build: gcc -static -O2 -o xen-genprobe xen-genprobe.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define BS 4096
#define MAXB 64
#define MAX_PRINT_PER_BLOCK 5

static int io_setup_(unsigned nr, aio_context_t *ctx) { return syscall(SYS_io_setup, nr, ctx); }
static int io_submit_(aio_context_t ctx, long n, struct iocb **p) { return syscall(SYS_io_submit, ctx, n, p); }
static int io_getevents_(aio_context_t ctx, long min, long max, struct io_event *ev, struct timespec *t)
{
    return syscall(SYS_io_getevents, ctx, min, max, ev, t);
}

static double now_clock(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static double boot0;
static double tnow(void) { return now_clock(CLOCK_BOOTTIME) - boot0; }

static void say(const char *fmt, ...)
{
    va_list ap;
    char buf[512];
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    printf("PROBE t=%.2f mono=%.2f %s\n", tnow(), now_clock(CLOCK_MONOTONIC), buf);
    fflush(stdout);
}

static int nblocks = 8, gens = 5, read_ms = 100;
static long stride = 1 << 20;
static double settle = 60, hold = 0;
static int fd;
static aio_context_t ctx;

struct blk {
    unsigned char *wbuf, *rbuf;
    struct iocb wcb, rcb;
    int w_inflight, r_inflight;
    int completed;       /* latest generation whose write completed */
    int r_snap;          /* completed gen when the current read was submitted */
    double next_read;
    long corrupt;        /* corrupt reads seen */
    int printed;
    int last_read_gen;
};
static struct blk B[MAXB];
static int cur_gen, w_left;
static double gen_done_at = -1;

static int parse_gen(const unsigned char *buf)
{
    int g;
    if (memcmp(buf, "GEN ", 4) != 0)
        return 0; /* zeros: never written */
    if (sscanf((const char *)buf + 4, "%d", &g) != 1)
        return -1;
    return g;
}

static int submit(struct iocb *cb)
{
    struct iocb *p[1] = {cb};
    for (;;) {
        int r = io_submit_(ctx, 1, p);
        if (r == 1)
            return 0;
        if (r < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        say("io_submit failed: %s", strerror(errno));
        return -1;
    }
}

static void prep(struct iocb *cb, int op, int b, void *buf)
{
    memset(cb, 0, sizeof *cb);
    cb->aio_fildes = fd;
    cb->aio_lio_opcode = op;
    cb->aio_buf = (uint64_t)(uintptr_t)buf;
    cb->aio_nbytes = BS;
    cb->aio_offset = (int64_t)b * stride;
    cb->aio_data = (uint64_t)(b * 2 + (op == IOCB_CMD_PWRITE ? 1 : 0));
}

static long total_corrupt(int *nblk)
{
    long n = 0;
    int k = 0;
    for (int b = 0; b < nblocks; b++) {
        n += B[b].corrupt;
        if (B[b].corrupt)
            k++;
    }
    if (nblk)
        *nblk = k;
    return n;
}


static void check_read(int b, int g, int snap, const char *when)
{
    struct blk *k = &B[b];
    k->last_read_gen = g;
    if (g < snap) {
        k->corrupt++;
        if (k->printed < MAX_PRINT_PER_BLOCK) {
            k->printed++;
            printf("CORRUPTION block %d reads gen %d but gen %d had completed (%s, t=%.2f)\n", b, g, snap, when,
                   tnow());
            fflush(stdout);
        }
    }
}

/*
 * A save/restore or a migration shows as a jump of CLOCK_BOOTTIME against
 * CLOCK_MONOTONIC (the time the domain was suspended counts in the former
 * only). Checked before the completions that ended the wait are handled, so
 * the in-flight count is the one the domain was suspended with.
 */
static double last_off = -1e9;
static int suspends;
/*
 * BOOTTIME - MONOTONIC sampled between two MONOTONIC reads (the narrowest of
 * a few brackets): a preemption between two plain reads, frequent under TCG,
 * looked like a 0.1 s suspend.
 */
static double boot_offset(void)
{
    double best = 1e9, off = 0;
    for (int i = 0; i < 5; i++) {
        double m1 = now_clock(CLOCK_MONOTONIC), b = now_clock(CLOCK_BOOTTIME), m2 = now_clock(CLOCK_MONOTONIC);
        if (m2 - m1 < best) {
            best = m2 - m1;
            off = b - (m1 + m2) / 2;
        }
        if (best < 0.002)
            break;
    }
    return off;
}
static void check_suspend(void)
{
    double off = boot_offset();
    if (last_off > -1e8 && off - last_off > 0.2) {
        suspends++;
        say("SUSPENDED #%d for %.2f s (clock jump) with gen %d: %d writes in flight", suspends, off - last_off,
            cur_gen, w_left);
    }
    last_off = off;
}

/* Wait for events up to `ms`; handle them. */
static void pump(int ms)
{
    struct io_event ev[2 * MAXB];
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    int n = io_getevents_(ctx, 1, 2 * MAXB, ev, &t);
    check_suspend();
    if (n < 0) {
        if (errno != EINTR)
            say("io_getevents: %s", strerror(errno));
        return;
    }
    for (int i = 0; i < n; i++) {
        int b = (int)(ev[i].data / 2), wr = (int)(ev[i].data % 2);
        long res = (long)ev[i].res;
        struct blk *k = &B[b];
        if (wr) {
            k->w_inflight = 0;
            if (res != BS) {
                say("write block %d gen %d failed res=%ld", b, cur_gen, res);
                continue;
            }
            k->completed = cur_gen;
            if (--w_left == 0) {
                say("gen %d completed", cur_gen);
                gen_done_at = tnow();
            }
        } else {
            k->r_inflight = 0;
            if (res != BS) {
                say("read block %d failed res=%ld", b, res);
                continue;
            }
            check_read(b, parse_gen(k->rbuf), k->r_snap, "run");
        }
    }
}

static void submit_gen(int g)
{
    cur_gen = g;
    w_left = 0;
    for (int b = 0; b < nblocks; b++) {
        struct blk *k = &B[b];
        memset(k->wbuf, 0, BS);
        snprintf((char *)k->wbuf, BS, "GEN %d block %d\n", g, b);
        prep(&k->wcb, IOCB_CMD_PWRITE, b, k->wbuf);
        if (submit(&k->wcb) == 0) {
            k->w_inflight = 1;
            w_left++;
        }
    }
    say("gen %d submitted (%d blocks)", g, w_left);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    boot0 = 0;
    if (argc < 2) {
        fprintf(stderr, "usage: %s DEV [settle=S] [gens=N] [blocks=N] [stride_kb=K] [read_ms=M] [hold=S]\n",
                argv[0]);
        return 2;
    }
    const char *dev = argv[1];
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "settle=", 7)) settle = atof(a + 7);
        else if (!strncmp(a, "gens=", 5)) gens = atoi(a + 5);
        else if (!strncmp(a, "blocks=", 7)) nblocks = atoi(a + 7);
        else if (!strncmp(a, "stride_kb=", 10)) stride = atol(a + 10) * 1024;
        else if (!strncmp(a, "read_ms=", 8)) read_ms = atoi(a + 8);
        else if (!strncmp(a, "hold=", 5)) hold = atof(a + 5);
        else { fprintf(stderr, "unknown argument %s\n", a); return 2; }
    }
    if (nblocks < 1 || nblocks > MAXB || stride < BS || stride % BS) {
        fprintf(stderr, "bad blocks/stride\n");
        return 2;
    }
    for (int i = 0; i < 200; i++) {
        struct stat st;
        if (stat(dev, &st) == 0)
            break;
        usleep(100000);
    }
    fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) {
        printf("PROBE-RESULT ERROR open %s: %s\n", dev, strerror(errno));
        return 1;
    }
    off_t size = lseek(fd, 0, SEEK_END);
    if (size < (off_t)nblocks * stride) {
        printf("PROBE-RESULT ERROR %s is %lld bytes, need %lld\n", dev, (long long)size,
               (long long)nblocks * stride);
        return 1;
    }
    if (io_setup_(4 * MAXB, &ctx) < 0) {
        printf("PROBE-RESULT ERROR io_setup: %s\n", strerror(errno));
        return 1;
    }
    for (int b = 0; b < nblocks; b++) {
        if (posix_memalign((void **)&B[b].wbuf, BS, BS) || posix_memalign((void **)&B[b].rbuf, BS, BS))
            return 1;
    }
    say("start dev=%s size=%lld blocks=%d stride=%ld gens=%d settle=%.0f read_ms=%d", dev, (long long)size,
        nblocks, stride, gens, settle, read_ms);

    boot0 = now_clock(CLOCK_BOOTTIME); /* t=0: gen 1 submission */
    submit_gen(1);
    double last_status = -10;
    int ended_writing = 0;
    while (tnow() < settle) {
        double t = tnow();
        if (w_left == 0 && cur_gen < gens && t - gen_done_at >= hold)
            submit_gen(cur_gen + 1);
        if (w_left == 0 && cur_gen >= gens && !ended_writing) {
            ended_writing = 1;
            say("all %d generations completed; re-reading until t=%.0f", gens, settle);
        }
        for (int b = 0; b < nblocks; b++) {
            struct blk *k = &B[b];
            if (!k->r_inflight && t >= k->next_read) {
                prep(&k->rcb, IOCB_CMD_PREAD, b, k->rbuf);
                k->r_snap = k->completed;
                if (submit(&k->rcb) == 0)
                    k->r_inflight = 1;
                k->next_read = t + read_ms / 1000.0;
            }
        }
        pump(read_ms > 20 ? read_ms / 2 : 10);
        if (t - last_status >= 5) {
            last_status = t;
            int nb;
            long nc = total_corrupt(&nb);
            char cs[256] = "";
            for (int b = 0; b < nblocks && strlen(cs) < 200; b++)
                snprintf(cs + strlen(cs), sizeof cs - strlen(cs), "%s%d", b ? "," : "", B[b].last_read_gen);
            say("status gen=%d writes_inflight=%d completed=%d read_gens=%s corrupt=%ld", cur_gen, w_left,
                cur_gen - (w_left ? 1 : 0), cs, nc);
        }
    }
    /* Drain outstanding reads (bounded), then the final check. */
    for (int i = 0; i < 100; i++) {
        int busy = 0;
        for (int b = 0; b < nblocks; b++)
            busy |= B[b].r_inflight;
        if (!busy)
            break;
        pump(100);
    }
    int final_bad = 0, unanswered = 0;
    for (int b = 0; b < nblocks; b++) {
        struct blk *k = &B[b];
        if (k->r_inflight)
            continue;
        prep(&k->rcb, IOCB_CMD_PREAD, b, k->rbuf);
        k->r_snap = k->completed;
        if (submit(&k->rcb) == 0)
            k->r_inflight = 1;
    }
    for (int i = 0; i < 100; i++) {
        int busy = 0;
        for (int b = 0; b < nblocks; b++)
            busy |= B[b].r_inflight;
        if (!busy)
            break;
        /* pump() records corrupt reads; remember which are final */
        long before = total_corrupt(NULL);
        pump(100);
        final_bad += (int)(total_corrupt(NULL) - before);
    }
    for (int b = 0; b < nblocks; b++) {
        if (B[b].r_inflight)
            unanswered++;
        printf("PROBE-FINAL block %d reads gen %d completed gen %d%s\n", b, B[b].last_read_gen, B[b].completed,
               B[b].r_inflight ? " (read unanswered)" : "");
    }
    int nb;
    long nc = total_corrupt(&nb);
    int completed = gens;
    for (int b = 0; b < nblocks; b++)
        if (B[b].completed < completed)
            completed = B[b].completed;
    say("end: corrupt reads=%ld blocks=%d final_bad=%d min_completed=%d writes_inflight=%d unanswered_reads=%d", nc,
        nb, final_bad, completed, w_left, unanswered);
    if (nc > 0)
        printf("PROBE-RESULT CORRUPTION n=%ld blocks=%d final=%d completed=%d\n", nc, nb, final_bad, completed);
    else if (completed < gens || unanswered)
        printf("PROBE-RESULT INCOMPLETE completed=%d of %d writes_inflight=%d unanswered_reads=%d\n", completed, gens,
               w_left, unanswered);
    else
        printf("PROBE-RESULT CLEAN completed=%d reads_ok\n", completed);
    fflush(stdout);
    return 0;
}
