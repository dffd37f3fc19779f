/* A hand-off through the C API, as a toolstack would drive it: one image,
 * a source and a destination handle on one file epoch store, the source
 * writes and suspends, the destination resumes from the record, and the
 * old source's writes are refused with -ESTALE. Every outcome is asserted;
 * any failure exits non-zero. Usage: handoff WORKDIR (an empty directory). */
#include "waited_io.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define IMAGE_SIZE (1 << 20)
#define BLOCK 4096

static int all_bytes(const unsigned char *p, size_t len, unsigned char v)
{
    for (size_t i = 0; i < len; i++)
        if (p[i] != v)
            return 0;
    return 1;
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

    int err = 1;
    /* Bad arguments: NULL and -EINVAL with a message, no crash. */
    CHECK(blkshim_disk_open(image, "vm1", "nope:/x", 0, &err) == NULL);
    CHECK(err == -EINVAL);
    CHECK(strlen(blkshim_last_error()) > 0);
    CHECK(blkshim_disk_open(image, "bad/name", store, 0, &err) == NULL);
    CHECK(err == -EINVAL);
    CHECK(blkshim_disk_open(NULL, "vm1", store, 0, &err) == NULL);
    CHECK(err == -EINVAL);

    blkshim_disk *src = blkshim_disk_open(image, "vm1", store, 0, &err);
    CHECK(src != NULL && err == 0);
    blkshim_disk *dst = blkshim_disk_open(image, "vm1", store, 0, &err);
    CHECK(dst != NULL && err == 0);
    CHECK(blkshim_disk_size(src) == IMAGE_SIZE);
    CHECK(blkshim_disk_alignment(src) >= 512);

    blkshim_writer *sw =
        blkshim_writer_register(src, BLKSHIM_EPOCH_CURRENT, "source", &err);
    CHECK(sw != NULL && err == 0);
    uint64_t e0 = blkshim_writer_epoch(sw), e = 12345;
    CHECK(blkshim_disk_epoch(src, &e) == 0 && e == e0);

    /* The caller's buffers need no alignment: one byte off a page. */
    unsigned char *mem = malloc(BLOCK + 1), *buf = mem + 1;
    CHECK(mem != NULL);
    memset(buf, 0xAA, BLOCK);
    CHECK(do_io(sw, BLKSHIM_OP_WRITE, 0, buf, BLOCK) == 0);
    memset(buf, 0, BLOCK);
    CHECK(do_io(sw, BLKSHIM_OP_READ, 0, buf, BLOCK) == 0);
    CHECK(all_bytes(buf, BLOCK, 0xAA));
    CHECK(do_io(sw, BLKSHIM_OP_FLUSH, 0, NULL, 0) == 0);
    /* Misaligned: the callback says -EINVAL. Refused at once (no callback):
     * a NULL callback, an unknown op. */
    CHECK(do_io(sw, BLKSHIM_OP_WRITE, 100, buf, 512) == -EINVAL);
    CHECK(blkshim_submit(sw, BLKSHIM_OP_WRITE, 0, buf, BLOCK, 0, 0, NULL,
                         NULL) == -EINVAL);
    CHECK(blkshim_submit(sw, 99, 0, buf, BLOCK, 0, 0, on_done, NULL) ==
          -EINVAL);

    /* The source suspends (drain, 1 s): the record, as JSON. */
    char *record = blkshim_disk_suspend(src, BLKSHIM_EPOCH_CURRENT, 1000, &err);
    CHECK(record != NULL && err == 0);
    CHECK(strstr(record, "\"disk\": \"vm1\"") != NULL);
    CHECK(strstr(record, "\"method\": \"drained\"") != NULL);
    /* Suspended, no destination yet: -ESHUTDOWN. */
    memset(buf, 0xCC, BLOCK);
    CHECK(do_io(sw, BLKSHIM_OP_WRITE, 0, buf, BLOCK) == -ESHUTDOWN);

    /* The destination resumes from it: the epoch advances by one, in the
     * store both handles share. */
    uint64_t e1 = 0;
    CHECK(blkshim_disk_resume(dst, record, &e1) == 0);
    CHECK(e1 == e0 + 1);
    CHECK(blkshim_disk_epoch(src, &e) == 0 && e == e1);
    CHECK(blkshim_disk_epoch(dst, &e) == 0 && e == e1);
    /* The record is spent: replayed, it is stale. Garbage is -EINVAL. */
    CHECK(blkshim_disk_resume(dst, record, NULL) == -ESTALE);
    CHECK(blkshim_disk_resume(dst, "{not json", NULL) == -EINVAL);
    /* Nobody registers at the old epoch any more, on either handle. */
    CHECK(blkshim_writer_register(dst, e0, "late", &err) == NULL);
    CHECK(err == -ESTALE);
    CHECK(blkshim_writer_register(src, e0, "late", &err) == NULL);
    CHECK(err == -ESTALE);

    blkshim_writer *dw =
        blkshim_writer_register(dst, BLKSHIM_EPOCH_CURRENT, "destination", &err);
    CHECK(dw != NULL && err == 0);
    CHECK(blkshim_writer_epoch(dw) == e1);
    memset(buf, 0xBB, BLOCK);
    CHECK(do_io(dw, BLKSHIM_OP_WRITE, 0, buf, BLOCK) == 0);
    CHECK(do_io(dw, BLKSHIM_OP_FLUSH, 0, NULL, 0) == 0);

    /* The old source writes again: refused as stale, and nothing lands. */
    memset(buf, 0xCC, BLOCK);
    CHECK(do_io(sw, BLKSHIM_OP_WRITE, 0, buf, BLOCK) == -ESTALE);
    CHECK(do_io(sw, BLKSHIM_OP_WRITE, BLOCK, buf, BLOCK) == -ESTALE);

    memset(buf, 0, BLOCK);
    CHECK(do_io(dw, BLKSHIM_OP_READ, 0, buf, BLOCK) == 0);
    CHECK(all_bytes(buf, BLOCK, 0xBB));
    CHECK(do_io(dw, BLKSHIM_OP_READ, BLOCK, buf, BLOCK) == 0);
    CHECK(all_bytes(buf, BLOCK, 0));
    /* And on the image itself, past blkshim. */
    CHECK(pread(fd, buf, BLOCK, 0) == BLOCK && all_bytes(buf, BLOCK, 0xBB));
    CHECK(pread(fd, buf, BLOCK, BLOCK) == BLOCK && all_bytes(buf, BLOCK, 0));

    /* Write-zeroes (may unmap) and trim from the destination. */
    memset(buf, 0xBB, BLOCK);
    CHECK(do_io(dw, BLKSHIM_OP_WRITE, 2 * BLOCK, buf, BLOCK) == 0);
    {
        struct io_wait iw = {PTHREAD_MUTEX_INITIALIZER,
                             PTHREAD_COND_INITIALIZER, 0, 0, 0};
        CHECK(blkshim_submit(dw, BLKSHIM_OP_WRITE_ZEROES, 2 * BLOCK, NULL,
                             BLOCK, BLKSHIM_IO_MAY_UNMAP, next_tag++, on_done,
                             &iw) == 0);
        pthread_mutex_lock(&iw.lock);
        while (!iw.done)
            pthread_cond_wait(&iw.cond, &iw.lock);
        pthread_mutex_unlock(&iw.lock);
        CHECK(iw.result == 0);
    }
    CHECK(do_io(dw, BLKSHIM_OP_READ, 2 * BLOCK, buf, BLOCK) == 0);
    CHECK(all_bytes(buf, BLOCK, 0));
    CHECK(do_io(dw, BLKSHIM_OP_TRIM, 3 * BLOCK, NULL, BLOCK) == 0);

    char *status = blkshim_disk_status(dst);
    CHECK(status != NULL);
    char want[64];
    snprintf(want, sizeof want, "\"current_epoch\":%llu",
             (unsigned long long)e1);
    CHECK(strstr(status, want) != NULL);
    CHECK(strstr(status, "\"destination\"") != NULL);
    blkshim_string_free(status);

    /* A writer registered ahead of the disk's epoch is not admitted
     * (without BLKSHIM_OPEN_AUTO_ADVANCE only a resume moves the epoch). */
    blkshim_writer *ahead = blkshim_writer_register(dst, e1 + 1, "ahead", &err);
    CHECK(ahead != NULL && err == 0 && blkshim_writer_epoch(ahead) == e1 + 1);
    CHECK(do_io(ahead, BLKSHIM_OP_WRITE, 0, buf, BLOCK) == -EAGAIN);
    blkshim_writer_free(ahead);

    /* The destination gives the disk up by fencing: its writer is
     * suspended at once. */
    char *fenced = blkshim_disk_suspend(dst, e1, BLKSHIM_SUSPEND_FENCE, &err);
    CHECK(fenced != NULL && err == 0);
    CHECK(strstr(fenced, "\"method\": \"fenced\"") != NULL);
    CHECK(blkshim_disk_suspend(dst, e1, -2, &err) == NULL && err == -EINVAL);
    CHECK(do_io(dw, BLKSHIM_OP_WRITE, 0, buf, BLOCK) == -ESHUTDOWN);
    blkshim_string_free(fenced);

    /* Every handle freed (NULL is a no-op); ASan checks nothing leaks. */
    blkshim_string_free(record);
    blkshim_writer_free(sw);
    blkshim_writer_free(dw);
    blkshim_writer_free(NULL);
    blkshim_disk_close(src);
    blkshim_disk_close(dst);
    blkshim_disk_close(NULL);
    blkshim_string_free(NULL);
    free(mem);
    close(fd);
    printf("handoff: ok (epoch %llu -> %llu)\n", (unsigned long long)e0,
           (unsigned long long)e1);
    return 0;
}
