/*
 * xen-loadprobe: a verifying random-write load for the real-Xen harness
 * (xen.sh), for the `load` scenario (save/restores and local migrations
 * under load) and the multi-queue part of `features`. Static, raw AIO
 * syscalls (no libaio, no fio): it runs in PVH domUs, where fio
 * triple-faults under TCG.
 *
 * It keeps DEPTH (16) 4 KiB O_DIRECT AIOs in flight over BLOCKS (4096)
 * blocks starting at OFFSET_MB, alternating random writes and random reads:
 *
 *   - a write stamps (magic, block, generation, run seed) into the block's
 *     header, fills the rest from a PRNG seeded by them and puts an FNV-1a
 *     64 checksum of the whole 4 KiB into the header; the generation is the
 *     block's previous one + 1;
 *   - never two I/Os in flight to one block: a write goes only to a block
 *     with nothing in flight, a read only to a block with nothing in flight,
 *     so a read must return exactly the last *completed* generation (or all
 *     zeros if the block was never written):
 *       LOAD-STALE block B reads gen X but gen Y had completed
 *       LOAD-CORRUPT block B: <bad checksum|bad magic|wrong block|gen X never written>
 *
 * The domain may be suspended (xl save / xl migrate) at any time with AIOs
 * outstanding: io_getevents() is interruptible, so the freezer stops the
 * task and blkfront re-issues the requests on the restored ring. A suspend
 * shows as a jump of CLOCK_BOOTTIME against CLOCK_MONOTONIC:
 *       LOAD-SUSPENDED #n for S s with W writes and R reads in flight
 * and every I/O submitted before a suspend and completed after it is
 * counted in `across`.
 *
 * It runs until the file STOP exists or TIME seconds (CLOCK_BOOTTIME, so
 * including the time the domain was suspended) have passed, drains (bounded
 * by DRAIN s), then reads and verifies every block once more and prints
 *
 *   LOAD-RESULT CLEAN ops=<writes> reads=<verified reads> final=<blocks> ...
 *   LOAD-RESULT ERRORS n=<errors> stale=.. corrupt=.. ioerr=.. unanswered=.. ...
 *
 * usage: xen-loadprobe DEV [blocks=4096] [offset_mb=0] [depth=16] [time=600]
 *                          [stop=FILE] [seed=N] [status_s=5] [drain=120]
 *                          [rate=IOPS] [tag=NAME]
 *   rate: at most this many submissions per second (0: unlimited), still
 *         up to DEPTH at a time; a PVH domU under TCG triple-faults under
 *         the unlimited rate (as it does under fio).
 *
 * Build: gcc -static -O2 -o xen-loadprobe xen-loadprobe.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <sched.h>
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
#define MAXDEPTH 128
#define MAXPRINT 20
#define MAGIC 0x42504c58u /* "XLPB" */

static int io_setup_(unsigned nr, aio_context_t *ctx) { return syscall(SYS_io_setup, nr, ctx); }
static int io_submit_(aio_context_t ctx, long n, struct iocb **p) { return syscall(SYS_io_submit, ctx, n, p); }
static int io_getevents_(aio_context_t ctx, long min, long max, struct io_event *ev, struct timespec *t)
{
    return syscall(SYS_io_getevents, ctx, min, max, ev, t);
}

