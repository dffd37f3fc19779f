/* A hand-off while the source keeps writing: a thread submits writes of
 * 0xCC from the source writer without waiting for them, as fast as it can,
 * while the main thread suspends the source (drain), resumes the
 * destination and writes 0xBB everywhere. Every callback must run exactly
 * once with 0, -ESHUTDOWN or -ESTALE (each request's buffer and state are
 * heap-allocated and freed in its callback, which ASan checks), and at the
 * end every block reads 0xBB: no source write landed after the hand-off.
 * Usage: racing WORKDIR (an empty directory). */
#include "waited_io.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BLOCK 4096
#define BLOCKS 64
#define IMAGE_SIZE (BLOCKS * BLOCK)

static atomic_int submitted, completed, ok, shutdown_, stale, other;
static atomic_int stop;

/* One request's state, freed by its callback. */
struct req {
    unsigned char data[BLOCK];
    int calls;
};

static void on_source_done(void *opaque, int result)
{
    struct req *r = opaque;
    if (++r->calls != 1) {
        fprintf(stderr, "FAIL: a callback ran twice\n");
        exit(1);
    }
    if (result == 0)
        atomic_fetch_add(&ok, 1);
    else if (result == -ESHUTDOWN)
        atomic_fetch_add(&shutdown_, 1);
    else if (result == -ESTALE)
        atomic_fetch_add(&stale, 1);
    else
        atomic_fetch_add(&other, 1);
    free(r);
    atomic_fetch_add(&completed, 1);
}

static void *source_writer(void *arg)
{
    const blkshim_writer *w = arg;
    uint64_t i = 0;
    while (!atomic_load(&stop)) {
        struct req *r = calloc(1, sizeof *r);
        CHECK(r != NULL);
        memset(r->data, 0xCC, BLOCK);
        int rc = blkshim_submit(w, BLKSHIM_OP_WRITE, (i % BLOCKS) * BLOCK,
                                r->data, BLOCK, 0, i, on_source_done, r);
        CHECK(rc == 0);
        atomic_fetch_add(&submitted, 1);
        i++;
        /* Keep a bounded number in flight. */
        while (atomic_load(&submitted) - atomic_load(&completed) > 32)
            usleep(100);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    CHECK(argc == 2);
    char image[4096], store[4096];
    snprintf(image, sizeof image, "%s/disk.img", argv[1]);
    snprintf(store, sizeof store, "file:%s/epochs", argv[1]);
    int fd = open(image, O_CREAT | O_RDWR | O_TRUNC, 0600);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, IMAGE_SIZE) == 0);

    int err;
    blkshim_disk *src = blkshim_disk_open(image, "vm2", store, 0, &err);
    CHECK(src != NULL);
    blkshim_disk *dst = blkshim_disk_open(image, "vm2", store, 0, &err);
    CHECK(dst != NULL);
    blkshim_writer *sw =
        blkshim_writer_register(src, BLKSHIM_EPOCH_CURRENT, "source", &err);
    CHECK(sw != NULL);

    pthread_t t;
    CHECK(pthread_create(&t, NULL, source_writer, sw) == 0);
    while (atomic_load(&completed) < 200)
        usleep(1000);

    char *record = blkshim_disk_suspend(src, BLKSHIM_EPOCH_CURRENT, 5000, &err);
    CHECK(record != NULL);
    uint64_t e1;
    CHECK(blkshim_disk_resume(dst, record, &e1) == 0);
    blkshim_writer *dw =
        blkshim_writer_register(dst, BLKSHIM_EPOCH_CURRENT, "destination", &err);
    CHECK(dw != NULL);
    unsigned char *buf = malloc(BLOCK);
    CHECK(buf != NULL);
    memset(buf, 0xBB, BLOCK);
    for (int b = 0; b < BLOCKS; b++)
        CHECK(do_io(dw, BLKSHIM_OP_WRITE, (uint64_t)b * BLOCK, buf, BLOCK) == 0);
    CHECK(do_io(dw, BLKSHIM_OP_FLUSH, 0, NULL, 0) == 0);

    /* The source keeps trying for a while after the destination wrote. */
    int before = atomic_load(&submitted);
    while (atomic_load(&submitted) < before + 200)
        usleep(1000);
    atomic_store(&stop, 1);
    CHECK(pthread_join(t, NULL) == 0);
    while (atomic_load(&completed) < atomic_load(&submitted))
        usleep(1000);

    for (int b = 0; b < BLOCKS; b++) {
        CHECK(do_io(dw, BLKSHIM_OP_READ, (uint64_t)b * BLOCK, buf, BLOCK) == 0);
        for (int i = 0; i < BLOCK; i++)
            CHECK(buf[i] == 0xBB);
        CHECK(pread(fd, buf, BLOCK, (off_t)b * BLOCK) == BLOCK);
        for (int i = 0; i < BLOCK; i++)
            CHECK(buf[i] == 0xBB);
    }
    CHECK(atomic_load(&other) == 0);
    CHECK(atomic_load(&ok) >= 200);
    CHECK(atomic_load(&stale) >= 200);

    blkshim_string_free(record);
    blkshim_writer_free(sw);
    blkshim_writer_free(dw);
    blkshim_disk_close(src);
    blkshim_disk_close(dst);
    free(buf);
    close(fd);
    printf("racing: ok (%d source writes: %d done, %d suspended, %d stale)\n",
           atomic_load(&submitted), atomic_load(&ok), atomic_load(&shutdown_),
           atomic_load(&stale));
    return 0;
}