static double clk(clockid_t c)
{
    struct timespec ts;
    clock_gettime(c, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static double t0;
static double tnow(void) { return clk(CLOCK_BOOTTIME) - t0; }
static const char *tag = "load";

static void say(const char *fmt, ...)
{
    va_list ap;
    char buf[600];
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    printf("%s t=%.2f cpu=%d %s\n", tag, tnow(), sched_getcpu(), buf);
    fflush(stdout);
}

struct hdr {
    uint32_t magic, block, gen, seed;
    uint64_t csum;
};

struct blk {
    uint32_t completed; /* last generation whose write completed */
    uint32_t submitted; /* last generation submitted */
    uint32_t lo;        /* a failed write leaves the block anywhere in [lo, submitted] */
    uint8_t busy;
    uint8_t uncertain;
};

struct slot {
    struct iocb cb;
    unsigned char *buf;
    int used, write, susp;
    uint32_t block, gen, snap;
    double at;
};

static int fd, nblocks = 4096, depth = 16, status_s = 5;
static long long base;
static double tlimit = 600, drain_s = 120, rate;
static long long submitted;
static const char *stopfile;
static uint32_t seed;
static aio_context_t ctx;
static struct blk *B;
static struct slot S[MAXDEPTH];
static int inflight, w_inflight, r_inflight;
static long long writes_ok, reads_ok, reads_unwritten, stale, corrupt, ioerr, across, submit_fail;
static int suspends, printed;
static double maxlat, maxlat_at;
static uint64_t rng = 88172645463325252ull;

static uint64_t xs64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static uint64_t fnv(const unsigned char *p, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

static void fill(unsigned char *buf, uint32_t block, uint32_t gen)
{
    uint64_t s = ((uint64_t)block << 32 | gen) ^ ((uint64_t)seed << 17) ^ 0x9e3779b97f4a7c15ull;
    if (!s)
        s = 1;
    for (int i = 0; i < BS; i += 8) {
        uint64_t v = xs64(&s);
        memcpy(buf + i, &v, 8);
    }
    struct hdr h = {MAGIC, block, gen, seed, 0};
    memcpy(buf, &h, sizeof h);
    h.csum = fnv(buf, BS);
    memcpy(buf, &h, sizeof h);
}

/* -> generation in the block (0: all zeros), or -1 (reason in *why) */
static long parse(const unsigned char *buf, uint32_t block, const char **why)
{
    struct hdr h;
    memcpy(&h, buf, sizeof h);
    if (h.magic != MAGIC) {
        for (int i = 0; i < BS; i++)
            if (buf[i]) {
                *why = "bad magic (neither a stamp nor zeros)";
                return -1;
            }
        return 0;
    }
    uint64_t c = h.csum;
    unsigned char tmp[BS];
    memcpy(tmp, buf, BS);
    ((struct hdr *)tmp)->csum = 0;
    if (fnv(tmp, BS) != c) {
        *why = "bad checksum (torn or mixed block)";
        return -1;
    }
    if (h.block != block) {
        *why = "wrong block (misdirected write)";
        return -1;
    }
    if (h.seed != seed) {
        *why = "stamp of another run";
        return -1;
    }
    return h.gen;
}

static void verify(struct slot *s, const char *when)
{
    struct blk *k = &B[s->block];
    const char *why = NULL;
    if (s->snap == 0 && !k->uncertain) {
        /* Not written by this run: whatever an earlier user left there. */
        reads_unwritten++;
        return;
    }
    long g = parse(s->buf, s->block, &why);
    uint32_t lo = k->uncertain ? k->lo : s->snap, hi = k->uncertain ? k->submitted : s->snap;
    if (g < 0) {
        corrupt++;
        if (printed++ < MAXPRINT)
            printf("LOAD-CORRUPT block %u: %s (%s, completed gen %u, t=%.2f)\n", s->block, why, when, s->snap, tnow());
    } else if ((uint32_t)g < lo) {
        stale++;
        if (printed++ < MAXPRINT)
            printf("LOAD-STALE block %u reads gen %ld but gen %u had completed (%s, t=%.2f)\n", s->block, g, lo, when,
                   tnow());
    } else if ((uint32_t)g > hi) {
        corrupt++;
        if (printed++ < MAXPRINT)
            printf("LOAD-CORRUPT block %u: gen %ld never completed (last completed %u, %s, t=%.2f)\n", s->block, g, hi,
                   when, tnow());
    } else {
        reads_ok++;
        if (k->uncertain) { /* settle on what the storage holds */
            k->uncertain = 0;
            k->completed = (uint32_t)g;
        }
    }
    fflush(stdout);
}

/*
 * BOOTTIME - MONOTONIC, sampled between two MONOTONIC reads so that a
 * preemption between the reads (frequent under TCG) is not taken for a
 * suspend: the narrowest of a few brackets.
 */
static double boot_offset(void)
{
    double best = 1e9, off = 0;
    for (int i = 0; i < 5; i++) {
        double m1 = clk(CLOCK_MONOTONIC), b = clk(CLOCK_BOOTTIME), m2 = clk(CLOCK_MONOTONIC);
        if (m2 - m1 < best) {
            best = m2 - m1;
            off = b - (m1 + m2) / 2;
        }
        if (best < 0.002)
            break;
    }
    return off;
}

static double last_off = -1e9;
static void check_suspend(void)
{
    double off = boot_offset();
    if (last_off > -1e8 && off - last_off > 0.2) {
        suspends++;
        say("LOAD-SUSPENDED #%d for %.2f s with %d writes and %d reads in flight", suspends, off - last_off,
            w_inflight, r_inflight);
    }
    last_off = off;
}

/* A random idle block; for a read, preferably one this run has written. */
static int pick_block(int for_read)
{
    int idle = -1;
    for (int tries = 0; tries < 64; tries++) {
        uint32_t b = (uint32_t)(xs64(&rng) % (uint64_t)nblocks);
        if (B[b].busy)
            continue;
        if (!for_read || B[b].completed)
            return (int)b;
        if (idle < 0)
            idle = (int)b;
    }
    return idle;
}

static struct slot *free_slot(void)
{
    for (int i = 0; i < depth; i++)
        if (!S[i].used)
            return &S[i];
    return NULL;
}

static void prep(struct slot *s, int write, uint32_t b)
{
    struct blk *k = &B[b];
    s->used = 1;
    s->write = write;
    s->block = b;
    s->susp = suspends;
    s->at = clk(CLOCK_BOOTTIME);
    s->snap = k->completed;
    if (write) {
        s->gen = k->submitted + 1;
        k->submitted = s->gen;
        fill(s->buf, b, s->gen);
    }
    k->busy = 1;
    memset(&s->cb, 0, sizeof s->cb);
    s->cb.aio_fildes = fd;
    s->cb.aio_lio_opcode = write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
    s->cb.aio_buf = (uint64_t)(uintptr_t)s->buf;
    s->cb.aio_nbytes = BS;
    s->cb.aio_offset = base + (long long)b * BS;
    s->cb.aio_data = (uint64_t)(s - S);
}

static void unprep(struct slot *s)
{
    struct blk *k = &B[s->block];
    if (s->write)
        k->submitted = s->gen - 1;
    k->busy = 0;
    s->used = 0;
}

static void submit_batch(struct slot **v, int n)
{
    struct iocb *p[MAXDEPTH];
    for (int i = 0; i < n; i++)
        p[i] = &v[i]->cb;
    int done = 0, spins = 0;
    while (done < n) {
        int r = io_submit_(ctx, n - done, p + done);
        if (r > 0) {
            for (int i = done; i < done + r; i++) {
                inflight++;
                if (v[i]->write)
                    w_inflight++;
                else
                    r_inflight++;
            }
            done += r;
            continue;
        }
        if (r < 0 && (errno == EINTR || errno == EAGAIN) && spins++ < 1000) {
            usleep(1000);
            continue;
        }
        submit_fail++;
        if (printed++ < MAXPRINT)
            say("LOAD-IOERR io_submit: %s", r < 0 ? strerror(errno) : "0 submitted");
        for (int i = done; i < n; i++)
            unprep(v[i]);
        return;
    }
}

static void complete(struct io_event *e, const char *when)
{
    struct slot *s = &S[e->data];
    struct blk *k = &B[s->block];
    long res = (long)e->res;
    double lat = clk(CLOCK_BOOTTIME) - s->at;
    if (lat > maxlat) {
        maxlat = lat;
        maxlat_at = tnow();
    }
    if (s->susp != suspends)
        across++;
    inflight--;
    if (s->write)
        w_inflight--;
    else
        r_inflight--;
    k->busy = 0;
    s->used = 0;
    if (res != BS) {
        ioerr++;
        if (printed++ < MAXPRINT)
            say("LOAD-IOERR %s block %u gen %u: res=%ld (%s)", s->write ? "write" : "read", s->block, s->gen, res,
                res < 0 ? strerror((int)-res) : "short");
        if (s->write && !k->uncertain) {
            k->uncertain = 1;
            k->lo = k->completed;
        }
        return;
    }
    if (s->write) {
        writes_ok++;
        if (!k->uncertain)
            k->completed = s->gen;
        else if (s->gen > k->lo)
            k->lo = s->gen; /* the newest acknowledged write is the floor */
    } else {
        verify(s, when);
    }
}

static int pump(int ms, const char *when)
{
    struct io_event ev[MAXDEPTH];
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    int n = io_getevents_(ctx, 1, MAXDEPTH, ev, &t);
    check_suspend();
    if (n < 0) {
        if (errno != EINTR)
            say("io_getevents: %s", strerror(errno));
        return 0;
    }
    for (int i = 0; i < n; i++)
        complete(&ev[i], when);
    return n;
}

static long long errors(void) { return stale + corrupt + ioerr + submit_fail; }

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        fprintf(stderr, "usage: %s DEV [blocks=N] [offset_mb=M] [depth=D] [time=S] [stop=FILE] [seed=N] [status_s=S] "
                        "[drain=S] [tag=NAME]\n",
                argv[0]);
        return 2;
    }
    const char *dev = argv[1];
    seed = (uint32_t)(clk(CLOCK_REALTIME) * 1000) ^ (uint32_t)getpid();
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strncmp(a, "blocks=", 7)) nblocks = atoi(a + 7);
        else if (!strncmp(a, "offset_mb=", 10)) base = atoll(a + 10) << 20;
        else if (!strncmp(a, "depth=", 6)) depth = atoi(a + 6);
        else if (!strncmp(a, "time=", 5)) tlimit = atof(a + 5);
        else if (!strncmp(a, "stop=", 5)) stopfile = a + 5;
        else if (!strncmp(a, "seed=", 5)) seed = (uint32_t)strtoul(a + 5, NULL, 0);
        else if (!strncmp(a, "status_s=", 9)) status_s = atoi(a + 9);
        else if (!strncmp(a, "drain=", 6)) drain_s = atof(a + 6);
        else if (!strncmp(a, "rate=", 5)) rate = atof(a + 5);
        else if (!strncmp(a, "tag=", 4)) tag = a + 4;
        else { fprintf(stderr, "unknown argument %s\n", a); return 2; }
    }
    if (nblocks < 1 || depth < 1 || depth > MAXDEPTH) {
        fprintf(stderr, "bad blocks/depth\n");
        return 2;
    }
    rng ^= (uint64_t)seed * 2654435761ull;
    for (int i = 0; i < 200; i++) {
        struct stat st;
        if (stat(dev, &st) == 0)
            break;
        usleep(100000);
    }
    fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) {
        printf("LOAD-RESULT ERRORS n=1 open %s: %s\n", dev, strerror(errno));
        return 1;
    }
    off_t size = lseek(fd, 0, SEEK_END);
    if (size < base + (off_t)nblocks * BS) {
        printf("LOAD-RESULT ERRORS n=1 %s is %lld bytes, need %lld\n", dev, (long long)size,
               (long long)(base + (off_t)nblocks * BS));
        return 1;
    }
    if (io_setup_(MAXDEPTH * 2, &ctx) < 0) {
        printf("LOAD-RESULT ERRORS n=1 io_setup: %s\n", strerror(errno));
        return 1;
    }
    B = calloc(nblocks, sizeof *B);
    for (int i = 0; i < depth; i++)
        if (posix_memalign((void **)&S[i].buf, BS, BS))
            return 1;
    t0 = clk(CLOCK_BOOTTIME);
    say("LOAD-START dev=%s blocks=%d offset=%lld depth=%d time=%.0f stop=%s seed=%u rate=%.0f", dev, nblocks, base, depth,
        tlimit, stopfile ? stopfile : "-", seed, rate);

    double last_status = 0, last_stop_check = 0;
    long long last_w = 0, last_r = 0;
    int wnext = 1;
    const char *why = "time";
    for (;;) {
        double t = tnow();
        if (t >= tlimit)
            break;
        if (stopfile && t - last_stop_check >= 0.5) {
            last_stop_check = t;
            if (access(stopfile, F_OK) == 0) {
                why = "stop file";
                break;
            }
        }
        struct slot *batch[MAXDEPTH];
        int nb = 0;
        while (inflight + nb < depth && (rate <= 0 || submitted + nb < rate * t)) {
            struct slot *s = free_slot();
            int b = pick_block(!wnext);
            if (!s || b < 0)
                break;
            prep(s, wnext, (uint32_t)b);
            wnext ^= 1;
            batch[nb++] = s;
        }
        if (nb)
            submit_batch(batch, nb);
        submitted += nb;
        pump(rate > 0 ? 20 : 200, "run");
        if (t - last_status >= status_s) {
            say("LOAD-STATUS writes=%lld reads=%lld (+%lld/+%lld) inflight=%d/%d suspends=%d across=%lld "
                "maxlat=%.2fs errors=%lld",
                writes_ok, reads_ok, writes_ok - last_w, reads_ok - last_r, w_inflight, r_inflight, suspends, across,
                maxlat, errors());
            last_status = t;
            last_w = writes_ok;
            last_r = reads_ok;
        }
    }
    say("LOAD-STOP (%s): draining %d I/Os", why, inflight);
    double dend = tnow() + drain_s;
    while (inflight > 0 && tnow() < dend)
        pump(200, "drain");
    long long unanswered = inflight;
    /* Final: read and verify every block with nothing in flight. */
    long long before = reads_ok;
    int next = 0;
    double fend = tnow() + drain_s + nblocks / 50.0;
    while ((next < nblocks || inflight > unanswered) && tnow() < fend) {
        struct slot *batch[MAXDEPTH];
        int nb = 0;
        while (next < nblocks && inflight + nb < depth) {
            struct slot *s = free_slot();
            if (!s)
                break;
            if (B[next].busy || (!B[next].completed && !B[next].uncertain)) {
                next++; /* in flight since the drain, or never written by this run */
                continue;
            }
            prep(s, 0, (uint32_t)next++);
            batch[nb++] = s;
        }
        if (nb)
            submit_batch(batch, nb);
        pump(200, "final");
    }
    long long final_ok = reads_ok - before, written = 0;
    for (int b = 0; b < nblocks; b++)
        written += B[b].completed > 0 || B[b].uncertain;
    unanswered = inflight;
    if (next < nblocks)
        unanswered += nblocks - next;
    say("LOAD-END writes=%lld reads=%lld (of unwritten blocks %lld) final_verified=%lld/%lld written blocks "
        "suspends=%d across=%lld maxlat=%.2fs(at t=%.1f) stale=%lld corrupt=%lld ioerr=%lld submit_fail=%lld "
        "unanswered=%lld",
        writes_ok, reads_ok, reads_unwritten, final_ok, written, suspends, across, maxlat, maxlat_at, stale, corrupt,
        ioerr, submit_fail, unanswered);
    long long n = errors() + unanswered;
    if (n == 0 && final_ok < written)
        n = written - final_ok; /* written blocks not verified at the end */
    if (n == 0)
        printf("LOAD-RESULT CLEAN ops=%lld reads=%lld final=%lld suspends=%d across=%lld maxlat=%.2fs\n", writes_ok,
               reads_ok, final_ok, suspends, across, maxlat);
    else
        printf("LOAD-RESULT ERRORS n=%lld stale=%lld corrupt=%lld ioerr=%lld unanswered=%lld ops=%lld reads=%lld "
               "final=%lld suspends=%d across=%lld\n",
               n, stale, corrupt, ioerr + submit_fail, unanswered, writes_ok, reads_ok, final_ok, suspends, across);
    fflush(stdout);
    return n ? 1 : 0;
}
